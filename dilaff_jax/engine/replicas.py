"""A pytree replicated over this process's devices for ``jax.pmap``, and one replica back on the host, without
compiling anything.

``flax.jax_utils.replicate`` and ``unreplicate`` do the same with a small XLA program per leaf shape (a stack and a
broadcast to replicate, a slice and a squeeze to take replica 0): about 110 programs for the demo's train state,
compiled again by every process that starts a training or an evaluation (measured: 8 of the 24 s a tiny training
takes), and a replicated state whose sharding differs from the step's outputs compiles the step twice (see
:func:`replicate`). Here every device gets its own host copy of each leaf and the replica comes back through the first
addressable shard, so no program is compiled and the values are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def replicate(tree: Any, *, axis_name: str, devices: Sequence[jax.Device] | None = None) -> Any:
  """``tree`` with a leading axis of ``len(devices)`` (default: this process's devices), replica ``d`` on device
  ``d``, sharded exactly as ``jax.pmap(..., axis_name=axis_name)`` shards its inputs and outputs. Every device holds
  its own copy (a donated buffer is never shared with another device or with the caller's arrays).

  The mesh's axis must carry the pmap's ``axis_name``: ``jax.pmap`` (a ``shard_map`` in this JAX) keys its compiled
  program on the inputs' sharding, mesh axis name included, so a state replicated on a differently named mesh (as
  flax's ``replicate`` makes it) compiles the step twice, once for the first call and once for the outputs it feeds
  back (measured on the tiny demo: two compilations of the training step, one with this function)."""
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.array(devices), (axis_name,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

  def one(x):
    host = np.asarray(x)[None]
    shards = [jax.device_put(np.array(host, copy=True), d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + host.shape[1:], sharding, shards)

  return jax.tree.map(one, tree)


def first_replica(tree: Any) -> Any:
  """Replica 0 of a replicated ``tree`` (this process's first device), as host (numpy) copies: they stay valid when
  the device buffers are donated to the next step."""
  return jax.tree.map(lambda x: np.array(x.addressable_data(0), copy=True)[0, ...], tree)  # 0-d leaves stay arrays
