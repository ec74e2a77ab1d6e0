"""Replicating a pytree for pmap and taking replica 0 back: same values, nothing compiled, the step compiled once."""

import logging

import jax
import numpy as np

from dilaff_jax.engine import replicas


def compiled_programs(caplog) -> list[str]:
  return [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling ")]


def test_a_step_fed_its_own_outputs_compiles_once_and_replicas_compile_nothing(caplog):
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "n": np.int32(3)}
  step = jax.pmap(lambda t: jax.tree.map(lambda a: a * 2 + 1, t), axis_name="batch", donate_argnums=(0,))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    x = replicas.replicate(tree, axis_name="batch")
    assert compiled_programs(caplog) == []
    for _ in range(3):
      x = step(x)
    first = replicas.first_replica(x)
  assert compiled_programs(caplog) == ["Compiling jit(_fun)"], compiled_programs(caplog)
  assert x["w"].shape == (jax.local_device_count(), 2, 3)
  want = {k: ((v * 2 + 1) * 2 + 1) * 2 + 1 for k, v in tree.items()}
  for key in tree:
    assert isinstance(first[key], np.ndarray) and first[key].dtype == tree[key].dtype
    np.testing.assert_array_equal(first[key], want[key])
    for shard in x[key].addressable_shards:  # every device holds the same values
      np.testing.assert_array_equal(np.asarray(shard.data)[0], want[key])


def test_copies_survive_donation():
  """The caller's arrays and a replica taken earlier keep their values when the device buffers are donated."""
  tree = {"w": np.ones((4, 5), np.float32)}
  step = jax.pmap(lambda t: {"w": t["w"] + 1}, axis_name="batch", donate_argnums=(0,))
  x = replicas.replicate(tree, axis_name="batch")
  x = step(x)
  taken = replicas.first_replica(x)
  for _ in range(2):
    x = step(x)
  np.testing.assert_array_equal(tree["w"], 1)
  np.testing.assert_array_equal(taken["w"], 2)
  np.testing.assert_array_equal(replicas.first_replica(x)["w"], 4)
  one = replicas.replicate(tree, axis_name="batch", devices=jax.local_devices()[:1])
  assert one["w"].shape == (1, 4, 5)
