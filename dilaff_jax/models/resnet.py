"""Atrous ResNet v1 backbone of DeepLabv3+ (the paper's §3.2 baseline uses ResNet-101 pretrained on ImageNet).

Layer for layer the same network as torchvision's ResNet ("v1.5": the stride of a bottleneck unit sits on its 3x3
convolution), with PyTorch's explicit symmetric paddings, so that ImageNet weights converted by
`dilaff_jax.models.pretrained` reproduce torchvision's features. Two stems:

- ``"standard"``: 7x7/2 convolution, BN, ReLU, 3x3/2 max pool (torchvision, timm).
- ``"deep"``: three 3x3 convolutions of 64, 64 and 128 channels (the first with stride 2), each but the last followed
  by BN and ReLU, then BN, ReLU and the max pool: DeepLab's ResNet "beta" stem (timm's ``conv1.0 ... conv1.6`` layout).

Output stride (8, 16 or 32) is a call-time choice: a stage whose stride would take the features past the requested
output stride keeps stride 1 and dilates its 3x3 convolutions instead (atrous convolution), so one set of parameters
serves every output stride. See `unit_schedule` for the exact rates.

Parameter names mirror torchvision's module names (``conv1``, ``bn1``, ``layer3_4/conv2``, ``layer2_0/downsample_0``;
deep stem ``conv1_0``, ``conv1_1``, ``conv1_3``, ``conv1_4``, ``conv1_6``), which keeps weight import mechanical.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.models import atrous, pooling

# depth -> (unit kind, units per stage). 14 and 26 are timm's small bottleneck layouts (used by the parity tests).
LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    14: ("bottleneck", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("standard", "deep")
OUTPUT_STRIDES = (8, 16, 32)
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck width of each stage; a bottleneck unit outputs 4x as many channels
DEEP_STEM_WIDTHS = (64, 64, 128)


class Unit(NamedTuple):
  """Geometry of one residual unit.

  stride: stride of the unit's first 3x3 convolution (1 or 2).
  rate: dilation of that convolution; it reads features on the grid the unit receives.
  out_rate: dilation of any later 3x3 convolution of the unit (BasicBlock's conv2), on the unit's output grid.
  """

  stride: int
  rate: int
  out_rate: int


def layout(depth: int) -> tuple[str, tuple[int, int, int, int]]:
  """(unit kind, units per stage) of a ResNet depth; ValueError naming the supported depths otherwise."""
  if depth not in LAYOUTS:
    raise ValueError(f"ResNet depth {depth!r} is not supported; choose one of {sorted(LAYOUTS)}")
  return LAYOUTS[depth]


def unit_schedule(
    stage_sizes: tuple[int, ...], output_stride: int, multi_grid: tuple[int, ...] | None
) -> tuple[tuple[Unit, ...], ...]:
  """Strides and atrous rates of every unit, stage by stage.

  The stem brings the features to stride 4; stages 2-4 would each halve them. A stage whose stride would exceed
  `output_stride` keeps stride 1 and doubles the rate instead. Its first unit still reads the coarser grid and keeps
  the incoming rate; the following units use the doubled rate (torchvision's `replace_stride_with_dilation`).

  Multi-grid (DeepLabv3 §3.2): when the last stage is dilated with rate R and `multi_grid` is given, its unit i
  uses rate R * multi_grid[i] (e.g. OS 16: 2*(1, 2, 4) = (2, 4, 8); OS 8: (4, 8, 16)). `multi_grid=None` keeps
  torchvision's rates. At output stride 32 nothing is dilated and `multi_grid` has no effect.
  """
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
  if multi_grid is not None:
    if len(multi_grid) != stage_sizes[-1] or any(int(g) != g or g < 1 for g in multi_grid):
      raise ValueError(
          f"multi_grid {tuple(multi_grid)!r} must hold one positive integer per unit of the last stage "
          f"({stage_sizes[-1]} units); pass multi_grid=None for plain torchvision rates"
      )
  stages = []
  current_stride, rate = 4, 1
  for index, size in enumerate(stage_sizes):
    if index > 0 and current_stride >= output_stride:  # trade this stage's stride for dilation
      first = Unit(1, rate, 2 * rate)
      rate *= 2
    else:
      stride = 1 if index == 0 else 2
      current_stride *= stride
      first = Unit(stride, rate, rate)
    units = [first] + [Unit(1, rate, rate)] * (size - 1)
    if index == len(stage_sizes) - 1 and rate > 1 and multi_grid is not None:
      units = [Unit(1, rate * int(g), rate * int(g)) for g in multi_grid]
    stages.append(tuple(units))
  return tuple(stages)


def _conv(features: int, kernel: int, *, stride: int = 1, rate: int = 1, dtype: Any, name: str) -> nn.Conv:
  """Bias-free convolution with PyTorch's symmetric padding `rate * (kernel - 1) / 2` (He init, fan-out)."""
  pad = rate * (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=(rate, rate),
      use_bias=False,
      dtype=dtype,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      conv_general_dilated=atrous.conv_general_dilated,  # lax's, without the taps that read only padding
      name=name,
  )


def batch_norm(train: bool, momentum: float, epsilon: float, axis_name: str | None, dtype: Any):
  """The BatchNorm every layer uses: batch statistics when training (across ``axis_name`` under pmap), running
  averages otherwise; computed in ``dtype``, statistics and scales kept in float32."""
  return partial(
      nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon, axis_name=axis_name, dtype=dtype
  )


class BottleneckUnit(nn.Module):
  """1x1 reduce, 3x3 (carries stride and rate), 1x1 expand x4; projection shortcut when the shape changes."""

  width: int
  unit: Unit
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_features = 4 * self.width
    y = nn.relu(self.norm(name="bn1")(_conv(self.width, 1, dtype=self.dtype, name="conv1")(x)))
    y = _conv(self.width, 3, stride=self.unit.stride, rate=self.unit.rate, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.norm(name="bn3")(_conv(out_features, 1, dtype=self.dtype, name="conv3")(y))
    if x.shape[-1] != out_features or self.unit.stride != 1:
      x = _conv(out_features, 1, stride=self.unit.stride, dtype=self.dtype, name="downsample_0")(x)
      x = self.norm(name="downsample_1")(x)
    return nn.relu(x + y)


class BasicUnit(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34); the first carries the stride."""

  width: int
  unit: Unit
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _conv(self.width, 3, stride=self.unit.stride, rate=self.unit.rate, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = _conv(self.width, 3, rate=self.unit.out_rate, dtype=self.dtype, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if x.shape[-1] != self.width or self.unit.stride != 1:
      x = _conv(self.width, 1, stride=self.unit.stride, dtype=self.dtype, name="downsample_0")(x)
      x = self.norm(name="downsample_1")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision-compatible atrous ResNet v1.5 feature extractor (no classifier).

  Attributes:
    depth: 18, 34, 50, 101 or 152 (also timm's 14 and 26 bottleneck layouts).
    stem: "standard" (7x7) or "deep" (3x3 convs 64-64-128, DeepLab's "beta").
    multi_grid: unit rates of the last stage when it is dilated (see `unit_schedule`); None for torchvision's.
    dtype: compute dtype (e.g. bfloat16 on GPUs); parameters and BatchNorm statistics stay float32.
    bn_momentum, bn_epsilon: flax BatchNorm convention (running = m * running + (1 - m) * batch).
    axis_name: pmap axis for cross-replica BatchNorm statistics, or None.

  Call: `(x [B, H, W, 3], *, train, output_stride=32)` -> dict of features: "stem" (after the max pool, stride 4),
  "stage1" (stride 4, the decoder's low-level features), "stage2", "stage3", "stage4" (strides 8, 16, 32, capped
  at `output_stride`). Spatial sizes follow PyTorch's floor arithmetic: 513 -> 257 -> 129 -> 65 -> 33 -> 17.
  """

  depth: int = 101
  stem: str = "standard"
  multi_grid: tuple[int, ...] | None = (1, 2, 4)
  dtype: Any = jnp.float32
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, output_stride: int = 32) -> dict[str, jax.Array]:
    kind, stage_sizes = layout(self.depth)
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem {self.stem!r} is not supported; choose one of {STEMS}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects images [B, H, W, 3], got shape {x.shape}")
    schedule = unit_schedule(stage_sizes, output_stride, self.multi_grid)
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name, self.dtype)
    x = x.astype(self.dtype)
    if self.stem == "standard":
      x = _conv(64, 7, stride=2, dtype=self.dtype, name="conv1")(x)
    else:
      w1, w2, w3 = DEEP_STEM_WIDTHS
      x = nn.relu(norm(name="conv1_1")(_conv(w1, 3, stride=2, dtype=self.dtype, name="conv1_0")(x)))
      x = nn.relu(norm(name="conv1_4")(_conv(w2, 3, dtype=self.dtype, name="conv1_3")(x)))
      x = _conv(w3, 3, dtype=self.dtype, name="conv1_6")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = pooling.max_pool(x, 3, 2, 1)  # nn.max_pool's values and gradient, faster on CPU
    features = {"stem": x}
    block = BottleneckUnit if kind == "bottleneck" else BasicUnit
    for s, (width, units) in enumerate(zip(STAGE_WIDTHS, schedule)):
      for i, unit in enumerate(units):
        x = block(width, unit, norm, self.dtype, name=f"layer{s + 1}_{i}")(x)
      features[f"stage{s + 1}"] = x
    return features


def resnet_variable_shapes(depth: int = 101, stem: str = "standard") -> dict:
  """Abstract variables ({"params", "batch_stats"} of ShapeDtypeStructs) of a ResNet, via `jax.eval_shape`."""
  model = ResNet(depth=depth, stem=stem, multi_grid=None)
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)


def resnet_param_count(depth: int = 101, stem: str = "standard") -> int:
  """Number of trainable parameters (BatchNorm running statistics excluded) of the backbone, without classifier."""
  params = resnet_variable_shapes(depth, stem)["params"]
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
