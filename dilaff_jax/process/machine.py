"""What a run's last bits depend on besides its code, config and seed: the CPU and the JAX build.

XLA:CPU compiles for the instruction set of the CPU it runs on (AVX-512 where there is one, AVX2 where not), and
a different vector width sums in a different order. A run is bit for bit the same on the same kind of CPU with the
same jaxlib, but not across kinds, and 1000 steps from scratch amplify the last bits into points of mIoU: the
reproduction study's `default_fresh` seed 5 scored 76.44% on one machine and 82.69% on another (docs/reproduction.md).
:func:`describe` names the machine so that a run records where it was computed and a study can say when a resumed
or retrained run moved to another kind of CPU. It reads ``/proc/cpuinfo`` (Linux) and the installed packages'
metadata; it imports no JAX.
"""

from __future__ import annotations

import importlib.metadata
import platform

# The CPU flags that change what XLA:CPU's LLVM backend emits (vector width, fused multiply-add).
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
)


def _cpuinfo(path: str) -> tuple[str, list[str]]:
  """The first processor's model name and its ISA flags (of :data:`ISA_FLAGS`) in ``path``; ("", []) unreadable."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return "", []
  model, flags = "", []
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      continue
    key = key.strip()
    if key in ("model name", "Processor", "CPU part") and not model:
      model = value.strip()
    elif key in ("flags", "Features") and not flags:
      present = set(value.split())
      flags = [f for f in ISA_FLAGS if f in present]
  return model, flags


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return ""


def describe(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
  """``{"cpu": model name, "isa": [flags], "arch": machine, "jaxlib": version}``: equal dicts mean the same last
  bits for the same run (as far as the CPU and the JAX build decide them)."""
  model, flags = _cpuinfo(cpuinfo)
  return {
      "cpu": model or platform.processor() or "unknown",
      "isa": flags,
      "arch": platform.machine(),
      "jaxlib": _version("jaxlib"),
  }


def _show(value: object) -> str:
  if value is None:
    return "?"
  if isinstance(value, list):
    return "+".join(map(str, value)) or "none"
  return str(value)


def difference(before: dict, after: dict) -> str:
  """A short text naming what differs between two :func:`describe` dicts ("" when they agree or ``before`` is
  empty, as in a run recorded before machines were)."""
  if not before:
    return ""
  parts = []
  for key in ("cpu", "isa", "arch", "jaxlib"):
    a, b = before.get(key), after.get(key)
    if a != b:
      parts.append(f"{key} {_show(a)} -> {_show(b)}")
  return ", ".join(parts)
