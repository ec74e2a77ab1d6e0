"""Test setup, before JAX creates its backend: 8 virtual CPU devices for the multi-device tests.

No persistent compilation cache: full runs of the suite crashed inside XLA while reading or writing it (and once
while compiling without it; see the fixture below), and fewer moving parts make such a crash easier to pin down."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # a user's cache must not leak into the tests either

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with synthetic_shapes/tiny prepared (once per test session)."""
  from dilaff_jax import datasets

  d = str(tmp_path_factory.mktemp("tfds"))
  datasets.get_builder("synthetic_shapes/tiny", data_dir=d)
  return d


@pytest.fixture(autouse=True)
def _collect_garbage_between_tests():
  """Leftovers of a test (an abandoned tf.data pipeline held by a traceback cycle) are destroyed here, between
  tests, and not by the garbage collector in some thread while the next test's XLA compilation runs: the suite
  crashed inside XLA's compiler in the test right after the NaN-loss test, which abandons a running pipeline."""
  yield
  gc.collect()
