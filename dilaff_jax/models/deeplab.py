"""DeepLabv3+ with the dilated-affinity head (paper §3.2, Fig. 2).

Encoder: the atrous ResNet (`resnet.ResNet`, submodule "backbone") followed by ASPP -- a 1x1 convolution, three
3x3 atrous convolutions at rates (6, 12, 18) x 16 / output_stride, image-level pooling, each with BN and ReLU,
concatenated and projected by a 1x1 convolution, then dropout (DeepLabv3 §3.3). Decoder (DeepLabv3+ §3.1): the
stride-4 backbone features ("stage1") are projected to 48 channels, the ASPP output is upsampled bilinearly to their
size and concatenated, and two 3x3 convolutions of 256 channels refine them (optionally depthwise-separable, §3.2).

Heads, both 1x1 convolutions on the decoder's 256-channel map at stride 4:
- segmentation: `num_classes` logits (the DeepLabv3+ baseline);
- affinity (only when affinity `rates` are given): 8*|R| logits, channel c = rate_index * 8 + direction_index
  (see docs/conventions.md), whose bias is initialised from the prior pi_r
  (sigmoid(bias) = pi_r, the focal-loss prior init; the numbers come from `dilaff_jax.method.affinity.prior_bias`).

Bilinear resizing aligns corners, as DeepLab does: with PyTorch-style padding a feature at stride-4 index i is
centred on pixel 4i, so for the paper's 513 = 4 * 128 + 1 crops the 129 features map exactly onto pixels 0, 4, ...,
512. `upsample_logits(..., align_corners=False)` gives half-pixel resizing (= `jax.image.resize` when upsampling).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.models import atrous
from dilaff_jax.models.resnet import OUTPUT_STRIDES, ResNet, batch_norm

_he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _axis_weights(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (lo, hi) and weight of hi for 1-D linear interpolation from in_size to out_size samples."""
  out = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = out * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(out)
  else:
    src = np.clip((out + 0.5) * (in_size / out_size) - 0.5, 0.0, in_size - 1)
  lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def _integer_factor(lo: np.ndarray, hi: np.ndarray, in_size: int) -> int | None:
  """``f`` when output sample ``f·i + p`` (``0 <= p < f``) lies between inputs ``i`` and ``i + 1`` for every
  ``i < in_size - 1`` and the last output sits on the last input: DeepLab's aligned upsampling (129 -> 513,
  ``f = 4``). ``None`` for any other index pattern."""
  out_size = lo.shape[0]
  if in_size < 2 or (out_size - 1) % (in_size - 1):
    return None
  f = (out_size - 1) // (in_size - 1)
  i = np.arange(out_size - 1) // f
  if np.array_equal(lo[:-1], i) and np.array_equal(hi[:-1], i + 1) and lo[-1] == hi[-1] == in_size - 1:
    return f
  return None


def _resize_axis(x: jax.Array, axis: int, out_size: int, align_corners: bool, gather: bool) -> jax.Array:
  """Linear interpolation of ``x`` along ``axis`` to ``out_size`` samples: ``x[lo]·(1 - t) + x[hi]·t``.

  For an integer factor ``f`` (see :func:`_integer_factor`) the ``f`` phases ``p`` are computed from two shifted
  slices, ``x[:-1]·(1 - t_p) + x[1:]·t_p``, and interleaved: the same products and sums as the general form, so the
  same values bit for bit, with no gather, and the gradient is a sum of slices instead of a scatter-add (on a GPU a
  scatter-add is atomic or sorted: slow either way). Other sizes, and ``gather=True``, gather.
  """
  n = x.shape[axis]
  lo, hi, t = _axis_weights(n, out_size, align_corners)
  f = None if gather else _integer_factor(lo, hi, n)

  def along(v: np.ndarray) -> jax.Array:  # a vector of weights, broadcast along `axis`
    shape = [1] * x.ndim
    shape[axis] = v.shape[0]
    return jnp.asarray(v.reshape(shape), x.dtype)

  if f is None:
    t = along(t)
    return jnp.take(x, lo, axis=axis) * (1 - t) + jnp.take(x, hi, axis=axis) * t
  a = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)
  b = jax.lax.slice_in_dim(x, 1, n, axis=axis)
  phases = [a * (1 - along(t[p:-1:f])) + b * along(t[p:-1:f]) for p in range(f)]
  shape = list(x.shape)
  shape[axis] = (n - 1) * f
  inner = jnp.stack(phases, axis=axis + 1).reshape(shape)  # inner[f·i + p] = phase p at i
  last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
  t_last = along(t[-1:])
  return jnp.concatenate([inner, last * (1 - t_last) + last * t_last], axis=axis)


def resize_bilinear(
    x: jax.Array, size: tuple[int, int], *, align_corners: bool = True, gather: bool = False
) -> jax.Array:
  """Bilinear resize of [B, H, W, C] to [B, size[0], size[1], C] (separable; exact at the sample points).

  DeepLab's aligned upsampling by an integer factor (``align_corners`` and ``out - 1 = f·(in - 1)``, as from the
  stride-4 maps of 16k + 1 crops) runs without gathers or scatter-adds; any other size gathers. Both give the same
  values bit for bit; ``gather=True`` forces the general gather form on every axis (the reference the tests and
  ``benchmarks/affinity_head.py`` compare with)."""
  if x.ndim != 4:
    raise ValueError(f"resize_bilinear expects [B, H, W, C], got shape {x.shape}")
  h, w = (int(s) for s in size)
  if h < 1 or w < 1:
    raise ValueError(f"resize target size must be positive, got {tuple(size)}")
  for axis, out_size in ((1, h), (2, w)):
    if x.shape[axis] != out_size:
      x = _resize_axis(x, axis, out_size, align_corners, gather)
  return x


def upsample_logits(logits: jax.Array, size: tuple[int, int], *, align_corners: bool = True) -> jax.Array:
  """Bilinearly upsamples stride-4 logits [B, h4, w4, C] to the label size, in float32 (paper §3.2)."""
  return resize_bilinear(logits.astype(jnp.float32), size, align_corners=align_corners)


class ConvBNReLU(nn.Module):
  """KxK convolution (atrous `rate`), BN, ReLU; depthwise-separable when `separable` (depthwise KxK, BN, ReLU,
  pointwise 1x1, BN, ReLU: DeepLabv3+ §3.2)."""

  features: int
  kernel: int
  norm: Any
  rate: int = 1
  separable: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.rate * (self.kernel - 1) // 2
    conv = partial(
        nn.Conv,
        kernel_size=(self.kernel, self.kernel),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(self.rate, self.rate),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_he_init,
        conv_general_dilated=atrous.conv_general_dilated,  # lax's, without the taps that read only padding
    )
    if self.separable and self.kernel > 1:
      x = conv(x.shape[-1], feature_group_count=x.shape[-1], name="depthwise")(x)
      x = nn.relu(self.norm(name="depthwise_bn")(x))
      x = conv(self.features, kernel_size=(1, 1), padding="VALID", kernel_dilation=(1, 1), name="pointwise")(x)
    else:
      x = conv(self.features, name="conv")(x)
    return nn.relu(self.norm(name="bn")(x))


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling (DeepLabv3 §3.3): 1x1, three atrous 3x3 and image pooling, then a 1x1
  projection and dropout. Submodules: "conv_1x1", "atrous_0".."atrous_2", "pool", "project"."""

  rates: tuple[int, ...]
  channels: int
  norm: Any
  separable: bool = False
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    branches = [ConvBNReLU(self.channels, 1, self.norm, dtype=self.dtype, name="conv_1x1")(x)]
    for i, rate in enumerate(self.rates):
      layer = ConvBNReLU(self.channels, 3, self.norm, rate, self.separable, self.dtype, name=f"atrous_{i}")
      branches.append(layer(x))
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    pooled = ConvBNReLU(self.channels, 1, self.norm, dtype=self.dtype, name="pool")(pooled)
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[-1:]))
    y = ConvBNReLU(self.channels, 1, self.norm, dtype=self.dtype, name="project")(jnp.concatenate(branches, -1))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class Decoder(nn.Module):
  """DeepLabv3+ decoder: 1x1 projection of the stride-4 features, concat with the upsampled ASPP output, two 3x3
  convolutions. Submodules: "low_level", "conv_0", "conv_1"."""

  low_level_channels: int
  channels: int
  norm: Any
  separable: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encoded, low_level):
    low = ConvBNReLU(self.low_level_channels, 1, self.norm, dtype=self.dtype, name="low_level")(low_level)
    x = resize_bilinear(encoded, low.shape[1:3]).astype(low.dtype)
    x = jnp.concatenate([x, low], axis=-1)
    for i in range(2):
      x = ConvBNReLU(self.channels, 3, self.norm, 1, self.separable, self.dtype, name=f"conv_{i}")(x)
    return x


#: The :class:`DeepLabV3Plus` fields that decide the shapes of its parameters: the ``config.model`` keys a checkpoint
#: records and must agree with to be restored (``checkpoints.compat_record``).
SHAPE_FIELDS = ("depth", "stem", "multi_grid", "aspp_channels", "low_level_channels", "decoder_channels", "separable")


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+ (ResNet backbone) with the optional dilated-affinity head of the paper.

  Attributes:
    num_classes: segmentation classes (21 for PASCAL VOC).
    rates: explicit affinity rate pairs ((r1, r2), ...) (see `affinity.expand_rates`); () gives the plain
      DeepLabv3+ baseline without affinity head.
    affinity_bias: initial bias of the affinity 1x1 convolution, 8 * len(rates) numbers (`prior_bias(pi)`), or
      None for zeros. Its kernel starts at N(0, 0.01^2) (the focal-loss paper's head init), so initially
      sigmoid(affinity logits) is close to pi_r.
    depth, stem, multi_grid: the backbone (`ResNet`).
    aspp_rates: ASPP atrous rates at output stride 16; scaled by 16 / output_stride ((12, 24, 36) at OS 8).
    aspp_channels, low_level_channels, decoder_channels, separable, dropout_rate: the DeepLabv3+ heads.
    dtype: compute dtype (params float32); logits are returned in float32.
    bn_momentum, bn_epsilon, axis_name: BatchNorm of every layer (axis_name: cross-replica under pmap).

  Call: `(images [B, H, W, 3], *, train, output_stride=16)` -> {"logits": [B, h4, w4, num_classes],
  "affinity_logits": [B, h4, w4, 8 * len(rates)] (only if rates)}, both float32, at the stride-4 size h4 of the
  backbone's "stage1" features (129 for 513). Training needs the "dropout" rng and mutable "batch_stats".
  """

  num_classes: int
  rates: tuple[tuple[int, int], ...] = ()
  affinity_bias: tuple[float, ...] | None = None
  depth: int = 101
  stem: str = "standard"
  multi_grid: tuple[int, ...] | None = (1, 2, 4)
  aspp_rates: tuple[int, ...] = (6, 12, 18)
  aspp_channels: int = 256
  low_level_channels: int = 48
  decoder_channels: int = 256
  separable: bool = False
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-5
  axis_name: str | None = None

  def _check(self) -> None:
    if int(self.num_classes) != self.num_classes or self.num_classes < 1:
      raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
    for pair in self.rates:
      if len(tuple(pair)) != 2 or any(int(r) != r or r < 1 for r in pair):
        raise ValueError(f"affinity rates must be pairs of positive integers (r1, r2), got {pair!r}")
    if self.affinity_bias is not None and len(self.affinity_bias) != 8 * len(self.rates):
      raise ValueError(
          f"affinity_bias has {len(self.affinity_bias)} values, but {len(self.rates)} affinity rates need "
          f"8 * {len(self.rates)} = {8 * len(self.rates)}"
      )

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, output_stride: int = 16) -> dict[str, jax.Array]:
    self._check()
    if output_stride not in OUTPUT_STRIDES:
      raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    norm = batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name, self.dtype)
    backbone = ResNet(
        depth=self.depth,
        stem=self.stem,
        multi_grid=self.multi_grid,
        dtype=self.dtype,
        bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon,
        axis_name=self.axis_name,
        name="backbone",
    )
    features = backbone(images, train=train, output_stride=output_stride)
    rates = tuple(r * 16 // output_stride for r in self.aspp_rates)
    aspp = ASPP(rates, self.aspp_channels, norm, self.separable, self.dropout_rate, self.dtype, name="aspp")
    x = aspp(features["stage4"], train=train)
    x = Decoder(self.low_level_channels, self.decoder_channels, norm, self.separable, self.dtype, name="decoder")(
        x, features["stage1"]
    )
    head = partial(
        nn.Conv,
        kernel_size=(1, 1),
        padding="VALID",  # as "SAME" for a 1x1 kernel
        dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.01),
        conv_general_dilated=atrous.conv_general_dilated,  # a matrix product on the CPU
    )
    out = {"logits": head(self.num_classes, name="classifier")(x)}
    if self.rates:
      bias = np.zeros(8 * len(self.rates), np.float32)
      if self.affinity_bias is not None:
        bias = np.asarray(self.affinity_bias, np.float32)
      init = lambda key, shape, dtype=jnp.float32: jnp.asarray(bias, dtype).reshape(shape)  # noqa: E731
      out["affinity_logits"] = head(8 * len(self.rates), bias_init=init, name="affinity")(x)
    return out
