"""The benchmarks' timer: best wall time of a call, after a warm-up call that compiles."""

import time


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
