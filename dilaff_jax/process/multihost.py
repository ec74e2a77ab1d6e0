"""Multi-host synchronisation of the jobs (``jax.distributed``): a named barrier that is free on one process."""

import jax


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name``; does nothing in a single-process run."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
