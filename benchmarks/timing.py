"""The benchmarks' timers: the best wall time of one call, and several calls timed in interleaved rounds."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence


def _wait(out):
  try:
    import jax  # noqa: PLC0415  (a benchmark of host-only code runs without JAX)
  except ImportError:
    return out
  return jax.block_until_ready(out)


def best_of(fn, repeats: int) -> float:
  """Seconds of the fastest of ``repeats`` calls of ``fn()`` (JAX results waited for), after one warm-up call."""
  _wait(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    _wait(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def interleaved(cases: Mapping[str, Callable[[], object]], rounds: int, log=None) -> dict[str, list[float]]:
  """Seconds of every call of each case: one untimed warm-up call each (compiles, first touches), then ``rounds``
  rounds of one call of every case in turn (A, B, C, A, B, C, ...), so that a change in the machine's load falls
  on all cases alike and a ratio of two cases taken round by round is a same-moment ratio. ``log(message)`` gets a
  line per round."""
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  for fn in cases.values():
    _wait(fn())
  times = {name: [] for name in cases}
  for r in range(rounds):
    for name, fn in cases.items():
      start = time.perf_counter()
      _wait(fn())
      times[name].append(time.perf_counter() - start)
    if log is not None:
      log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * t[-1]:.1f} ms" for n, t in times.items()))
  return times


def per_round(fn: Callable[..., float], *series: list[float]) -> list[float]:
  """``fn`` applied round by round to series of :func:`interleaved` (e.g. a ratio of two cases' times)."""
  return [fn(*values) for values in zip(*series)]


def best_and_median(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
  """``"best (median)"`` of ``values`` times ``scale``, e.g. ``"3.45 (3.61)"``; best is the minimum."""
  return f"{scale * min(values):.{digits}f} ({scale * statistics.median(values):.{digits}f})"


def pin_threads(argv: Sequence[str]) -> int | None:
  """``--threads=N`` (or ``--threads N``): this process runs on its first N allowed cores, set before JAX starts
  (XLA:CPU sizes its thread pool from the cores the process may use) and passed to PyTorch's
  ``set_num_threads`` for its peers, so both frameworks compute with N threads. None: every allowed core."""
  for i, arg in enumerate(argv):
    if arg.startswith("--threads"):
      value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
      if not value.isdigit() or int(value) < 1:
        user_error(f"--threads={value!r}: expected a positive integer")
      allowed = sorted(os.sched_getaffinity(0))
      if int(value) > len(allowed):
        user_error(f"--threads={value}: this process may use {len(allowed)} core(s)")
      os.sched_setaffinity(0, allowed[: int(value)])
      return int(value)
  return None


def user_error(message: str) -> None:
  """A mistake in a benchmark's arguments: one ``error: ...`` line on stderr and exit status 2, as the jobs do."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(2)
