r"""Converts a torchvision or timm ResNet checkpoint into the ImageNet-weights file that ``config.model.pretrained``
reads, checked against the model's ResNet.

  python -m dilaff_jax.models.convert --input=resnet101.pth --output=resnet101.safetensors --depth=101
  python -m dilaff_jax.models.convert --input=resnet50_timm.safetensors --output=resnet50.safetensors --depth=50

Input: a ResNet state dict as ``.pth``/``.pt`` (needs torch; read with ``torch.load(weights_only=True)``) or
``.safetensors`` (no torch needed), possibly wrapped as ``{"state_dict": ...}`` / ``{"model": ...}`` or with a
DataParallel ``module.`` prefix; ``--stem=deep`` for timm's ``conv1.0 ... conv1.6`` stem of widths 64-64-128.
Output: a ``.safetensors`` file with exactly the backbone's tensors, in torchvision's names and layout, as float32
(the ``fc.*`` classifier and ``num_batches_tracked`` counters are dropped), after every key and shape was checked
against the ResNet of ``--depth`` and ``--stem``; its metadata records the depth, the stem and the source file. A
file of another depth or stem, a file that is not a ResNet state dict, a NaN in it, or an output that cannot be
written ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from dilaff_jax import errors
from dilaff_jax.models import pretrained
from dilaff_jax.models.resnet import LAYOUTS, STEMS
from dilaff_jax.process import cli, files

FORMAT = "dilaff_jax.resnet/1"


class ConvertError(errors.UserError, ValueError):
  """Bad input to the conversion; the message names the flag or file at fault."""


def backbone_state_dict(state_dict: dict[str, np.ndarray], depth: int, stem: str) -> dict[str, np.ndarray]:
  """The state dict's backbone tensors as contiguous float32 arrays under their torchvision names, after checking
  every key and shape against the ResNet of ``depth`` and ``stem`` (:class:`pretrained.PretrainedWeightsError`
  otherwise); ``fc.*`` and ``num_batches_tracked`` are left out."""
  pretrained.torch_resnet_to_flax(state_dict, depth, stem)  # raises on any key or shape that does not fit
  return {
      key: np.ascontiguousarray(np.asarray(value, np.float32))
      for key, value in sorted(state_dict.items())
      if not pretrained.IGNORED.search(key)
  }


def check_paths(source: str, output: str) -> None:
  """Fails before reading when the output is not a ``.safetensors`` file that can be written beside the input."""
  if not output.lower().endswith(".safetensors"):
    raise ConvertError(f"--output={output}: the output is a .safetensors file (e.g. --output=resnet101.safetensors)")
  if os.path.isdir(output):
    raise ConvertError(f"--output={output} is a folder: give a file name ending in .safetensors")
  if os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
    raise ConvertError(f"--output={output} is the input file: give another name")
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise ConvertError(f"--output={output}: the folder {parent} does not exist")


def convert(source: str, output: str, depth: int, stem: str = "standard") -> dict:
  """Reads ``source``, checks it against the ResNet of ``depth``/``stem``, writes ``output`` atomically; returns
  a summary (tensors, parameters, dropped keys, bytes)."""
  if depth not in LAYOUTS:
    raise ConvertError(f"--depth={depth}: not a supported ResNet depth; choose one of {sorted(LAYOUTS)}")
  if stem not in STEMS:
    raise ConvertError(f"--stem={stem}: choose one of {', '.join(STEMS)}")
  check_paths(source, output)
  state_dict = pretrained.load_resnet_state_dict(source)
  try:
    tensors = backbone_state_dict(state_dict, depth, stem)
  except pretrained.PretrainedWeightsError as e:
    raise pretrained.PretrainedWeightsError(f"--input={source}: {e}") from None
  from safetensors.numpy import save

  metadata = {"format": FORMAT, "depth": str(depth), "stem": stem, "source": os.path.basename(source)}
  blob = save(tensors, metadata=metadata)
  files.write_atomic(output, blob)
  return {
      "tensors": len(tensors),
      "dropped": sorted(set(state_dict) - set(tensors)),
      "parameters": int(sum(v.size for k, v in tensors.items() if not k.endswith(("running_mean", "running_var")))),
      "bytes": len(blob),
  }


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
      "input", None, "torchvision/timm ResNet state dict: .pth, .pt (needs torch) or .safetensors", flag_values=fv
  )
  flags.DEFINE_string("output", None, "the .safetensors file to write", flag_values=fv)
  flags.DEFINE_integer(
      "depth", None, f"ResNet depth of the checkpoint: {', '.join(map(str, sorted(LAYOUTS)))}", flag_values=fv
  )
  flags.DEFINE_enum(
      "stem", "standard", list(STEMS), "standard (7x7) or deep (3x3 x3, timm's conv1.0..6)", flag_values=fv
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry; returns the exit status (2 for bad input, with one ``error:`` line on stderr)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = cli.parse_flags(
        _define_flags, argv, "dilaff_jax.models.convert", __doc__, required=("input", "output", "depth")
    )
    if args is None:  # --help
      return 0
    summary = convert(args.input, args.output, args.depth, args.stem)
  except errors.UserError as e:
    if cli.wants_traceback():
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR
  dropped = (
      f"; dropped {len(summary['dropped'])} ({', '.join(summary['dropped'][:4])}"
      + (" ...)" if len(summary["dropped"]) > 4 else ")")
      if summary["dropped"]
      else ""
  )
  print(
      f"[convert] ResNet-{args.depth} ({args.stem} stem) from {args.input}: {summary['tensors']} tensors, "
      f"{summary['parameters']:,} parameters{dropped} -> {args.output} ({summary['bytes'] / 2**20:.1f} MiB); "
      f"train with --config.model.pretrained={args.output}",
      flush=True,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
