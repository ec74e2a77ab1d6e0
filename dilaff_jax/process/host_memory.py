"""Host memory for XLA:CPU: keep freed buffers for reuse instead of handing them back to the kernel every step.

XLA:CPU's fused kernels (YNNPACK) ``malloc`` and ``free`` their working buffers (hundreds of KB to tens of MB) on
every call, from the runtime's worker threads. With glibc's defaults many of those buffers come back from the
kernel afresh every step (mapped on their own, or trimmed from a heap when freed), so every step faults their
pages in again and the kernel zeroes each one: on a training step of a ResNet-50 DeepLabv3+ (crop 97, batch 8, 2
cores) about 376,000 page faults and 1.3 s of system time per 3.6 s step. :func:`reuse_freed_memory` tells glibc
to serve every thread from one arena that is never trimmed and never to map a buffer on its own, so that the
buffers of one step serve the next: most steps then fault no page, a few fault in bursts (measured over 20 steps:
about 15,000 faults per step on average, 0.04x; docs/performance.md, benchmarks/host_memory.py). Results are the
same bit for bit (only where the bytes live changes); the process's resident memory no longer shrinks after a peak.

The command-line jobs call it at start-up, before JAX starts its backend (threads that already exist keep their
arenas). ``DILAFF_REUSE_FREED_MEMORY=0`` turns it off. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

from dilaff_jax import errors

ENV = "DILAFF_REUSE_FREED_MEMORY"

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread in the main arena: no 64 MiB heaps, a buffer freed by one serves any other
    (_M_MMAP_MAX, 0),  # no mapping of its own for a large buffer: large ones come from the arena too
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never give the arena's free top back (mallopt takes a C int)
)


def reuse_freed_memory(environ=None) -> bool:
  """Applies the glibc settings above to this process; True if they were applied.

  False (nothing changed) where the C library is not glibc or ``DILAFF_REUSE_FREED_MEMORY=0`` is set; any value
  other than 0 or 1 raises :class:`errors.UserError`.
  """
  environ = os.environ if environ is None else environ
  value = environ.get(ENV, "").strip()
  if value not in ("", "0", "1"):
    raise errors.UserError(f"{ENV}={value!r}: expected 0 (glibc's defaults) or 1 (reuse freed memory, the default)")
  if value == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
