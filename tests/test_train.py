"""The training loop: cross-replica equivalence, resume after SIGTERM / hard kill, NaN stop, config errors."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import image_folder as image_folder_config
from configs import synthetic, voc
from dilaff_jax import evaluate, train
from dilaff_jax.datasets import input_pipeline
from dilaff_jax.engine import checkpoints, config_checks, run_spec
from dilaff_jax.method import affinity
from dilaff_jax.engine import train_state as state_lib
from dilaff_jax.engine import train_step as step_lib
from dilaff_jax.method.neighbour_stats import AffinityStats
from cli_helpers import REPO, main_cli, run_cli, user_facing_lines


def test_user_facing_lines_drop_log_records_and_keep_tracebacks():
  stderr = (
      "E1126 22:00:00.123456    77 slow_operation_alarm.cc:73] \n****\n[Compiling module jit_step] Very slow compile?\n"
      "****\nW1126 22:00:01.5 77 checkpoint_manager.py:12] a read failed (OUT_OF_RANGE)\nerror: checkpoint 4 is damaged"
  )
  assert user_facing_lines(stderr) == ["error: checkpoint 4 is damaged"]
  spilled = "E1126 22:00:00.1 77 base.py:9] failed\nTraceback (most recent call last):\n  File x\nerror: boom"
  assert user_facing_lines(spilled) == ["Traceback (most recent call last):", "  File x", "error: boom"]


def tiny_config(data_dir, **overrides):
  c = synthetic.get_config("tiny")
  c.dataset.data_dir = data_dir
  c.train.batch_size = 8  # the suite runs with 8 virtual CPU devices
  c.eval.batch_size = 8
  c.train.eval_at_end = False
  c.train.image_summary_every = 0
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def restored_variables(workdir, config, step=None):
  """``(step, variables)`` of the newest intact (or ``step``'s) checkpoint of ``workdir``, verified."""
  spec = run_spec.derive(config)
  state, _ = checkpoints.restore_from_workdir(workdir, spec, lambda: state_lib.state_template(spec), step)
  return int(state.step), {"params": state.params, "batch_stats": state.batch_stats}


# ---------------------------------------------------------------------------------------------- cross-replica BN


def test_step_on_4_devices_equals_step_on_1_device_with_whole_batch():
  config = synthetic.get_config("tiny")
  config.model.dropout_rate = 0.0
  spec = run_spec.derive(config)
  rates = spec.rates
  stats = AffinityStats(
      rates, np.tile([0.05, 0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.4], (len(rates), 1)), np.full(len(rates), 0.8)
  )
  model = state_lib.build_model(spec, affinity.prior_bias(stats.pos_freq))
  state = state_lib.create_train_state(spec, model, jax.random.key(1))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 33, 33, 3)).astype(np.float32)
  labels = rng.integers(0, 6, size=(4, 33, 33)).astype(np.int32)
  labels[:, 10:14] = 255
  labels[3][rng.random((33, 33)) < 0.7] = 255  # uneven ignore shares across the devices
  step = step_lib.make_train_step(spec, stats, state_lib.learning_rate_schedule(config))
  outs = []
  for ndev in (4, 1):
    devices = jax.devices()[:ndev]
    p_step = jax.pmap(step, axis_name=state_lib.AXIS, in_axes=(0, 0, None), devices=devices)
    batch = {"image": images.reshape(ndev, 4 // ndev, 33, 33, 3), "label": labels.reshape(ndev, 4 // ndev, 33, 33)}
    new_state, metrics = p_step(flax.jax_utils.replicate(state, devices), batch, jax.random.key(2))
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # flax's unreplicate mis-handles a 1-of-8 pmap
    outs.append((first(new_state), first(metrics).compute()))
  (s4, m4), (s1, m1) = outs
  # the step did change the parameters, and both ways agree: each leaf's update (new - old) to 2% of its norm.
  # (Cross-replica BatchNorm's E[x²] - E[x]² in float32 on 1x1 maps at OS 32 moves some updates by up to ~0.6%
  # between shardings; a sharding bug, e.g. a loss normalised per device with these uneven ignore shares, changes
  # them by tens of percent.)
  assert not np.allclose(np.asarray(s1.params["classifier"]["kernel"]), state.params["classifier"]["kernel"])
  for u4, u1 in zip(
      jax.tree.leaves(jax.tree.map(np.subtract, s4.params, state.params)),
      jax.tree.leaves(jax.tree.map(np.subtract, s1.params, state.params)),
  ):
    assert np.linalg.norm(u4 - u1) <= 2e-2 * np.linalg.norm(u1) + 1e-9
  tree_allclose(s4.batch_stats, s1.batch_stats, rtol=2e-4, atol=2e-6)
  for k in ("loss", "ce_loss", "affinity_loss", "pixel_accuracy", "affinity_accuracy"):
    assert float(m4[k]) == pytest.approx(float(m1[k]), rel=1e-5), k


# ---------------------------------------------------------------------------------------------- resume


def test_resume_after_sigterm_equals_straight_run(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir)
  config.train.image_summary_every = 2  # summaries must not change the run, nor validations
  config.train.eval_every, config.train.eval_max_images, config.train.validation_split = 2, 4, "tune"
  config.train.keep_checkpoints = 1
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["train"]
  config.train.image_summary_every = config.train.eval_every = 0
  printed = capsys.readouterr().out
  scores = [
      float(x)
      for x in re.findall(r"\[train\] validation at step \d on 4 tune images: mIoU [\d.]+%, ([\d.]+)%", printed)
  ]
  assert len(scores) == 2, printed  # steps 2 and 4
  best = json.load(open(tmp_path / "straight" / "best.json"))
  assert best["step"] == (2 if scores[0] > scores[1] else 4) and 100 * best["score"] == pytest.approx(
      max(scores), abs=0.006
  )
  # Orbax kept the newest checkpoint (keep_checkpoints = 1) and the best validated one beside it
  assert sorted(os.listdir(tmp_path / "straight" / "checkpoints")) == sorted({"4", str(best["step"])})
  spec = run_spec.derive(config)  # the best checkpoint scores what best.json says, on the same 4 tune scenes
  state, _ = checkpoints.restore_from_workdir(
      str(tmp_path / "straight"), spec, lambda: state_lib.state_template(spec), best["step"]
  )
  again = evaluate.evaluate_state(spec, str(tmp_path / "straight"), state, max_images=4, split="tune", report=False)
  assert train.validation_score(again) == best["score"] and again["split"] == "tune" and again["num_images"] == 4
  import tensorflow as tf

  events = [f for f in os.listdir(tmp_path / "straight") if f.startswith("events.out.tfevents")]
  tags = {
      v.tag
      for e in tf.compat.v1.train.summary_iterator(str(tmp_path / "straight" / events[0]))
      for v in e.summary.value
  }
  assert {"input", "label", "prediction", "affinity_rate_4", "train/loss", "train/affinity_accuracy"} <= tags
  assert {"steps_per_sec", "validation/miou", "validation/miou_propagated", "validation/miou_propagation_1"} <= tags
  assert not any(t.startswith("eval/") for t in tags)  # eval_at_end is off in these tests

  def sigterm_at_2(step, state):
    del state
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  first = train.train_and_evaluate(config, str(tmp_path / "resumed"), hooks=[sigterm_at_2])
  assert first["preempted_at"] == 2
  step, _ = restored_variables(str(tmp_path / "resumed"), config)
  assert step == 2
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  s_a, v_a = restored_variables(str(tmp_path / "straight"), config)
  s_b, v_b = restored_variables(str(tmp_path / "resumed"), config)
  assert s_a == s_b == 4
  tree_allclose(v_a, v_b, rtol=1e-6, atol=1e-7)
  # bit for bit: neither the resume nor the straight run's validations and summaries changed the training
  recorded = [
      json.load(open(tmp_path / run / "checkpoints" / "4" / "meta" / "metadata"))["fingerprint"]
      for run in ("straight", "resumed")
  ]
  assert recorded[0] == recorded[1] and recorded[0][checkpoints.FINGERPRINT]


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import jax
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    from dilaff_jax import train

    def kill_after_checkpoint_2(step, state):
      if step == 3:
        done = os.path.join({workdir!r}, "checkpoints", "2")
        for _ in range(600):
          if os.path.isdir(done):
            break
          time.sleep(0.1)
        time.sleep(1.0)
        os._exit(17)  # a hard kill: no cleanup, no checkpoint of step 3

    train.train_and_evaluate(tiny_config({data_dir!r}), {workdir!r}, hooks=[kill_after_checkpoint_2])
""")


def test_resume_after_hard_kill_equals_straight_run(data_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  script = KILL_SCRIPT.format(tests=os.path.join(REPO, "tests"), workdir=workdir, data_dir=data_dir)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 17, proc.stderr[-3000:]
  config = tiny_config(data_dir)
  step, _ = restored_variables(workdir, config)
  assert step == 2
  train.train_and_evaluate(config, workdir)
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  _, v_a = restored_variables(straight, config)
  _, v_b = restored_variables(workdir, config)
  tree_allclose(v_a, v_b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  real = input_pipeline.from_config

  def poisoned(*args, **kwargs):
    pipes = real(*args, **kwargs)

    def batches():
      for i, batch in enumerate(pipes.train, start=kwargs.get("start_step", 0) + 1):
        if i == 3:
          batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        yield batch

    return pipes._replace(train=batches())

  monkeypatch.setattr(input_pipeline, "from_config", poisoned)
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.TrainingError, match=r"non-finite loss \(nan\) at step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(config, workdir)
  step, variables = restored_variables(workdir, config)
  assert step == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(variables))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  # resumed at half the rate, the same batch diverges again: the advice says so instead of "lower the rate" again
  config.train.learning_rate /= 2
  with pytest.raises(train.TrainingError) as error:
    train.train_and_evaluate(config, workdir, allow_config_change=True)
  message = str(error.value)
  rate = float(state_lib.learning_rate_schedule(config)(2))
  assert "non-finite loss (nan) at step 3" in message and f"Step 3 trained at learning rate {rate:.3g}" in message
  assert "resumed at step 2 with train.learning_rate lowered from 0.02 to 0.01" in message, message
  assert "diverged again 1 step(s) later" in message and "a lower train.learning_rate" not in message, message


def test_divergence_advice_names_the_rate_and_what_else_to_try(tmp_path):
  """Without a lowered rate in the run's history: the step's rate, a lower rate, the other knobs; a warm-up only
  for a run started again (it counts from step 0)."""
  config = synthetic.get_config("tiny")
  config.train.learning_rate, config.train.num_steps = 0.1, 100
  advice = train.divergence_advice(config, str(tmp_path), 51)
  rate = 0.1 * (1 - 50 / 100) ** 0.9
  assert f"Step 51 trained at learning rate {rate:.3g} (train.learning_rate=0.1, poly schedule, no warm-up)" in advice
  assert f"a lower train.learning_rate (e.g. {rate / 2:.3g}) or a lower affinity.beta;" in advice, advice
  assert "start the run again with train.warmup_steps" in advice and "already resumed" not in advice
  history = [{"step": 40, "changes": {"train.learning_rate": [0.2, 0.1]}}]
  with open(tmp_path / "config_history.json", "w") as f:
    json.dump(history, f)
  advice = train.divergence_advice(config, str(tmp_path), 51)
  assert "resumed at step 40 with train.learning_rate lowered from 0.2 to 0.1" in advice, advice
  assert "diverged again 11 step(s) later" in advice and "a lower train.learning_rate" not in advice


def test_diverging_run_leaves_only_finite_checkpoints(data_dir, tmp_path):
  """The issue's case: lr 1e8 with a checkpoint every step, as a user runs it. BatchNorm variances blow up before
  the loss does, so the loss check alone would save poisoned states; the state check refuses them, and the run ends
  in one ``error:`` line naming the step (through the command line, in its own process)."""
  workdir = str(tmp_path / "diverge")
  overrides = {
      "train.learning_rate": 1e8,
      "train.checkpoint_every": 1,
      "train.keep_checkpoints": 2,
      "train.num_steps": 8,
      "train.eval_at_end": False,
      "train.image_summary_every": 0,
  }
  proc = main_cli(data_dir, workdir, *(f"--config.{k}={v}" for k, v in overrides.items()), timeout=900)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = user_facing_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(r"at step \d+", lines[0]), lines[-5:]
  assert "finite checkpoint is step" in lines[0] or "last good checkpoint is step" in lines[0]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps, "the first steps were finite and saved"
  config = tiny_config(data_dir, **{"train.learning_rate": 1e8, "train.keep_checkpoints": 2, "train.num_steps": 8})
  for step in steps:  # every saved checkpoint restores verified (fingerprint and finiteness)
    assert restored_variables(workdir, config, step)[0] == step
  assert str(steps[-1]) in lines[0]
  assert not os.path.exists(os.path.join(workdir, "train.lock"))  # released on the error path
  log = open(os.path.join(workdir, "log.txt")).read()  # the run's log holds its start, progress and error line
  assert log.startswith("===== ") and "--config.train.learning_rate=100000000.0" in log.splitlines()[0]
  assert "[train] " in log and lines[0] in log


def test_incompatible_checkpoint_gives_clear_error(data_dir, tmp_path):
  config = tiny_config(data_dir, **{"train.num_steps": 2})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  other = tiny_config(data_dir, **{"train.num_steps": 4, "affinity.rates": (4, 8)})
  with pytest.raises(
      checkpoints.IncompatibleCheckpointError, match=r"incompatible config:\n  affinity.rates \(explicit\)"
  ):
    train.train_and_evaluate(other, str(tmp_path / "run"))
  # the refused config did not replace the run's config.json
  import json

  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["affinity"]["rates"] == [4, [6, 12], 8]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("dataset.crop_size", 100, "config.dataset.crop_size = 100: must be k\\*16\\+1"),
        ("affinity.scheme", "sqrt-reweight", "config.affinity.scheme = 'sqrt-reweight': expected one of"),
        ("affinity.rates", (), "config.affinity.rates = \\(\\): "),
        ("affinity.rates", (8, (8, 16)), "config.affinity.rates = .*share the neighbour offsets \\(-8, 0\\)"),
        ("affinity.propagation_reading", "crf", "config.affinity.propagation_reading = 'crf': expected one of"),
        ("train.batch_size", 6, "config.train.batch_size = 6: must be divisible by the number of devices \\(4\\)"),
        ("model.depth", 42, "config.model.depth = 42"),
        ("model.multi_grid", (1, 2, 4), "config.model.multi_grid = \\(1, 2, 4\\): expected 2 positive ints"),
        ("dataset.max_scale", 0.25, "config.dataset.max_scale = 0.25: must be >= dataset.min_scale"),
        ("model.pretrained", "/nonexistent/r101.safetensors", "config.model.pretrained = '/nonexistent"),
        ("train.warmup_steps", -5, r"config.train.warmup_steps = -5: expected an integer >= 0"),
        ("train.warmup_steps", 500, r"config.train.warmup_steps = 500: must be < train.num_steps \(500\)"),
        ("eval.max_images", -1, r"config.eval.max_images = -1: expected an integer >= 0"),
        ("seed", -1, r"config.seed = -1: expected an integer >= 0"),
        ("dataset.eval_pad_size", (129,), r"config.dataset.eval_pad_size = \(129,\): expected \(height, width\)"),
        ("dataset.eval_max_size", -1, r"config.dataset.eval_max_size = -1: expected 0 \(no limit\) or a positive"),
        ("affinity.iterations", -2, r"config.affinity.iterations = -2: expected an integer >= 0"),
        ("train.end_learning_rate", 0.5, r"config.train.end_learning_rate = 0.5: expected a value <= 0.02"),
        ("affinity.stats_max_images", -3, r"config.affinity.stats_max_images = -3: expected an integer >= 0"),
        ("distributed.process_id", -2, r"config.distributed.process_id = -2: expected an integer >= -1"),
        ("dataset.num_classes", 21, r"config.dataset.num_classes = 21: synthetic_shapes/default has 6 classes"),
        ("dataset.name", "pascal_voc", r"config.dataset.name = 'pascal_voc': not one of this project's datasets"),
    ],
)
def test_config_errors_name_the_key(key, value, match):
  c = synthetic.get_config()
  c.eval.batch_size = 8  # the demo's 10 does not divide over the 4 devices of this check; 8 does
  node = c
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.validate(c, num_devices=4)


def test_named_variants_of_the_paper_tables():
  assert config_checks.rates_of(voc.get_config()) == ((8, 8), (12, 24), (24, 12), (16, 16))
  t1 = voc.get_config("table1_neighbor")
  assert (t1.affinity.scheme, t1.affinity.beta) == ("neighbor", 0.25)
  assert config_checks.rates_of(t1) == ((8, 8), (16, 16), (32, 32), (64, 64))
  assert config_checks.rates_of(voc.get_config("table2_r8_12x24_16_32x64_48"))[-3:] == ((32, 64), (64, 32), (48, 48))
  assert not voc.get_config("baseline").affinity.enabled
  assert config_checks.rates_of(voc.get_config("baseline")) == ()
  with pytest.raises(ValueError, match="unknown config variant"):
    voc.get_config("table9")
  for variant in list(voc.VARIANTS) + ["baseline", ""]:
    c = voc.get_config(variant)
    config_checks.validate(c, num_devices=8, mode="evaluate")  # evaluation restores every weight: no file needed
    c.model.pretrained = "none"
    config_checks.validate(c, num_devices=8)


def test_paper_configs_refuse_to_train_without_imagenet_weights(tmp_path):
  """ResNet-50+ without `model.pretrained` (a file, or "none" on purpose) is refused before any data work."""
  c = voc.get_config()
  with pytest.raises(config_checks.ConfigError, match="config.model.pretrained = '': ResNet-101 needs ImageNet"):
    config_checks.validate(c, num_devices=8)
  c.model.pretrained = str(tmp_path / "missing.safetensors")
  with pytest.raises(config_checks.ConfigError, match="missing.safetensors'.*no such file"):
    config_checks.validate(c, num_devices=8)
  c.model.depth, c.model.multi_grid, c.model.pretrained = 18, (1, 2), ""  # small backbones may start from scratch
  config_checks.validate(c, num_devices=8)
  assert synthetic.get_config().model.pretrained == "none"
  # the command line: one error line, exit 2, before the dataset (which does not exist here) is touched
  workdir = tmp_path / "w"
  proc = run_cli(
      "dilaff_jax.main",
      "--config=configs/voc.py",
      f"--workdir={workdir}",
      f"--config.dataset.manual_dir={tmp_path / 'nodata'}",
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.model.pretrained = '': ResNet-101 needs")
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "nodata").exists() and not (workdir / "affinity_stats.json").exists()


def test_segmentation_loss_sum_against_a_loop():
  """Cross-entropy summed over the labelled pixels (void 255 skipped), and their count, against a per-pixel loop."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=(2, 3, 4)).astype(np.int32)
  labels[0, 1, 2] = labels[1, 0, 0] = 255
  total, n = step_lib.segmentation_loss_sum(jnp.asarray(logits), jnp.asarray(labels), 255)
  want, count = 0.0, 0
  for idx in np.ndindex(labels.shape):
    if labels[idx] == 255:
      continue
    z = logits[idx].astype(np.float64)
    want += np.log(np.exp(z - z.max()).sum()) + z.max() - z[labels[idx]]
    count += 1
  assert int(n) == count == 22
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  import optax  # the library's masked integer-label cross-entropy agrees (to rounding; see the docstring)

  valid = labels != 255
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(np.where(valid, labels, 0)))
  np.testing.assert_allclose(float(total), float(jnp.sum(jnp.where(valid, ce, 0.0))), rtol=1e-6)


def test_a_split_the_run_would_read_later_is_named_at_start():
  """The image-folder config once inherited the demo's validation split "tune": its training failed at step 150,
  in its first validation, with a traceback. Every split a run reads is checked against the prepared dataset first."""
  config = synthetic.get_config("tiny")
  known = ["train", "test", "tune"]
  train.check_splits(config, known)
  config.train.eval_every, config.train.validation_split = 2, "val"
  with pytest.raises(
      config_checks.ConfigError, match=r"^config.train.validation_split = 'val': .* \(its splits: train, test, tune\)"
  ):
    train.check_splits(config, known)
  config.train.validation_split = ""  # the evaluation split then
  config.train.eval_at_end, config.dataset.eval_split = True, "validation"
  with pytest.raises(config_checks.ConfigError, match=r"^config.dataset.eval_split = 'validation'"):
    train.check_splits(config, known)
  config.dataset.eval_split, config.dataset.train_split = "test", "train[:50%]"
  train.check_splits(config, known)
  for name in ("small", "small_baseline"):  # the image-folder configs read only the folder's splits
    folder = image_folder_config.get_config(name)
    train.check_splits(folder, ["train", "val"])
