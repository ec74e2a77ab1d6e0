"""Test setup, before JAX creates its backend: 8 virtual CPU devices for the multi-device tests, and a persistent
compilation cache shared by the tests and the subprocesses they start (the same programs compile once per run)."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dilaff_jax_test_cache"))
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
