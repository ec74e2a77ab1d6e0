"""Test setup, before JAX creates its backend: 8 virtual CPU devices for the multi-device tests, a persistent
compilation cache private to this run, and JAX's in-memory caches emptied after every test (see the fixture below)."""

import atexit
import gc
import os
import shutil
import tempfile

from dilaff_jax.process import tf_env  # noqa: E402

tf_env.set_defaults()  # before anything loads TensorFlow

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
# Compiling dominates the suite's time and most tests compile the same tiny programs (the tiny demo's training step
# above all, in-process and in the command-line tests' subprocesses, which inherit the variable). A cache private to
# this run, empty at its start and removed at its end, compiles each program once (measured: a tiny training run in
# 42 s against 120-130 s). A user's own cache is never read. The first process of the run (pytest, or
# pytest-xdist's controller) makes it and removes it at exit; the workers it starts inherit it through the
# environment, so a program compiled by one worker is not compiled again by the other. A size limit turns on JAX's
# cache eviction and with it a file lock around every read and write of the folder (the filelock package): without
# it JAX writes entries in place, and a reader in another process could get half a file.
_XLA_CACHE = os.environ.get("DILAFF_TESTS_XLA_CACHE")
if _XLA_CACHE is None:
  _XLA_CACHE = tempfile.mkdtemp(prefix="dilaff-tests-xla-cache-")
  os.environ["DILAFF_TESTS_XLA_CACHE"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(64 << 30)

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


_PEAK_MAPPINGS = [0]


def _mappings() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


# Well below Linux's 65,530, with room for the largest single test's growth (a training test adds about 3,400).
_MAPPINGS_BEFORE_CLEARING = 16_000


@pytest.fixture(autouse=True)
def _free_compiled_code_between_tests():
  """Every compiled XLA executable keeps its machine code in memory mappings while JAX's caches hold it: a training
  test adds about 3,400 of them. Without this fixture the count grows toward Linux's limit of 65,530 mappings per
  process (``vm.max_map_count``) over the suite, and five full runs crashed inside XLA's compiler (segfault or
  abort) in a training test's first compile, always late in the suite, never when the test ran alone: an mmap
  refused at that limit. Emptying the caches frees the code (measured: 5,209 mappings back to 1,387). They are
  emptied once the count passes ``_MAPPINGS_BEFORE_CLEARING``, not after every test: the unit tests that run JAX
  operations one by one then share the small programs they compile (measured: tests/test_affinity.py in 88 s with
  the caches emptied after every test, 29 s this way). The peak is printed at the end of the run."""
  yield
  count = _mappings()
  _PEAK_MAPPINGS[0] = max(_PEAK_MAPPINGS[0], count)
  if count > _MAPPINGS_BEFORE_CLEARING:
    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session):
  """A pytest-xdist worker hands its peak to the controller (``pytest_testnodedown``)."""
  if hasattr(session.config, "workeroutput"):
    session.config.workeroutput["peak_mappings"] = _PEAK_MAPPINGS[0]


class _WorkersPeaks:
  """pytest-xdist's controller side: the largest peak any worker reported."""

  def pytest_testnodedown(self, node, error):
    del error
    _PEAK_MAPPINGS[0] = max(_PEAK_MAPPINGS[0], getattr(node, "workeroutput", {}).get("peak_mappings", 0))


def pytest_configure(config):
  if config.pluginmanager.hasplugin("xdist"):  # the hook exists only with the plugin
    config.pluginmanager.register(_WorkersPeaks())


def pytest_terminal_summary(terminalreporter):
  if _PEAK_MAPPINGS[0]:
    terminalreporter.write_line(
        f"peak memory mappings of the test process: {_PEAK_MAPPINGS[0]} (Linux's default "
        "limit vm.max_map_count: 65530)"
    )
