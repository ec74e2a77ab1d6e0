"""ImageNet initialisation of the backbone (paper §4.1: "ResNet-101, which is only pretrained on ImageNet").

Reads a torchvision- or timm-style ResNet state dict and converts it into the variables of
`dilaff_jax.models.resnet.ResNet`:

- ``conv.weight [out, in, kh, kw]`` -> ``kernel [kh, kw, in, out]``;
- BatchNorm ``weight``/``bias`` -> params ``scale``/``bias``, ``running_mean``/``running_var`` -> batch_stats
  ``mean``/``var``;
- module paths map one to one (``layer3.4.conv2`` <-> ``layer3_4/conv2``, ``conv1.0`` <-> ``conv1_0``).

The classifier (``fc.*``) and ``num_batches_tracked`` are ignored. Every other tensor must be present with exactly
the expected shape: a missing key, an unexpected key or a shape mismatch raises `PretrainedWeightsError` naming
them, and a file holding another depth or stem is reported as such. Nothing is silently skipped. A file that cannot
be read (empty, truncated, not a weights file) or holds a NaN or infinite value is refused, naming the file and the
tensor: such weights would otherwise show up later as a diverging training run.

`.safetensors` files are read with the safetensors package (no torch needed); `.pth`/`.pt` files need torch and are
read with ``torch.load(weights_only=True)``, never with a bare pickle load.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dilaff_jax import errors
from dilaff_jax.models.resnet import DEEP_STEM_WIDTHS, LAYOUTS, STEMS, layout, resnet_variable_shapes

IGNORED = re.compile(r"^fc\.|(^|\.)num_batches_tracked$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_UNIT_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


class PretrainedWeightsError(errors.UserError, ValueError):
  """A pretrained weights file that cannot be read, holds non-finite values or does not fit the requested backbone
  (names the file and the offending keys)."""


def load_resnet_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a ResNet state dict from `.safetensors` (no torch needed) or `.pth`/`.pt` (needs torch).

  A checkpoint wrapping its weights as {"state_dict": ...} or {"model": ...} is unwrapped, and a "module." prefix
  on every key (DataParallel) is removed. Floating tensors are returned as float32 numpy arrays.
  """
  path = Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f"pretrained weights file {str(path)!r} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
      state = dict(load_file(str(path)))
    except (SafetensorError, OSError) as e:
      raise PretrainedWeightsError(
          f"cannot read pretrained weights {str(path)!r} ({e}): the file is empty, truncated or not a .safetensors "
          "file; download or convert it again"
      ) from None
  elif suffix in (".pth", ".pt"):
    state = _load_torch(path)
  else:
    raise PretrainedWeightsError(
        f"cannot read pretrained weights {str(path)!r}: expected a .safetensors, .pth or .pt file"
    )
  for wrapper in ("state_dict", "model"):
    if isinstance(state.get(wrapper), Mapping):
      state = dict(state[wrapper])
      break
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  out = {}
  for key, value in state.items():
    if not hasattr(value, "shape"):
      raise PretrainedWeightsError(f"entry {key!r} of {str(path)!r} is not a tensor ({type(value).__name__})")
    value = np.asarray(value)
    if value.dtype.kind == "f":
      value = value.astype(np.float32)
      if not np.all(np.isfinite(value)):
        raise PretrainedWeightsError(
            f"tensor {key!r} of {str(path)!r} holds {np.size(value) - np.count_nonzero(np.isfinite(value))} NaN or "
            "infinite values: the weights are damaged; download or convert them again"
        )
    out[key] = value
  return out


def _load_torch(path: Path) -> dict[str, Any]:
  try:
    import torch
  except ImportError as err:
    raise PretrainedWeightsError(
        f"reading {str(path)!r} needs torch, which is not installed: install torch (pip install torch) and rerun, or "
        "convert the file to .safetensors where torch is installed (python -m dilaff_jax.models.convert)"
    ) from err
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises several types for damaged or foreign files)
    raise PretrainedWeightsError(
        f"cannot read pretrained weights {str(path)!r} ({type(e).__name__}: {e}); download or convert it again"
    ) from None
  if not isinstance(state, Mapping):
    raise PretrainedWeightsError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")

  def to_numpy(value):
    if isinstance(value, Mapping):
      return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
      return value.detach().float().numpy() if value.is_floating_point() else value.detach().numpy()
    return value

  return to_numpy(dict(state))


def _torch_key(path: tuple[str, ...]) -> str:
  """Flax variable path ("layer3_4", "conv2", "kernel") -> torch key "layer3.4.conv2.weight"."""
  modules = [re.sub(r"_(\d+)$", r".\1", name) for name in path[:-1]]
  return ".".join(modules + [_LEAF_TO_TORCH[path[-1]]])


def _describe_layout(state_dict: Mapping[str, Any]) -> str:
  """What a state dict holds, e.g. 'a ResNet-50 (bottleneck units (3, 4, 6, 3)), standard stem'."""
  units = Counter()
  for key in state_dict:
    match = _UNIT_KEY.match(key)
    if match:
      units[int(match.group(1))] = max(units[int(match.group(1))], int(match.group(2)) + 1)
  sizes = tuple(units[i] for i in range(1, 5))
  kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
  depths = [d for d, lay in LAYOUTS.items() if lay == (kind, sizes)]
  name = f"a ResNet-{depths[0]}" if depths else "a ResNet"
  stem = "deep" if "conv1.0.weight" in state_dict else "standard"
  return f"{name} ({kind} units {sizes}), {stem} stem"


def _check_layout(state_dict: Mapping[str, Any], depth: int, stem: str) -> None:
  kind, sizes = layout(depth)
  if stem not in STEMS:
    raise ValueError(f"ResNet stem {stem!r} is not supported; choose one of {STEMS}")
  if not any(_UNIT_KEY.match(k) for k in state_dict):
    shown = _clip(sorted(state_dict), 5)
    raise PretrainedWeightsError(
        f"the state dict is not a ResNet's: it has no residual units ('layer1.0.*' ... keys; its keys: {shown}); "
        "give a torchvision or timm ResNet checkpoint"
    )
  found = _describe_layout(state_dict)
  wanted = f"a ResNet-{depth} ({kind} units {sizes}), {stem} stem"
  if found != wanted:
    raise PretrainedWeightsError(f"the state dict holds {found}, but the model is {wanted} (depth/stem mismatch)")
  if any(".downsample.2." in k for k in state_dict):
    raise PretrainedWeightsError(
        "the state dict uses average-pool downsampling shortcuts (keys '*.downsample.2.*', timm's 'd' variants), "
        "which this ResNet does not have"
    )
  if stem == "deep":
    keys = ("conv1.0.weight", "conv1.3.weight", "conv1.6.weight")
    widths = tuple(np.shape(state_dict[k])[0] for k in keys if k in state_dict)
    if widths != DEEP_STEM_WIDTHS:
      raise PretrainedWeightsError(
          f"deep stem widths {'-'.join(map(str, widths))} in the state dict (conv1.0/conv1.3/conv1.6), but the "
          f"model's deep stem is {'-'.join(map(str, DEEP_STEM_WIDTHS))}"
      )


def torch_resnet_to_flax(state_dict: Mapping[str, Any], depth: int, stem: str = "standard") -> dict[str, dict]:
  """Converts a torchvision/timm ResNet state dict into {"params": ..., "batch_stats": ...} of `ResNet`.

  Raises `PretrainedWeightsError` for another depth or stem, missing or unexpected keys (by name; fc.* and
  num_batches_tracked are ignored) and any tensor whose shape differs from torchvision's for this depth.
  """
  _check_layout(state_dict, depth, stem)
  expected = {
      collection: traverse_util.flatten_dict(tree) for collection, tree in resnet_variable_shapes(depth, stem).items()
  }  # {"params": {path: ShapeDtypeStruct}, "batch_stats": {...}}
  wanted = {_torch_key(path): (collection, path) for collection, flat in expected.items() for path in flat}
  given = {k for k in state_dict if not IGNORED.search(k)}
  missing, unexpected = sorted(set(wanted) - given), sorted(given - set(wanted))
  if missing or unexpected:
    raise PretrainedWeightsError(
        f"state dict does not match a ResNet-{depth} with {stem} stem: "
        f"missing keys {_clip(missing)}; unexpected keys {_clip(unexpected)}"
    )
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  bad = []
  for key, (collection, path) in wanted.items():
    value = np.asarray(state_dict[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    shape = tuple(expected[collection][path].shape)
    if value.shape != shape:
      bad.append(f"{key}: got {tuple(np.shape(state_dict[key]))}, expected {_torch_shape(shape)}")
    out[collection][path] = value
  if bad:
    raise PretrainedWeightsError(f"shape mismatch for ResNet-{depth} ({stem} stem): " + "; ".join(bad))
  return {collection: traverse_util.unflatten_dict(flat) for collection, flat in out.items()}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1]) if len(flax_shape) == 4 else flax_shape


def _clip(keys: list[str], limit: int = 12) -> str:
  if not keys:
    return "none"
  shown = ", ".join(keys[:limit])
  return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_pretrained_backbone(
    variables: Mapping[str, Any], path: str | Path, depth: int, stem: str = "standard"
) -> dict[str, Any]:
  """Returns a copy of a DeepLabV3Plus's `variables` whose "backbone" subtree (params and batch_stats) holds the
  ImageNet weights read from `path`; the ASPP, decoder and heads are left as they were (randomly initialised).

  Raises `PretrainedWeightsError` if any converted tensor's path or shape differs from the model's backbone.
  """
  try:
    converted = torch_resnet_to_flax(load_resnet_state_dict(path), depth, stem)
  except PretrainedWeightsError as e:
    if str(path) in str(e):
      raise
    raise PretrainedWeightsError(f"pretrained weights {str(path)!r}: {e}") from None
  new = {collection: dict(tree) for collection, tree in variables.items()}
  for collection, tree in converted.items():
    if collection not in new or "backbone" not in new[collection]:
      raise PretrainedWeightsError(f"variables have no {collection}['backbone'] subtree to load weights into")
    current = traverse_util.flatten_dict(new[collection]["backbone"])
    loaded = traverse_util.flatten_dict(tree)
    if set(current) != set(loaded):
      only_model = sorted("/".join(p) for p in set(current) - set(loaded))
      only_file = sorted("/".join(p) for p in set(loaded) - set(current))
      raise PretrainedWeightsError(
          f"{collection}['backbone'] does not match a ResNet-{depth} with {stem} stem: variables only in the "
          f"model {_clip(only_model)}; only in the file {_clip(only_file)}"
      )
    bad = [
        f"{'/'.join(p)}: model {tuple(np.shape(current[p]))}, file {loaded[p].shape}"
        for p in sorted(current)
        if tuple(np.shape(current[p])) != loaded[p].shape
    ]
    if bad:
      raise PretrainedWeightsError(f"shape mismatch in {collection}['backbone']: " + "; ".join(bad))
    new[collection]["backbone"] = traverse_util.unflatten_dict(
        {p: jnp.asarray(loaded[p], current[p].dtype) for p in current}
    )
  return new
