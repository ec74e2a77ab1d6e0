"""A PyTorch DeepLabv3+ with this project's layout, for `train_step.py --torch` (optional: torch is never required).

The network is the one `configs/voc.py` builds in JAX without the affinity head: ResNet (torchvision's layout:
7x7 stem, bottleneck units with the stride on the 3x3 convolution), output stride 16 by trading the last stage's
stride for dilation with multi-grid (1, 2, 4) (rates 2, 4, 8), ASPP (1x1, 3x3 at rates 6, 12, 18, image pooling,
256 channels, 1x1 projection, dropout 0.1), the decoder (48-channel projection of the stride-4 features, two 3x3
convolutions of 256 channels) and a 1x1 classifier, BatchNorm after every convolution but the classifier. Its
parameter count equals the JAX model's; `train_step.py` checks that before it times anything, so a layout drift
shows as an error rather than as a wrong comparison. Only torch itself is needed (no torchvision). Other configs
(`train_step.py --config`) get their own unit kind (ResNet-18/34's basic units, e.g. the demo's ResNet-18) and
widths: the demo's peer has the JAX model's 12,237,814 parameters (checked with torch 2.13).

The step mirrors `dilaff_jax.engine.train_step.train_step` without head: forward, bilinear upsampling of the stride-4 logits
with aligned corners, cross-entropy that ignores 255, backward, SGD with momentum 0.9 and weight decay 1e-4. It runs
in channels-last layout under `torch.autocast` for bfloat16/float16; `compiled=True` wraps the whole step in
`torch.compile`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def conv_bn_relu(cin: int, cout: int, kernel: int, rate: int = 1) -> nn.Sequential:
  pad = rate * (kernel - 1) // 2
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, padding=pad, dilation=rate, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
  )


class Bottleneck(nn.Module):

  def __init__(self, cin: int, width: int, stride: int, rate: int, out_rate: int):
    super().__init__()
    del out_rate  # a bottleneck unit has a single 3x3 convolution
    cout = 4 * width
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=rate, dilation=rate, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class BasicBlock(nn.Module):
  """ResNet-18/34's unit: two 3x3 convolutions, the first with the stride and ``rate``, the second with
  ``out_rate`` (``dilaff_jax.models.resnet.BasicUnit``)."""

  def __init__(self, cin: int, width: int, stride: int, rate: int, out_rate: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=rate, dilation=rate, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, padding=out_rate, dilation=out_rate, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.down = None
    if stride != 1 or cin != width:
      self.down = nn.Sequential(nn.Conv2d(cin, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.down is None else self.down(x)))


class DeepLabV3Plus(nn.Module):
  """``schedule``: per stage, the ``dilaff_jax.models.resnet.Unit`` tuples ``(stride, rate, out_rate)`` of the JAX
  model (``unit_schedule``), so both networks place strides and dilations identically; ``kind``: "bottleneck"
  (ResNet-50/101/152) or "basic" (ResNet-18/34); the widths are ``config.model``'s (``aspp_channels``,
  ``low_level_channels``, ``decoder_channels``, ``dropout_rate``)."""

  def __init__(
      self,
      num_classes: int,
      schedule,
      aspp_rates=(6, 12, 18),
      *,
      kind: str = "bottleneck",
      aspp_channels: int = 256,
      low_level_channels: int = 48,
      decoder_channels: int = 256,
      dropout_rate: float = 0.1,
  ):
    super().__init__()
    unit, expansion = {"bottleneck": (Bottleneck, 4), "basic": (BasicBlock, 1)}[kind]
    self.stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    stages, cin = [], 64
    for index, units in enumerate(schedule):
      width = 64 * 2**index
      blocks = []
      for stride, rate, out_rate in units:
        blocks.append(unit(cin, width, stride, rate, out_rate))
        cin = expansion * width
      stages.append(nn.Sequential(*blocks))
    low_in = 64 * expansion
    self.stages = nn.ModuleList(stages)
    a = aspp_channels
    self.aspp = nn.ModuleList(
        [conv_bn_relu(cin, a, 1)] + [conv_bn_relu(cin, a, 3, r) for r in aspp_rates] + [conv_bn_relu(cin, a, 1)]
    )
    self.project = conv_bn_relu(a * (len(aspp_rates) + 2), a, 1)
    self.dropout = nn.Dropout(dropout_rate)
    self.low_level = conv_bn_relu(low_in, low_level_channels, 1)
    self.decoder = nn.Sequential(
        conv_bn_relu(a + low_level_channels, decoder_channels, 3), conv_bn_relu(decoder_channels, decoder_channels, 3)
    )
    self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

  def forward(self, x):
    x = self.stem(x)
    low = x = self.stages[0](x)
    for stage in self.stages[1:]:
      x = stage(x)
    branches = [branch(x) for branch in self.aspp[:-1]]
    pooled = self.aspp[-1](x.mean(dim=(2, 3), keepdim=True))
    branches.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
    x = self.dropout(self.project(torch.cat(branches, 1)))
    low = self.low_level(low)
    x = F.interpolate(x, size=low.shape[2:], mode="bilinear", align_corners=True)
    return self.classifier(self.decoder(torch.cat([x, low], 1)))


def parameter_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


class TorchStep:
  """One same-layout training step in PyTorch, with the ``step()`` / ``times`` interface of ``CompiledStep``."""

  def __init__(self, model, images, labels, *, dtype: str, compiled: bool, crop: int, batch: int):
    self.crop, self.batch, self.dtype, self.rates = crop, batch, dtype, ()
    self.times: list[float] = []
    self.device = images.device
    self.model = model.to(memory_format=torch.channels_last)
    self.images = images.contiguous(memory_format=torch.channels_last)
    self.labels = labels
    self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    self.autocast = dict(device_type=self.device.type, dtype=amp, enabled=amp is not None)
    self.flops = float("nan")
    self.memory_bytes = 0
    self._step = torch.compile(self._eager_step) if compiled else self._eager_step
    start = time.perf_counter()
    self.step()  # compiles (torch.compile) and allocates
    self.compile_s = time.perf_counter() - start
    if self.device.type == "cuda":
      self.memory_bytes = torch.cuda.max_memory_allocated(self.device)

  def _eager_step(self):
    with torch.autocast(**self.autocast):
      logits = self.model(self.images)
      logits = F.interpolate(logits.float(), size=self.labels.shape[1:], mode="bilinear", align_corners=True)
      loss = F.cross_entropy(logits, self.labels, ignore_index=255)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def _sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def step(self) -> float:
    self._sync()
    start = time.perf_counter()
    loss = self._step()
    self._sync()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
      raise RuntimeError(f"the PyTorch peer (crop {self.crop}, batch {self.batch}) gave a non-finite loss")
    return elapsed

  def free(self):
    self.model = self.images = self.labels = self.optimizer = self._step = None
    if self.device.type == "cuda":
      torch.cuda.empty_cache()


def make_step(schedule, num_classes, images, labels, *, dtype: str, compiled: bool, **layout) -> TorchStep:
  """``images`` float32 ``[B, H, W, 3]`` and ``labels`` int ``[B, H, W]`` (numpy), as the JAX step gets them;
  ``layout``: :class:`DeepLabV3Plus`'s keyword arguments (unit kind, widths, dropout)."""
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model = DeepLabV3Plus(num_classes, schedule, **layout).to(device).train()
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
  y = torch.from_numpy(labels).long().to(device)
  return TorchStep(model, x, y, dtype=dtype, compiled=compiled, crop=images.shape[1], batch=images.shape[0])
