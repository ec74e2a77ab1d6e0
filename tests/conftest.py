"""Test setup, before JAX creates its backend: 8 virtual CPU devices for the multi-device tests, and a persistent
compilation cache shared by the tests and the subprocesses they start (the same programs compile once per run)."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
# One cache per test session (removed at exit): shared with the subprocesses the tests start, never with other
# sessions, so that an entry left half-written by a killed run can never be read (XLA aborts on it).
_CACHE = tempfile.mkdtemp(prefix="dilaff_jax_test_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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
