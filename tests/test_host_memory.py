"""host_memory.reuse_freed_memory: a buffer freed by a worker thread is reused, not page-faulted in afresh."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import cli_helpers
from dilaff_jax import errors
from dilaff_jax.process import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 80 << 20
PAGES = SIZE // 4096  # per round

# A worker thread mallocs, fills and frees an 80 MiB buffer 20 times (as XLA:CPU's kernels do with their working
# buffers every step) and prints the page faults of the last 19 rounds. With glibc's defaults the buffer is mapped
# afresh every round: its threshold for giving a buffer a mapping of its own adapts to the sizes a program frees,
# but only up to 32 MiB. A worker thread's own arena cannot keep it either: its heaps hold at most 64 MiB, and
# a larger buffer is mapped on its own whatever the settings, so all threads must share the main arena.
CHURN = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from dilaff_jax.process import host_memory
    print(host_memory.reuse_freed_memory(), flush=True)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    faults = []
    def churn():
      for i in range(20):
        if i == 1:
          faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        p = libc.malloc(SIZE)
        ctypes.memset(p, 1, SIZE)
        libc.free(p)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    t = threading.Thread(target=churn)
    t.start(); t.join()
    print(faults[1] - faults[0])
    """)


def churn_faults(env_value: str | None) -> tuple[bool, int]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != host_memory.ENV}
  if env_value is not None:
    env[host_memory.ENV] = env_value
  env["PYTHONPATH"] = ROOT
  out = subprocess.run(
      [sys.executable, "-c", f"SIZE = {SIZE}\n{CHURN}"], env=env, capture_output=True, text=True, check=True
  ).stdout
  applied, faults = out.split()
  return applied == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (mallopt)")
def test_freed_buffers_are_reused_not_faulted_in_again():
  applied, faults = churn_faults(None)
  assert applied
  assert faults < PAGES // 4  # 19 rounds of 20,480 pages each, reused: next to nothing


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (mallopt)")
def test_turned_off_every_round_faults_its_pages_in():
  applied, faults = churn_faults("0")
  assert not applied
  assert faults > 19 * PAGES * 0.9  # glibc's own behaviour: a fresh mmap per buffer


# Three training steps of the tiny demo model (with the affinity head) on a fixed batch, in a process of their own;
# prints whether the setting was applied and a digest of the parameters, batch statistics and losses.
STEPS = textwrap.dedent("""
    import functools, hashlib
    from dilaff_jax.process import host_memory
    applied = host_memory.reuse_freed_memory()
    import jax, numpy as np
    from configs import synthetic
    from dilaff_jax.engine import replicas, run_spec, train_state as state_lib, train_step as step_lib
    from dilaff_jax.method import affinity
    from dilaff_jax.method.neighbour_stats import AffinityStats
    config = synthetic.get_config("tiny")
    spec = run_spec.derive(config)
    rates = spec.rates
    freq = np.tile(np.linspace(1.0, 9.0, affinity.NUM_CATEGORIES), (len(rates), 1))
    stats = AffinityStats(rates, freq / freq.sum(1, keepdims=True), np.full(len(rates), 0.9))
    model = state_lib.build_model(spec, affinity.prior_bias(stats.pos_freq))
    device = jax.local_devices()[:1]
    state = state_lib.create_train_state(spec, model, jax.random.key(0))
    state = replicas.replicate(state, axis_name=state_lib.AXIS, devices=device)
    step = step_lib.make_train_step(spec, stats, state_lib.learning_rate_schedule(config))
    p_step = jax.pmap(step, axis_name=state_lib.AXIS, in_axes=(0, 0, None), devices=device)
    rng = np.random.default_rng(0)
    crop, b = config.dataset.crop_size, config.train.batch_size
    batch = {"image": rng.normal(size=(1, b, crop, crop, 3)).astype(np.float32),
             "label": rng.integers(0, config.dataset.num_classes, size=(1, b, crop, crop)).astype(np.int32)}
    digest = hashlib.sha256()
    for i in range(3):
      state, metrics = p_step(state, batch, jax.random.key(1))
      digest.update(np.float32(metrics.unreplicate().loss.compute()).tobytes())
    for leaf in jax.tree.leaves((state.params, state.batch_stats)):
      digest.update(np.asarray(leaf).tobytes())
    print(applied, digest.hexdigest())
    """)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (mallopt)")
def test_training_steps_are_the_same_bit_for_bit_with_and_without():
  runs = {}
  for value in ("0", "1"):  # one after the other: the second loads the first's compiled step from the suite's cache
    proc = subprocess.run(
        [sys.executable, "-c", STEPS],
        env=dict(os.environ, PYTHONPATH=ROOT, **{host_memory.ENV: value}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[value] = proc.stdout.split()
  assert runs["0"][0] == "False" and runs["1"][0] == "True"
  assert runs["0"][1] == runs["1"][1]


def test_does_nothing_off_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  assert host_memory.reuse_freed_memory({}) is False
  assert host_memory.reuse_freed_memory({host_memory.ENV: "0"}) is False


def test_a_value_other_than_0_or_1_is_named():
  with pytest.raises(errors.UserError, match=r"DILAFF_REUSE_FREED_MEMORY='no': expected 0 .* or 1"):
    host_memory.reuse_freed_memory({host_memory.ENV: "no"})


def test_the_main_job_names_a_bad_value_in_one_line(tmp_path):
  out = cli_helpers.run_cli(
      "dilaff_jax.main",
      "--config=configs/synthetic.py:tiny",
      f"--workdir={tmp_path}",
      env={host_memory.ENV: "false"},
      timeout=120,
  )
  assert out.returncode == errors.EXIT_USER_ERROR
  assert cli_helpers.user_facing_lines(out.stderr) == [
      "error: DILAFF_REUSE_FREED_MEMORY='false': expected 0 (glibc's defaults) or 1 (reuse freed memory, the default)"
  ]
