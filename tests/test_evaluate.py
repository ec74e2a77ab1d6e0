"""Evaluation: mIoU against a brute-force count, padding and batching never change the score, the flip-permutation
of affinity channels, the oracle sweep, and a checkpoint evaluated twice."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from dilaff_jax import evaluate
from dilaff_jax.datasets import input_pipeline
from dilaff_jax.engine import crf, eval_metrics, inference, run_spec
from dilaff_jax.method import affinity
from dilaff_jax.method import propagation
from dilaff_jax.engine import train_state as state_lib
from cli_helpers import REPO, main_cli_args
from test_train import tiny_config

IGN = 255


def brute_miou(labels, preds, num_classes):
  """Mean IoU over the classes with a labelled pixel, by counting pixel by pixel."""
  ious = []
  for c in range(num_classes):
    tp = fp = fn = 0
    for y, p in zip(labels.ravel(), preds.ravel()):
      if y == IGN:
        continue
      tp += (y == c) and (p == c)
      fp += (y != c) and (p == c)
      fn += (y == c) and (p != c)
    if tp + fn:
      ious.append(tp / (tp + fp + fn))
  return float(np.mean(ious)), ious


def brute_accuracies(labels, preds, num_classes):
  """(mAcc over the classes with a labelled pixel, aAcc), by counting pixel by pixel."""
  right = total = 0
  per_class = []
  for c in range(num_classes):
    hit = seen = 0
    for y, p in zip(labels.ravel(), preds.ravel()):
      if y == c:
        seen += 1
        hit += p == c
    if seen:
      per_class.append(hit / seen)
    right += hit
    total += seen
  return float(np.mean(per_class)), right / total


def test_miou_equals_brute_force_count_with_ignore():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=(3, 11, 13))
  labels[rng.random(labels.shape) < 0.2] = IGN
  labels[labels == 4] = 3  # class 4 absent from the labels...
  preds = rng.integers(0, 5, size=labels.shape)
  preds[preds == 2] = 1  # ...and class 2 absent from the predictions (still counted: it is in the labels)
  conf = eval_metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 5, jnp.asarray(labels != IGN))
  np.testing.assert_array_equal(conf, eval_metrics.confusion_matrix_np(labels, preds, 5, labels != IGN))
  want, per_class = brute_miou(labels, preds, 5)
  assert eval_metrics.mean_iou(np.asarray(conf)) == pytest.approx(want, rel=1e-12)
  assert np.asarray(conf).sum() == np.sum(labels != IGN)
  iou = eval_metrics.iou_from_confusion(np.asarray(conf))
  assert iou[2] == 0.0  # labelled, never predicted: IoU 0, counted
  assert np.asarray(conf)[:, 4].sum() > 0 and np.isnan(iou[4])  # predicted, never labelled: undefined, not counted
  assert np.isnan(eval_metrics.iou_from_confusion(np.diag([3, 0, 2]))[1])  # neither labelled nor predicted
  macc, aacc = brute_accuracies(np.where(labels == IGN, -1, labels), preds, 5)
  assert eval_metrics.mean_accuracy(np.asarray(conf)) == pytest.approx(macc, rel=1e-12)
  assert eval_metrics.overall_accuracy(np.asarray(conf)) == pytest.approx(aacc, rel=1e-12)


def test_every_column_averages_over_the_classes_of_the_ground_truth():
  """Class c has no ground-truth pixel; one false-positive pixel of it in the unrefined prediction, none after
  propagation, three after the CRF. Counting it where it was predicted would score it 0 in one column and drop it
  from the other (4/9 -> 17/24, a 'gain' of 26 points); it is out of every mean, and listed with its false
  positives."""
  from dilaff_jax.engine import eval_report

  plain = np.array([[8, 1, 1], [2, 6, 0], [0, 0, 0]])  # rows: ground truth a, b, c; columns: prediction
  propagated = np.array([[9, 1, 0], [2, 6, 0], [0, 0, 0]])
  crf_conf = np.array([[7, 0, 3], [2, 6, 0], [0, 0, 0]])
  fields = eval_report.class_fields(
      {"no_propagation": plain, "propagated": propagated, "crf": crf_conf}, ["a", "b", "c"], 25, "val"
  )
  assert fields["scored_classes"] == ["a", "b"]
  assert fields["miou"] == pytest.approx((8 / 12 + 6 / 9) / 2)
  assert fields["miou_propagated"] == pytest.approx((9 / 12 + 6 / 9) / 2)
  assert fields["miou_crf"] == pytest.approx((7 / 12 + 6 / 8) / 2)
  assert fields["macc"] == pytest.approx((8 / 10 + 6 / 8) / 2) and fields["aacc"] == pytest.approx(14 / 18)
  assert fields["macc_propagated"] == pytest.approx((9 / 10 + 6 / 8) / 2)
  assert fields["aacc_propagated"] == pytest.approx(15 / 18)
  assert fields["macc_crf"] == pytest.approx((7 / 10 + 6 / 8) / 2) and fields["aacc_crf"] == pytest.approx(13 / 18)
  assert fields["per_class_iou"] == [pytest.approx(8 / 12), pytest.approx(6 / 9), None]
  assert fields["per_class_accuracy"] == [pytest.approx(0.8), pytest.approx(0.75), None]
  assert fields["class_pixels"] == [10, 8, 0]
  assert fields["absent_classes"] == [
      {"id": 2, "name": "c", "false_positive_pixels": {"no_propagation": 1, "propagated": 0, "crf": 3}}
  ]
  # a ConfusionMatrix's own mIoU agrees, whether or not the absent class was predicted
  for conf in (plain, propagated):
    assert eval_metrics.ConfusionMatrix(conf).compute() == pytest.approx(
        eval_metrics.ConfusionMatrix(conf).compute(np.array([True, True, False]))
    )
  (warning,) = fields["warnings"]  # 25 images: no small-set warning
  assert "1 class(es) have no pixel in the evaluation labels (c)" in warning
  results = {"step": 1, "split": "val", "num_images": 2, "images_per_second": 1.0, "final_iterations": 1, **fields}
  results["crf_ms_per_image"] = 5.0
  results["warnings"] = eval_report.evaluation_warnings(2, fields["absent_classes"])
  md = eval_report.markdown(results, ["a", "b", "c"])
  assert "> **Warning:** only 2 evaluation image(s) (fewer than 20)" in md
  assert "| c | absent from the ground truth: not scored | - | 0; false positives: 1 (no propagation), 0 " in md
  assert "mAcc (no propagation): 77.50%, aAcc: 77.78%" in md
  assert "same 2 of 3 classes" in md
  with pytest.raises(eval_report.NoLabelledPixelsError, match="'val' has no labelled pixel"):
    eval_report.class_fields({"no_propagation": np.zeros((3, 3), int)}, ["a", "b", "c"], 2, "val")


def test_confusion_metric_merges_batches_to_the_whole_set_count():
  """The clu metric of two halves, merged, is the confusion matrix of the whole set; gathered over a pmap axis
  and reduced, it is the sum over devices."""
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 4, size=(4, 6, 7))
  preds = rng.integers(0, 4, size=labels.shape)
  valid = rng.random(labels.shape) > 0.1
  whole = eval_metrics.confusion_matrix_np(labels, preds, 4, valid)
  halves = [
      eval_metrics.ConfusionMatrix.from_model_output(
          eval_metrics.confusion_matrix(jnp.asarray(labels[s]), jnp.asarray(preds[s]), 4, jnp.asarray(valid[s]))
      )
      for s in (slice(0, 1), slice(1, 4))
  ]
  merged = halves[0].merge(halves[1])
  np.testing.assert_array_equal(merged.matrix, whole)
  assert merged.compute() == pytest.approx(brute_miou(np.where(valid, labels, IGN), preds, 4)[0], rel=1e-12)
  cls = eval_metrics.eval_collection(("plain",), False)

  def per_device(lab, pred, ok):
    return cls.gather_from_model_output(
        axis_name="d",
        plain=eval_metrics.confusion_matrix(lab, pred, 4, ok),
        num_images=jnp.sum(ok[:, 0, 0], dtype=jnp.int32),
    )

  gathered = jax.pmap(per_device, axis_name="d", devices=jax.devices()[:2])(
      *(jnp.asarray(x.reshape(2, 2, *x.shape[1:])) for x in (labels, preds, valid))
  )
  one = jax.device_get(gathered.unreplicate())
  np.testing.assert_array_equal(one.plain.matrix, whole)
  assert one.num_images.compute() == int(np.sum(valid[:, 0, 0]))


def test_flip_permutation_maps_affinity_of_flipped_image_back():
  rates = affinity.expand_rates([1, (2, 4), 3])
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, size=(2, 7, 9)).astype(np.int32)
  a = np.asarray(propagation.gt_affinity(labels, rates))
  a_flip = np.asarray(propagation.gt_affinity(labels[:, :, ::-1].copy(), rates))
  back = a_flip[:, :, ::-1][..., inference.flip_permutation(rates)]
  np.testing.assert_array_equal(back, a)
  assert not np.array_equal(a_flip[:, :, ::-1], a)  # the permutation is needed


# ---------------------------------------------------------------------------------------------- with a pixel model


def pixel_model(variables, images, *, train, output_stride, num_classes=6, num_aff=32):
  """A stand-in for DeepLab whose outputs at a pixel depend only on that pixel: padding cannot change them."""
  del train, output_stride
  logits = jnp.einsum("bhwc,ck->bhwk", images, variables["w"]) + variables["b"]
  aff = jnp.einsum("bhwc,ck->bhwk", images, variables["wa"])
  return {"logits": logits, "affinity_logits": aff}


def pixel_variables(num_classes, num_aff, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(rng.normal(size=(3, num_classes)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(num_classes,)), jnp.float32),
      "wa": jnp.asarray(rng.normal(size=(3, num_aff)), jnp.float32),
  }


def run_eval(config, data_dir, *, pad, per_device, devices=2, crf_fn=None):
  spec = run_spec.derive(config)
  variables = pixel_variables(config.dataset.num_classes, 8 * len(spec.rates))
  batches = input_pipeline.eval_iterator(
      "synthetic_shapes/tiny",
      split="test",
      data_dir=data_dir,
      local_device_count=devices,
      per_device_batch=per_device,
      num_classes=config.dataset.num_classes,
      pad_size=pad,
  )
  iterations = tuple(config.eval.iterations)
  p_eval = jax.pmap(
      functools.partial(evaluate.eval_step, apply_fn=pixel_model, spec=spec, iterations=iterations),
      axis_name=state_lib.AXIS,
      devices=jax.devices()[:devices],
  )
  replicated = jax.tree.map(lambda x: jnp.stack([x] * devices), variables)
  return evaluate.accumulate(p_eval, replicated, batches, crf_fn=crf_fn)


def test_padding_and_batching_never_change_the_score(data_dir):
  config = synthetic.get_config("tiny")
  a = run_eval(config, data_dir, pad=(65, 65), per_device=1)
  b = run_eval(config, data_dir, pad=(80, 71), per_device=3)  # 6 per batch: 8 images -> 2 batches, 4 dummies
  assert a.metrics.num_images.compute() == b.metrics.num_images.compute() == 8
  for key in a.metrics.compute():  # every confusion matrix and the Fig. 4 counts
    np.testing.assert_array_equal(
        jax.tree.leaves(getattr(a.metrics, key)), jax.tree.leaves(getattr(b.metrics, key)), err_msg=key
    )
  # every labelled pixel of the split is counted exactly once
  from dilaff_jax import datasets

  builder = datasets.get_builder("synthetic_shapes/tiny", data_dir=data_dir)
  n = sum(int(np.sum(ex["label"] != IGN)) for ex in builder.as_dataset(split="test").as_numpy_iterator())
  assert a.metrics.predicted_0.matrix.sum() == n


def test_dense_crf_scores_the_same_pixels(data_dir):
  """With 0 mean-field iterations the CRF keeps every argmax: its confusion must equal the network's, which checks
  that the host-side CRF sees each real image cropped, aligned with its labels, and no padding or dummy."""
  config = synthetic.get_config("tiny")
  config.eval.crf = True
  config.eval.crf_iterations = 0
  crf_fn = functools.partial(crf.confusion_after_crf, config=config)
  totals = run_eval(config, data_dir, pad=(70, 66), per_device=3, crf_fn=crf_fn)
  np.testing.assert_array_equal(totals.crf.matrix, totals.metrics.predicted_0.matrix)
  config.eval.crf_iterations = 5
  totals = run_eval(config, data_dir, pad=(70, 66), per_device=3, crf_fn=crf_fn)
  assert totals.crf.matrix.sum() == totals.metrics.predicted_0.matrix.sum()
  assert not np.array_equal(totals.crf.matrix, totals.metrics.predicted_0.matrix)
  assert totals.crf_seconds > 0


def test_oracle_sweep_is_non_decreasing(data_dir):
  config = synthetic.get_config("tiny")
  config.eval.iterations = (0, 1, 3, 6)
  totals = run_eval(config, data_dir, pad=(65, 65), per_device=2)
  oracle = [getattr(totals.metrics, f"oracle_{it}").compute() for it in (0, 1, 3, 6)]
  assert all(b >= a - 1e-9 for a, b in zip(oracle, oracle[1:])), oracle
  assert oracle[-1] > oracle[0] + 0.005, oracle  # a poor pixel model: small but real gains
  assert totals.metrics.predicted_0.compute() == pytest.approx(oracle[0])


def test_flip_prediction_is_the_mean_of_both_passes():
  rates = affinity.expand_rates([1, (2, 3)])
  variables = pixel_variables(4, 8 * len(rates), seed=3)
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.normal(size=(2, 9, 11, 3)), jnp.float32)
  kw = dict(size=(9, 11), output_stride=8, scales=(1.0,), rates=rates, mu=7.0)
  model = functools.partial(pixel_model, num_classes=4)
  p1, a1 = inference.predict(model, variables, images, flip=False, **kw)
  p2, a2 = inference.predict(model, variables, images, flip=True, **kw)
  # a pixel model is flip-equivariant for probabilities; the flipped pass' affinity is re-ordered by direction
  np.testing.assert_allclose(p2, p1, rtol=1e-6)
  flipped = inference.predict(model, variables, images[:, :, ::-1], flip=False, **kw)[1]
  want = 0.5 * (a1 + flipped[:, :, ::-1][..., inference.flip_permutation(rates)])
  np.testing.assert_allclose(a2, want, rtol=1e-6)
  # scales (1.0, 1.0) average two identical passes
  p3, _ = inference.predict(model, variables, images, flip=False, **dict(kw, scales=(1.0, 1.0)))
  np.testing.assert_allclose(p3, p1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_evaluating_a_checkpoint_twice_gives_the_same_numbers(data_dir, tmp_path):
  from dilaff_jax import train

  config = tiny_config(data_dir, **{"train.num_steps": 2})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  first = evaluate.evaluate_checkpoint(config, workdir)
  second = evaluate.evaluate_checkpoint(config, workdir)
  assert first["step"] == 2 and first["num_images"] == 8
  for key in ("miou", "per_class_iou", "sweep", "affinity_accuracy", "confusion"):
    assert first[key] == second[key], key
  out = os.path.join(workdir, "eval", "step_2")
  assert sorted(os.listdir(out)) == ["affinity_accuracy.png", "examples.png", "results.json", "results.md"]
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
    evaluate.evaluate_checkpoint(config, workdir, step=7)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    evaluate.evaluate_checkpoint(config, str(tmp_path / "empty"))


def test_report_writes_the_files_and_the_summaries_of_a_hand_made_result(tmp_path, capsys):
  from dilaff_jax.engine import eval_report

  class Writer:
    written = []

    def write_scalars(self, step, scalars):
      self.written.append((step, scalars))

    def flush(self):
      pass

  results = {
      "step": 6,
      "split": "validation",
      "num_images": 3,
      "miou": 0.5,
      "miou_crf": 0.55,
      "crf_ms_per_image": 12.0,
      "miou_propagated": 0.6,
      "final_iterations": 1,
      "sweep": {"iterations": [0, 1, 3], "predicted": [0.5, 0.6, 0.4], "oracle": [0.5, 0.7, 0.8]},
      "affinity_accuracy": {"per_rate": {"4": [0.1 * k for k in range(9)]}, "mean": [0.1 * k for k in range(9)]},
      "per_class_iou": [0.5, 0.5],
      "macc": 0.7,
      "aacc": 0.9,
      "macc_crf": 0.75,
      "aacc_crf": 0.92,
      "images_per_second": 1.0,
  }
  writer = Writer()
  eval_report.write(results, str(tmp_path / "step_6"), ["a", "b"], writer)
  assert sorted(os.listdir(tmp_path / "step_6")) == ["affinity_accuracy.png", "results.json", "results.md"]
  assert json.load(open(tmp_path / "step_6" / "results.json")) == results
  assert "# Evaluation of step 6 on validation (3 images)" in capsys.readouterr().out
  assert writer.written == [
      (
          6,
          {
              "eval/miou": 0.5,
              "eval/macc": 0.7,
              "eval/macc_crf": 0.75,
              "eval/aacc": 0.9,
              "eval/aacc_crf": 0.92,
              "eval/miou_crf": 0.55,
              "eval/miou_propagated": 0.6,
              "eval/miou_propagation_0": 0.5,
              "eval/miou_propagation_1": 0.6,
              "eval/miou_propagation_3": 0.4,
              "eval/miou_oracle_0": 0.5,
              "eval/miou_oracle_1": 0.7,
              "eval/miou_oracle_3": 0.8,
          },
      )
  ]
  plain = {k: results[k] for k in ("step", "split", "num_images", "miou", "per_class_iou", "images_per_second")}
  eval_report.write(plain, str(tmp_path / "plain"), ["a", "b"])  # no affinity: no Fig. 4 picture, no writer
  assert sorted(os.listdir(tmp_path / "plain")) == ["results.json", "results.md"]
  assert eval_report.scalars(plain) == {"eval/miou": 0.5}


def test_watch_evaluates_every_checkpoint_once(data_dir, tmp_path, capsys):
  from dilaff_jax import train

  config = tiny_config(data_dir)  # 4 steps, a checkpoint every 2
  config.eval.max_images = 3  # less than one batch of 8: the whole batch is scored, and that is said
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  results = evaluate.evaluate_checkpoints(config, workdir, watch=True, poll_seconds=0.1, timeout_seconds=30)
  assert [r["step"] for r in results] == [2, 4]
  assert [r["num_images"] for r in results] == [8, 8]
  note = "[eval] max_images=3: scored in whole batches of 8, so up to 8 images (1 batch); results.json says how many"
  assert capsys.readouterr().out.count(note) == 2  # the training's final evaluation (step 4), then step 2
  # a second watcher finds both already evaluated and stops at once (the last step is reached)
  assert evaluate.evaluate_checkpoints(config, workdir, watch=True, poll_seconds=0.1) == []


def test_watch_beside_a_running_training_evaluates_each_checkpoint_once_and_none_is_damaged(data_dir, tmp_path):
  """The documented way to evaluate during training, live: a training in its own process writes checkpoints 2, 4
  and 6 while ``--watch``'s loop polls the same folder, so it lists checkpoints that are still being written. Every
  one is evaluated once, none is called damaged or skipped, and the watch ends at the final step of the training's
  own ``config.json`` (6, not the 4 of the config the watcher was given)."""
  import contextlib
  import io
  import subprocess
  import sys
  import time

  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "dilaff_jax.main"] + main_cli_args(
      data_dir,
      workdir,
      "--config.train.num_steps=6",
      "--config.train.keep_checkpoints=5",
      "--config.train.eval_at_end=False",
      "--config.train.image_summary_every=0",
  )
  training = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(600):  # the watcher refuses a workdir that does not exist yet
      if workdir.is_dir() or training.poll() is not None:
        break
      time.sleep(0.1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      results = evaluate.evaluate_checkpoints(
          tiny_config(data_dir), str(workdir), watch=True, poll_seconds=0.05, timeout_seconds=300
      )
  finally:
    out, _ = training.communicate(timeout=600)
  assert training.returncode == 0, out[-3000:]
  assert [r["step"] for r in results] == [2, 4, 6], printed.getvalue()  # the given config says 4 steps
  assert "skipping" not in printed.getvalue() and "damaged" not in printed.getvalue(), printed.getvalue()


def test_sigusr1_prints_every_threads_stack_and_the_job_goes_on(data_dir, tmp_path):
  """``kill -USR1 <pid>`` on a main job that waits (``--watch`` on a workdir with no checkpoint yet) writes each
  thread's stack to stderr, the waiting loop of ``evaluate_checkpoints`` among them, and the job keeps waiting
  (without the handler the signal ends the process). The signal is sent once the job has said it is watching, so
  the dump cannot race its start-up."""
  import re
  import signal
  import subprocess
  import sys
  import time

  workdir = tmp_path / "run"
  workdir.mkdir()
  out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
  cmd = [sys.executable, "-m", "dilaff_jax.main"] + main_cli_args(
      data_dir, workdir, "--mode=evaluate", "--watch", "--watch_timeout=300"
  )
  with open(out_path, "w") as out, open(err_path, "w") as err:
    job = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
    try:
      deadline = time.time() + 240
      while "[eval] watching" not in out_path.read_text():
        assert job.poll() is None and time.time() < deadline, err_path.read_text()[-3000:]
        time.sleep(0.2)
      job.send_signal(signal.SIGUSR1)
      deadline = time.time() + 30
      while "in evaluate_checkpoints" not in err_path.read_text() and time.time() < deadline:
        time.sleep(0.2)
      time.sleep(1)
      still_running = job.poll() is None
    finally:
      job.kill()
      job.wait(timeout=60)
  stderr = err_path.read_text()
  assert still_running, (job.returncode, stderr[-3000:])
  # faulthandler names the thread that took the signal "Current thread", the others "Thread"
  assert re.search(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", stderr, re.M), stderr[-3000:]
  assert re.search(r'evaluate\.py", line \d+ in evaluate_checkpoints$', stderr, re.M), stderr[-3000:]


def test_multiscale_affinity_comes_from_the_scale_one_passes_only():
  """A rate's channel at input scale s spans r/s original pixels: a fake model whose affinity depends on the input
  scale shows that the affinity is the scale-1.0 pass' (never a mix), while the probabilities average all scales."""
  rates = affinity.expand_rates([2])
  width = 12

  def fake_model(variables, x, train, output_stride):
    del variables, train, output_stride
    s = x.shape[2] / width  # the input scale
    b, h, w, _ = x.shape
    logits = jnp.concatenate([jnp.full((b, h, w, 1), s), jnp.zeros((b, h, w, 1))], -1)
    return {"logits": logits, "affinity_logits": jnp.full((b, h, w, 8), 4.0 * (s - 1.0) + 0.5)}

  images = jnp.zeros((1, 9, width, 3), jnp.float32)
  kw = dict(size=(9, width), output_stride=8, rates=rates, mu=7.0)
  p1, a1 = inference.predict(fake_model, None, images, scales=(1.0,), flip=False, **kw)
  pm, am = inference.predict(fake_model, None, images, scales=(0.5, 1.0, 1.5), flip=True, **kw)
  np.testing.assert_allclose(am, a1, rtol=1e-6)  # scale-1 affinity (and its flip), not averaged over scales
  np.testing.assert_allclose(a1, propagation.steep_sigmoid(jnp.full(a1.shape, 0.5), 7.0), rtol=1e-6)
  widths = [int(round(s * (width - 1))) + 1 for s in (0.5, 1.0, 1.5)]  # DeepLab's aligned sizes
  want = np.mean([jax.nn.softmax(jnp.array([w / width, 0.0]))[0] for w in widths])
  np.testing.assert_allclose(pm[..., 0], want, rtol=1e-5)  # probabilities: the mean over every scale and flip
  with pytest.raises(ValueError, match="lack 1.0"):
    inference.predict(fake_model, None, images, scales=(0.5, 1.5), flip=False, **kw)


def test_watch_retries_the_checkpoint_being_written_and_follows_the_workdirs_final_step(tmp_path, monkeypatch):
  """The newest checkpoint may still be in writing: a first unreadable read is 'not yet' (retried), not 'damaged';
  an older unreadable one is damaged at once. The watch ends at the final step of the workdir's own config.json
  (6 here), not at the one of the config it was given (4)."""
  from dilaff_jax.engine import checkpoints

  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"train": {"num_steps": 6}}))
  config = synthetic.get_config("tiny")  # train.num_steps = 4
  config.eval.output_dir = str(tmp_path / "eval")
  listings = iter([[2], [2, 4], [2, 4], [2, 4, 6], [2, 4, 6], [2, 4, 6]])
  reads = []

  def restore(wd, spec, template, step):
    reads.append(step)
    if step == 4 and reads.count(4) == 1 or step == 6 and reads.count(6) <= 2:  # being written
      raise checkpoints.DamagedCheckpointError(f"step {step}: Truncated Zstd-compressed stream", step, "truncated")
    return step, {}

  monkeypatch.setattr(checkpoints, "saved_steps", lambda wd: next(listings))
  monkeypatch.setattr(checkpoints, "restore_from_workdir", restore)
  monkeypatch.setattr(evaluate, "evaluate_state", lambda spec, wd, state, writer=None: {"step": state})
  monkeypatch.setattr(evaluate.config_checks, "validate", lambda *a, **k: None)
  results = evaluate.evaluate_checkpoints(config, str(workdir), watch=True, poll_seconds=0.0, settle_seconds=60)
  assert [r["step"] for r in results] == [2, 4, 6]
  assert reads == [2, 4, 4, 6, 6, 6]
  # past the settling time an unreadable newest checkpoint is reported damaged and skipped
  listings = iter([[2], [2]])
  (workdir / "config.json").write_text(json.dumps({"train": {"num_steps": 2}}))
  reads.clear()
  monkeypatch.setattr(
      checkpoints,
      "restore_from_workdir",
      lambda *a: (_ for _ in ()).throw(checkpoints.DamagedCheckpointError("step 2: bad bytes", 2, "bytes")),
  )
  monkeypatch.setattr(checkpoints, "saved_steps", lambda wd: next(listings))
  assert evaluate.evaluate_checkpoints(config, str(workdir), watch=True, poll_seconds=0.0, settle_seconds=0) == []


# ---------------------------------------------------------------------------------------------- images of mixed sizes

MIXED_SIZES = [(20, 30), (22, 26), (40, 18), (20, 30), (90, 70), (130, 40), (60, 64)]


def mixed_size_folder(path):
  """An image folder whose val split holds images of the sizes in MIXED_SIZES (two larger than 64 a side)."""
  from PIL import Image
  from dilaff_jax.datasets import shapes_render

  for sub in ("images", "masks", "splits"):
    os.makedirs(os.path.join(path, sub), exist_ok=True)
  with open(os.path.join(path, "classes.txt"), "w") as f:
    f.write("\n".join(shapes_render.CLASS_NAMES) + "\n")
  names = [f"img_{i}" for i in range(len(MIXED_SIZES))]
  for i, (name, (h, w)) in enumerate(zip(names, MIXED_SIZES)):
    rgb, label = shapes_render.render_scene(np.random.default_rng(i), height=h, width=w, max_objects=3)
    Image.fromarray(rgb).save(os.path.join(path, "images", name + ".png"))
    Image.fromarray(label, "L").save(os.path.join(path, "masks", name + ".png"))
  Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(os.path.join(path, "images", "train_0.png"))
  train_mask = np.zeros((24, 24), np.uint8)
  train_mask[0, : len(shapes_render.CLASS_NAMES)] = np.arange(len(shapes_render.CLASS_NAMES))  # every class trains
  Image.fromarray(train_mask).save(os.path.join(path, "masks", "train_0.png"))
  with open(os.path.join(path, "splits", "train.txt"), "w") as f:
    f.write("train_0\n")
  with open(os.path.join(path, "splits", "val.txt"), "w") as f:
    f.write("\n".join(names) + "\n")


def test_resize_nearest_scales_each_mask_back_to_its_own_size():
  """Output pixel (i, j) of an image scaled from h x w to H x W reads pixel (floor((i + 0.5) h / H), floor((j + 0.5)
  w / W)): Pillow's nearest neighbour, computed exactly (Pillow's float steps may round an exact tie down)."""
  from PIL import Image

  rng = np.random.default_rng(2)
  pairs = [((5, 7), (13, 20)), ((9, 4), (9, 11)), ((64, 20), (130, 40)), ((3, 3), (3, 3))]
  masks = np.zeros((len(pairs), 64, 20), np.int32)
  for i, ((h, w), _) in enumerate(pairs):
    masks[i, :h, :w] = rng.integers(0, 200, size=(h, w))
  small = np.asarray([p[0] for p in pairs], np.int32)
  full = np.asarray([p[1] for p in pairs], np.int32)
  out = np.asarray(inference.resize_nearest(jnp.asarray(masks), *small.T, *full.T, (130, 40)))
  for k, ((h, w), (fh, fw)) in enumerate(pairs):
    want = np.zeros((fh, fw), np.int32)
    for i in range(fh):
      for j in range(fw):
        want[i, j] = masks[k, int((i + 0.5) * h // fh), int((j + 0.5) * w // fw)]
    np.testing.assert_array_equal(out[k, :fh, :fw], want, err_msg=str(pairs[k]))
    pillow = np.asarray(Image.fromarray(masks[k, :h, :w].astype(np.uint8)).resize((fw, fh), Image.Resampling.NEAREST))
    assert np.mean(pillow == want) > 0.99  # predict's resize_mask: the same rule


def test_images_of_mixed_sizes_are_grouped_and_score_as_each_image_alone(tmp_path):
  """Grouped by size (sides up to 16 share a level, then one per factor sqrt(2)), no image is padded beyond sqrt(2)
  times its side, images longer than 64 a side are inferred downscaled, and the summed metrics are exactly those of
  evaluating every image alone, unpadded, in a batch of its own."""
  from dilaff_jax import datasets

  folder, tfds_dir = str(tmp_path / "mixed"), str(tmp_path / "tfds")
  mixed_size_folder(folder)
  builder = datasets.get_builder("image_folder", data_dir=tfds_dir, manual_dir=folder)
  config = synthetic.get_config("tiny")
  config.eval.iterations = (0, 1)
  config.affinity.iterations = 1
  config.affinity.rates = (2, 4)
  config.eval.crf, config.eval.crf_iterations = True, 0  # the host-side CRF keeps each argmax: scored alike
  spec = run_spec.derive(config)
  variables = pixel_variables(config.dataset.num_classes, 8 * len(spec.rates))
  kw = dict(split="val", num_classes=6, max_size=64, bucket_base=16, process_index=0, process_count=1)
  batches = list(input_pipeline.eval_iterator(builder, local_device_count=2, per_device_batch=1, **kw))
  plan = input_pipeline.eval_plan(builder, "val", 2, max_size=64, bucket_base=16)
  assert len(plan) == 5 and len(batches) == sum(b.num_batches for b in plan) == 6  # 20x30, 22x26, 20x30: 2 batches
  shapes, seen = set(), []
  for batch in batches:
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
    pad = flat["label"].shape[1:]
    shapes.add(pad)
    assert max(pad) <= 64  # the network never sees more than eval_max_size a side
    for i in np.flatnonzero(flat["mask"]):
      seen.append(flat["image_id"][i])
      h, w = flat["height"][i], flat["width"][i]
      assert pad[0] <= max(16, np.sqrt(2) * h) and pad[1] <= max(16, np.sqrt(2) * w), (pad, h, w)
      if "score_label" in flat:
        full = (flat["score_height"][i], flat["score_width"][i])
        assert max(full) > 64 and max(h, w) == 64 and full in {(90, 70), (130, 40)}
  assert sorted(seen) == sorted(f"img_{i}" for i in range(len(MIXED_SIZES))) and len(shapes) == 5

  iterations = tuple(config.eval.iterations)
  step = functools.partial(evaluate.eval_step, apply_fn=pixel_model, spec=spec, iterations=iterations)
  grouped = jax.pmap(step, axis_name=state_lib.AXIS, devices=jax.devices()[:2])
  replicated = jax.tree.map(lambda x: jnp.stack([x] * 2), variables)
  both = evaluate.accumulate(
      grouped, replicated, iter(batches), crf_fn=functools.partial(crf.confusion_after_crf, config=config)
  )
  totals = both.metrics
  np.testing.assert_array_equal(both.crf.matrix, np.squeeze(totals.predicted_0.matrix))
  alone = jax.pmap(step, axis_name=state_lib.AXIS, devices=jax.devices()[:1])
  single = jax.tree.map(lambda x: x[None], variables)
  want = None
  for batch in input_pipeline.eval_iterator(builder, local_device_count=1, per_device_batch=1, **kw):
    h, w = int(batch["height"][0, 0]), int(batch["width"][0, 0])  # cut the padding away: the image alone
    one = {k: v for k, v in batch.items() if k != "image_id"}
    one["image"], one["label"] = one["image"][:, :, :h, :w], one["label"][:, :, :h, :w]
    if "score_label" in one:
      one["score_label"] = one["score_label"][:, :, : int(one["score_height"][0, 0]), : int(one["score_width"][0, 0])]
    out = jax.device_get(alone(single, one)[0].unreplicate())
    want = out if want is None else want.merge(out)
  assert totals.num_images.compute() == int(np.sum(want.num_images.total)) == len(MIXED_SIZES)
  for key in ("predicted_0", "predicted_1", "oracle_1", "affinity_accuracy"):
    got, expected = (np.squeeze(jax.tree.leaves(getattr(m, key))[0]) for m in (totals, want))
    np.testing.assert_array_equal(got, expected, err_msg=key)
  labelled = sum(
      int(np.sum(ex["label"] != IGN)) for ex in builder.as_dataset(split="val").as_numpy_iterator()
  )  # every pixel of the full-size labels, once
  assert totals.predicted_0.matrix.sum() == labelled
