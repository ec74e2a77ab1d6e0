"""Start-up validation of a run's configuration: every error names the bad key and what was expected."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from dilaff_jax import errors
from dilaff_jax.method import affinity, propagation
from dilaff_jax.models.deeplab import DeepLabV3Plus


class ConfigError(errors.UserError, ValueError):
  """A configuration value is invalid; the message starts with the dotted key."""


def get(config: ml_collections.ConfigDict, key: str):
  """The value at dotted ``key`` (e.g. ``"affinity.beta"``); :class:`ConfigError` naming it when it is missing."""
  node = config
  for part in key.split("."):
    if part not in node:
      raise ConfigError(f"config.{key}: missing (start from configs/default.py)")
    node = node[part]
  return node


def _fail(key: str, value, expected: str):
  raise ConfigError(f"config.{key} = {value!r}: {expected}")


def _positive_int(config, key):
  v = get(config, key)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    _fail(key, v, "expected a positive integer")
  return v


def _number(config, key, lo=None, hi=None, lo_open=False):
  v = get(config, key)
  if not isinstance(v, (int, float)) or isinstance(v, bool):
    _fail(key, v, "expected a number")
  if lo is not None and (v <= lo if lo_open else v < lo):
    _fail(key, v, f"expected a value {'>' if lo_open else '>='} {lo}")
  if hi is not None and v > hi:
    _fail(key, v, f"expected a value <= {hi}")
  return v


def _int(config, key, lo=None, hi=None):
  """An int (not a bool) in ``[lo, hi]`` (either bound optional)."""
  v = get(config, key)
  if not isinstance(v, int) or isinstance(v, bool):
    _fail(key, v, "expected an integer")
  if lo is not None and v < lo:
    _fail(key, v, f"expected an integer >= {lo}")
  if hi is not None and v > hi:
    _fail(key, v, f"expected an integer <= {hi}")
  return v


def _bool(config, key):
  v = get(config, key)
  if not isinstance(v, bool):
    _fail(key, v, "expected True or False")
  return v


def _text(config, key, optional=False):
  v = get(config, key)
  if not (isinstance(v, str) and (v or optional) or optional and v is None):
    _fail(key, v, "expected a path or name" + (" (or None)" if optional else ""))
  return v


def _choice(config, key, choices):
  v = get(config, key)
  if v not in choices:
    _fail(key, v, f"expected one of {list(choices)}")
  return v


def rates_of(config: ml_collections.ConfigDict) -> affinity.Rates:
  """Explicit rate pairs of ``config.affinity.rates`` (shorthand expanded), or () when affinity is disabled."""
  if not get(config, "affinity.enabled"):
    return ()
  raw = get(config, "affinity.rates")
  if isinstance(raw, str):
    return affinity.parse_rates(raw)
  try:
    return affinity.expand_rates([tuple(r) if isinstance(r, (list, tuple)) else r for r in raw])
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.affinity.rates = {raw!r}: {e}") from None


PRETRAINED_NONE = "none"  # model.pretrained: random init on purpose
MIN_DEPTH_NEEDING_WEIGHTS = 50


def pretrained_path(config: ml_collections.ConfigDict) -> str | None:
  """The weights file of ``model.pretrained``, or None for random init (``"none"``, or ``""`` on small models)."""
  value = get(config, "model.pretrained")
  return None if value in ("", PRETRAINED_NONE) else value


def _check_pretrained(config: ml_collections.ConfigDict) -> None:
  """ResNet-50 and deeper need ImageNet weights (the paper's backbone is pretrained: training from random init
  costs tens of mIoU points), or an explicit ``"none"``; a named file must be readable."""
  value = get(config, "model.pretrained")
  depth = get(config, "model.depth")
  how = (
      "give a torchvision/timm ResNet .safetensors or .pth file (python -m dilaff_jax.models.convert checks and makes "
      f'one), or "{PRETRAINED_NONE}" to train from random init on purpose'
  )
  if not isinstance(value, str):
    _fail("model.pretrained", value, f'expected a file path or "{PRETRAINED_NONE}"')
  if value == "" and depth >= MIN_DEPTH_NEEDING_WEIGHTS and init_from(config) is None:
    _fail(
        "model.pretrained",
        value,
        f"ResNet-{depth} needs ImageNet weights (the paper's backbone is "
        f"ImageNet-pretrained; random init costs tens of mIoU points): {how}",
    )
  path = pretrained_path(config)
  if path is not None and not os.path.isfile(path):
    _fail("model.pretrained", value, f"no such file: {how}")
  if path is not None and not os.access(path, os.R_OK):
    _fail("model.pretrained", value, "the file is not readable (check its permissions)")


def init_from(config: ml_collections.ConfigDict) -> tuple[str, int | None] | None:
  """``(workdir, step or None for its newest checkpoint)`` of ``train.init_from=WORKDIR[:STEP]``; None when unset
  (or absent, in the config.json of older runs)."""
  value = config.train.get("init_from", "")
  if value in ("", None):
    return None
  if not isinstance(value, str):
    _fail("train.init_from", value, "expected WORKDIR or WORKDIR:STEP of a training run")
  workdir, sep, step = value.rpartition(":")
  if sep and step.isdigit():
    return workdir, int(step)
  return value, None


def _check_init_from(config: ml_collections.ConfigDict) -> None:
  """``train.init_from`` names a workdir with a ``config.json`` and checkpoints (the checkpoint itself is verified
  when it is restored)."""
  source = init_from(config)
  if source is None:
    return
  workdir, _ = source
  value = get(config, "train.init_from")
  how = "give WORKDIR or WORKDIR:STEP of a finished training run (python -m dilaff_jax.main --mode=train)"
  if not os.path.isdir(workdir):
    _fail("train.init_from", value, f"no such folder {workdir!r}: {how}")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    _fail("train.init_from", value, f"{workdir!r} has no config.json (not a training workdir?): {how}")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    _fail("train.init_from", value, f"{workdir!r} has no checkpoints folder: {how}")


STRUCTURE_KINDS = ("none", "aaf", "boundary")


def propagation_reading(config: ml_collections.ConfigDict) -> str:
  """``config.affinity.propagation_reading``; ``"paper"`` for a config without the key (older runs)."""
  return config.affinity.get("propagation_reading", "paper")


def structure_kind(config: ml_collections.ConfigDict) -> str:
  """``config.structure.kind``; ``"none"`` for a config without the section (the ``config.json`` of older runs)."""
  return get(config, "structure.kind") if "structure" in config else "none"


def _check_structure(config) -> None:
  """``structure.*``: the AAF / boundary-reweighting losses of Table 5 (only the chosen kind's keys are read)."""
  if "structure" not in config:
    return
  kind = _choice(config, "structure.kind", STRUCTURE_KINDS)
  if kind == "aaf":
    _number(config, "structure.aaf_weight", 0)
    _number(config, "structure.aaf_margin", 0, lo_open=True)
    _bool(config, "structure.aaf_decay")
    dil = get(config, "structure.aaf_dilations")
    if (
        not isinstance(dil, (list, tuple))
        or not dil
        or len(set(dil)) != len(dil)
        or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dil)
    ):
      _fail("structure.aaf_dilations", dil, "expected distinct positive ints, e.g. (1, 2, 3) for 3x3/5x5/7x7 fields")
  elif kind == "boundary":
    _number(config, "structure.boundary_w0", 0)
    _number(config, "structure.boundary_sigma", 0, lo_open=True)
    _bool(config, "structure.boundary_class_balance")
    bg = get(config, "structure.boundary_background")
    if not isinstance(bg, int) or isinstance(bg, bool) or not -1 <= bg < get(config, "dataset.num_classes"):
      _fail("structure.boundary_background", bg, "expected a class index, or -1 when no class is background")


# Keys that older versions wrote into a run's config.json and that no longer exist. None of them changed what a run
# computed, so a run's config.json that has them is read without them.
RETIRED_KEYS = ("model.eval_output_stride",)  # never read: evaluation always used eval.output_stride


def _lists_to_tuples(x):
  if isinstance(x, dict):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x


def read_json_config(path: str) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A run's recorded ``config.json`` as a config (raises ``OSError`` or ``ValueError``): JSON turned the config's
  tuples into lists, they are tuples again, as in the config files (so that ``--config.eval.scales='(0.5, 1.0)'``
  overrides work); the :data:`RETIRED_KEYS` older versions wrote are dropped and returned."""
  with open(path) as f:
    config = ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))
  return config, drop_retired_keys(config)


def drop_retired_keys(config: ml_collections.ConfigDict) -> list[str]:
  """Removes :data:`RETIRED_KEYS` (``section.key``) from ``config`` (in place); returns the keys it removed."""
  dropped = []
  for key in RETIRED_KEYS:
    section, name = key.split(".")
    node = config.get(section)
    if isinstance(node, ml_collections.ConfigDict) and name in node:
      with node.unlocked():
        del node[name]
      dropped.append(key)
  return dropped


#: ``config.model`` keys that are not :class:`DeepLabV3Plus` fields (read by training and the weights loader); every
#: other key of ``config.model`` is a field, passed on by ``state.build_model``.
NOT_MODEL_FIELDS = ("train_output_stride", "pretrained")


def model_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(DeepLabV3Plus)}


def check_model_keys(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` for a ``config.model`` key that is neither a model field nor in
  :data:`NOT_MODEL_FIELDS`."""
  known = model_fields() | set(NOT_MODEL_FIELDS)
  for key in sorted(get(config, "model")):
    if key not in known:
      raise ConfigError(
          f"config.model.{key}: no such key (the model's keys are the fields of DeepLabV3Plus and "
          f"{', '.join(NOT_MODEL_FIELDS)}; see configs/default.py)"
      )


def validate(config: ml_collections.ConfigDict, *, num_devices: int, mode: str = "train") -> None:
  """Raises :class:`ConfigError` naming the first bad key. ``num_devices`` is the global device count."""
  _int(config, "seed", 0)
  _positive_int(config, "dataset.num_classes")
  _dataset(config)
  ign = get(config, "dataset.ignore_label")
  if not isinstance(ign, int) or not 0 <= ign <= 255:
    _fail("dataset.ignore_label", ign, "expected an int in [0, 255] (labels are stored as uint8)")
  if ign < get(config, "dataset.num_classes"):
    _fail("dataset.ignore_label", ign, "must not be a class index (< dataset.num_classes)")
  crop = _positive_int(config, "dataset.crop_size")
  lo = _number(config, "dataset.min_scale", 0, lo_open=True)
  hi = _number(config, "dataset.max_scale", 0, lo_open=True)
  if hi < lo:
    _fail("dataset.max_scale", hi, f"must be >= dataset.min_scale ({lo})")
  _number(config, "dataset.scale_step", 0)
  for key in ("dataset.mean", "dataset.std"):
    v = get(config, key)
    if len(tuple(v)) != 3:
      _fail(key, v, "expected 3 values (RGB, 0-255 scale)")
  if any(s <= 0 for s in get(config, "dataset.std")):
    _fail("dataset.std", get(config, "dataset.std"), "every value must be > 0")
  pad = get(config, "dataset.eval_pad_size")
  if pad is not None and (
      not isinstance(pad, (tuple, list))
      or len(pad) != 2
      or any(not isinstance(p, int) or isinstance(p, bool) or p <= 0 for p in pad)
  ):
    _fail(
        "dataset.eval_pad_size",
        pad,
        "expected (height, width), two positive ints, or None for the largest " "evaluation image",
    )

  max_size = config.dataset.get("eval_max_size", 0)  # absent from the config.json of older runs
  if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 0:
    _fail("dataset.eval_max_size", max_size, "expected 0 (no limit) or a positive number of pixels")

  check_model_keys(config)
  _choice(config, "model.depth", (18, 34, 50, 101, 152))
  _choice(config, "model.stem", ("standard", "deep"))
  units = {18: 2, 34: 3, 50: 3, 101: 3, 152: 3}[get(config, "model.depth")]
  grid = get(config, "model.multi_grid")
  if grid is not None and (len(tuple(grid)) != units or any(not isinstance(g, int) or g < 1 for g in grid)):
    _fail(
        "model.multi_grid",
        grid,
        f"expected {units} positive ints (one per unit of the last stage of "
        f"ResNet-{get(config, 'model.depth')}), or None",
    )
  for key in ("model.train_output_stride", "eval.output_stride"):
    _choice(config, key, (8, 16, 32))
  os_train = get(config, "model.train_output_stride")
  if (crop - 1) % os_train:
    _fail(
        "dataset.crop_size",
        crop,
        f"must be k*{os_train}+1 for output stride {os_train} "
        f"(DeepLab's aligned sizes, e.g. {os_train * ((crop - 1) // os_train) + 1} or "
        f"{os_train * ((crop - 1) // os_train + 1) + 1})",
    )
  _choice(config, "model.dtype", ("float32", "bfloat16", "float16"))
  _number(config, "model.dropout_rate", 0, 1)
  _number(config, "model.bn_momentum", 0, 1)
  _number(config, "model.bn_epsilon", 0, lo_open=True)
  for key in ("model.aspp_channels", "model.low_level_channels", "model.decoder_channels"):
    _positive_int(config, key)
  if mode == "train":
    _check_pretrained(config)
    _check_init_from(config)

  if get(config, "affinity.enabled"):
    rates = rates_of(config)
    if not rates:
      _fail(
          "affinity.rates",
          get(config, "affinity.rates"),
          "empty: give at least one rate or set " "affinity.enabled=False for the baseline",
      )
    _choice(config, "affinity.scheme", affinity.SCHEMES)
    _number(config, "affinity.beta", 0)
    _number(config, "affinity.gamma", 0)
    _choice(config, "affinity.partial_neighbors", affinity.PARTIAL_NEIGHBORS)
    if get(config, "affinity.max_weight") is not None:
      _number(config, "affinity.max_weight", 1)
  _check_structure(config)
  _number(config, "affinity.lam", 0)
  _number(config, "affinity.mu", 1, lo_open=True)
  if "propagation_reading" in config.affinity:  # absent from the config.json of older runs: "paper"
    _choice(config, "affinity.propagation_reading", propagation.READINGS)
  _int(config, "affinity.iterations", 0)
  _int(config, "affinity.stats_max_images", 0)
  its = get(config, "eval.iterations")
  if not all(isinstance(i, int) and i >= 0 for i in its):
    _fail("eval.iterations", its, "expected non-negative integers")

  batch = _positive_int(config, "train.batch_size")
  if batch % num_devices:
    _fail("train.batch_size", batch, f"must be divisible by the number of devices ({num_devices})")
  eval_batch = _positive_int(config, "eval.batch_size")
  if eval_batch % num_devices:
    _fail("eval.batch_size", eval_batch, f"must be divisible by the number of devices ({num_devices})")
  steps = _positive_int(config, "train.num_steps")
  if _int(config, "train.warmup_steps", 0) >= steps:
    _fail("train.warmup_steps", get(config, "train.warmup_steps"), f"must be < train.num_steps ({steps})")
  lr = _number(config, "train.learning_rate", 0, lo_open=True)
  _number(config, "train.end_learning_rate", 0, lr)
  _int(config, "train.image_summary_every", 0)
  for key in ("eval_every", "eval_max_images"):  # absent from the config.json of older runs (never validated)
    if key in config.train:
      _int(config, f"train.{key}", 0)
  if "validation_split" in config.train:
    _text(config, "train.validation_split", optional=True)
  _number(config, "train.lr_power", 0)
  _number(config, "train.momentum", 0, 1)
  _number(config, "train.weight_decay", 0)
  for key in ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints"):
    _positive_int(config, key)
  scales = get(config, "eval.scales")
  if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
    _fail("eval.scales", scales, "expected a non-empty list of positive scales")
  if get(config, "affinity.enabled") and 1.0 not in tuple(scales):
    _fail(
        "eval.scales",
        scales,
        "must include 1.0 when affinity is enabled: propagation uses the affinity of the "
        "scale-1.0 passes only (a rate r at scale s spans r/s pixels, so scales are never mixed)",
    )
  _int(config, "eval.max_images", 0)
  for key in ("model.separable", "train.eval_at_end", "eval.flip", "eval.ground_truth_oracle", "eval.crf"):
    _bool(config, key)
  if get(config, "eval.crf"):
    from dilaff_jax.engine import crf  # noqa: PLC0415

    if not crf.available():  # at start-up, not after a training
      _fail("eval.crf", True, crf.MISSING_MESSAGE)
    _positive_int(config, "eval.crf_iterations")
    for key in (
        "eval.crf_sxy_gaussian",
        "eval.crf_compat_gaussian",
        "eval.crf_sxy_bilateral",
        "eval.crf_srgb",
        "eval.crf_compat_bilateral",
    ):
      _number(config, key, 0, lo_open=True)
  _choice(config, "distributed.initialize", ("auto", "yes", "no"))
  _int(config, "distributed.num_processes", 0)
  _int(config, "distributed.process_id", -1)


def _dataset(config: ml_collections.ConfigDict) -> None:
  """``dataset.name`` is one of this project's datasets and ``dataset.num_classes`` is its number of classes
  (checked before anything is prepared or written: the class names are constants of the builders)."""
  from dilaff_jax import datasets  # loads TensorFlow Datasets: only once a run is really starting

  name = _text(config, "dataset.name")
  for key in ("dataset.train_split", "dataset.eval_split"):
    _text(config, key)
  for key in ("dataset.data_dir", "dataset.manual_dir"):
    _text(config, key, optional=True)
  try:
    names = datasets.dataset_class_names(name)
  except errors.UserError:
    _fail("dataset.name", name, f"not one of this project's datasets ({', '.join(datasets.known_names())})")
  n = get(config, "dataset.num_classes")
  if names is not None and n != len(names):  # image_folder: checked against the folder's classes.txt at start
    _fail("dataset.num_classes", n, f"{name} has {len(names)} classes ({', '.join(names)})")
