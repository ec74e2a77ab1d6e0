"""Feeding host batches to the local devices: what the training loop and the benchmarks share, without TensorFlow."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

Batch = dict[str, np.ndarray]


def prefetch_to_device(
    batches: Iterator[Batch], size: int = 2, devices: Sequence[Any] | None = None
) -> Iterator[dict[str, Any]]:
  """Puts numeric arrays of ``[D, ...]`` batches on the local devices ahead of use (``size`` batches deep).

  Leading axis ``D`` is split across ``devices`` (default ``jax.local_devices()``, pmap's order); string arrays
  such as ``image_id`` stay numpy arrays on the host.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(devices), ("devices",)), jax.sharding.PartitionSpec("devices")
  )

  def put(batch: Batch) -> dict[str, Any]:
    return {k: v if v.dtype == object else jax.device_put(v, sharding) for k, v in batch.items()}

  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
