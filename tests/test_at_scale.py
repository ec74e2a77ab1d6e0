"""The paper-sized and multi-process runs, in a file of their own so that the test workers start them first (each
test file runs in one worker, files in name order): two processes with ``jax.distributed``, and the paper's config
compiled and stepped at a small crop."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import voc
from dilaff_jax import train
from cli_helpers import REPO
from test_train import restored_variables, tiny_config

# ---------------------------------------------------------------------------------------------- multi-host


def test_two_processes_with_jax_distributed_train_and_checkpoint(data_dir, tmp_path):
  """launch/cpu_multiprocess.sh: 2 processes x 2 CPU devices on localhost, a few steps, a shared checkpoint."""
  workdir = str(tmp_path / "mp")
  env = dict(os.environ, WORKDIR=workdir, DEVICES_PER_PROCESS="2", NUM_PROCESSES="2")
  env.pop("JAX_NUM_CPU_DEVICES")

  def launch(*flags):
    script = os.path.join(REPO, "launch", "cpu_multiprocess.sh")
    flags = (f"--config.dataset.data_dir={data_dir}", "--config.train.eval_at_end=False", *flags)
    return _run_or_show_stacks(["bash", script, *flags], env, workdir, timeout=900)

  proc = launch()
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  logs = [open(os.path.join(workdir, f"process_{i}.log")).read() for i in range(2)]
  for log in logs:
    assert "[train] step 4/4" in log
  # both processes computed the same global metrics (cross-process psum), only process 0 wrote summaries
  last = [next(line for line in log.splitlines() if line.startswith("[train] step 4/4")).split("|")[0] for log in logs]
  assert last[0] == last[1]
  assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
  config = tiny_config(data_dir)
  config.train.batch_size = 4
  step, variables = restored_variables(workdir, config)
  assert step == 4
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))
  # both processes restore the shared checkpoint and go on to step 6
  proc = launch("--config.train.num_steps=6")  # more steps change the schedule: refused by every process alike
  assert proc.returncode == 1 and "--allow_config_change" in proc.stderr, proc.stderr[-3000:]
  for i in range(2):
    with open(os.path.join(workdir, f"process_{i}.log")) as f:
      assert "error: --workdir=" in f.read(), i
  proc = launch("--config.train.num_steps=6", "--allow_config_change")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "config_history.json")) as f:
    assert [(h["step"], h["changes"]) for h in json.load(f)] == [(4, {"train.num_steps": [4, 6]})]
  for i in range(2):
    log = open(os.path.join(workdir, f"process_{i}.log")).read()
    assert "[train] resumed from the checkpoint at step 4" in log and "[train] step 6/6" in log
  assert restored_variables(workdir, config)[0] == 6


def _run_or_show_stacks(cmd, env, workdir, timeout):
  """Runs the launcher; should it hang, each process prints its threads' stacks into its log (SIGUSR1, as
  dilaff_jax.main installs it), everything is killed, and the test fails showing where each process waited."""
  proc = subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
  )
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGUSR1)  # the launcher's bash ends; its python processes print their stacks
    time.sleep(5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    logs = []
    for i in range(2):
      with open(os.path.join(workdir, f"process_{i}.log")) as f:
        lines = f.read().splitlines()
      first = next((j for j, line in enumerate(lines) if line.startswith(("Thread 0x", "Current thread 0x"))), None)
      shown = lines[max(0, first - 10) : first + 300] if first is not None else lines[-60:]
      logs.append(f"----- process_{i}.log:\n" + "\n".join(shown))
    pytest.fail(f"{cmd[1]} did not end in {timeout} s:\n" + "\n".join(logs))
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_paper_config_compiles_and_runs_a_step(data_dir, tmp_path):
  """configs/voc.py as is (ResNet-101, R = {8, (12, 24), 16}, β = 1.2, sqrt weights, OS 16) at a small crop on
  the tiny fake dataset: builds, compiles and takes one finite step, then checkpoints."""
  c = voc.get_config()
  c.dataset.name = "synthetic_shapes/tiny"
  c.dataset.data_dir = data_dir
  c.dataset.train_split, c.dataset.eval_split = "train", "test"
  c.dataset.num_classes = 6
  c.dataset.crop_size = 33
  c.train.batch_size = 8
  c.train.num_steps = 1
  c.train.eval_at_end = False
  c.train.image_summary_every = 0
  c.model.pretrained = "none"  # random init on purpose (no ImageNet weights on the test machine)
  result = train.train_and_evaluate(c, str(tmp_path / "paper"))
  assert np.isfinite(result["train"]["loss"]) and result["train"]["affinity_loss"] > 0
  step, variables = restored_variables(str(tmp_path / "paper"), c)
  assert step == 1
  assert variables["params"]["affinity"]["kernel"].shape == (1, 1, 256, 32)
  n = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  assert n == 59_352_533 - 15 * 257  # the paper's model with 6 instead of 21 classes
