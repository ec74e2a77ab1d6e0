"""Evaluation (paper §4): mIoU at output stride 8, the affinity-propagation sweep (Tables 3–4) with predicted and
ground-truth affinity, and the affinity accuracy per neighbour category n_k (Fig. 4).

Every pixel of every image of the split counts once: images are padded (label 255) to one size, or to the largest
of their size group (``dataset.eval_pad_size = None``), dummy examples fill the last batch of a group and are
masked, and the confusion matrix is summed over devices and hosts. An image inferred downscaled
(``dataset.eval_max_size``) is scored at its full size, its predictions scaled back with nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from dilaff_jax.datasets import input_pipeline
from dilaff_jax.engine import checkpoints, config_checks, crf, eval_metrics, eval_report, inference, replicas
from dilaff_jax.engine import run_spec, visualize
from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.method import affinity, propagation
from dilaff_jax.engine.train_state import AXIS, build_model, state_template


def confusion_names(rates: affinity.Rates, iterations: Sequence[int], oracle: bool) -> tuple[str, ...]:
  """The confusion matrices an evaluation sums: ``plain`` without affinity; else the predicted-affinity sweep at
  every number of ``iterations`` and, with ``oracle``, the ground-truth sweep (``eval_metrics.sweep_name``)."""
  if not rates:
    return ("plain",)
  sources = ("predicted", "oracle") if oracle else ("predicted",)
  return tuple(eval_metrics.sweep_name(s, it) for s in sources for it in sorted(iterations))


def metrics_class(spec: RunSpec, iterations: Sequence[int]):
  """The ``clu.metrics.Collection`` :func:`eval_step` returns for this spec."""
  return eval_metrics.eval_collection(
      confusion_names(spec.rates, iterations, bool(spec.config.eval.ground_truth_oracle)), spec.has_affinity
  )


def scored_confusion(batch, predictions: jax.Array, *, num_classes: int, ignore_label: int) -> jax.Array:
  """The confusion matrix of class-index ``predictions`` ``[B, H, W]`` (at the size of ``batch["label"]``) over the
  batch's real pixels: against ``label``, or, for images inferred downscaled, against their full ``score_label``
  with the predictions scaled back to each image's size (nearest neighbour)."""
  if "score_label" in batch:
    labels = batch["score_label"]
    predictions = inference.resize_nearest(
        predictions, batch["height"], batch["width"], batch["score_height"], batch["score_width"], labels.shape[1:3]
    )
  else:
    labels = batch["label"]
  valid = (labels != ignore_label) & batch["mask"][:, None, None]
  return eval_metrics.confusion_matrix(labels, predictions, num_classes, valid)


def eval_step(variables, batch, *, apply_fn, spec: RunSpec, iterations: tuple[int, ...]):
  """The batch's evaluation metrics (:func:`metrics_class`), gathered over ``AXIS``: a confusion matrix for every
  propagation iteration count (predicted and oracle affinity), the number of real images and Fig. 4's affinity
  accuracy counts; and this device's probabilities when ``eval.crf`` (for the host-side dense CRF), else None."""
  config, rates = spec.config, spec.rates
  c = config.dataset.num_classes
  ign = config.dataset.ignore_label
  labels = batch["label"]
  size = labels.shape[1:3]
  probs, aff = inference.predict_as_configured(apply_fn, variables, batch["image"], spec, size)
  out = {"num_images": jnp.sum(batch["mask"], dtype=jnp.int32)}
  score = functools.partial(scored_confusion, batch, num_classes=c, ignore_label=ign)
  if not rates:
    out["plain"] = score(jnp.argmax(probs, -1))
  else:
    inside = inference.inside_mask(batch["height"], batch["width"], size, rates)
    sweeps = {"predicted": aff * inside}
    if config.eval.ground_truth_oracle:
      sweeps["oracle"] = propagation.gt_affinity(labels, rates, ign)
    anchor = probs if spec.anchored else None
    for name, a in sweeps.items():
      for it, p in propagation.sweep(probs, a, rates, iterations, lam=config.affinity.lam, anchor=anchor).items():
        out[eval_metrics.sweep_name(name, it)] = score(jnp.argmax(p, -1))
    # Fig. 4: affinity accuracy per rate and n_k, from the logits' sign (σ > 0.5 <=> steep σ > 0.5)
    logit_sign = jnp.where(aff > 0.5, 1.0, -1.0)
    lab = jnp.where(batch["mask"][:, None, None], labels, ign)
    out["affinity_accuracy"] = jnp.stack(
        affinity.affinity_accuracy_counts(logit_sign, lab, rates, ign, config.affinity.partial_neighbors)
    )
  collection = metrics_class(spec, iterations).gather_from_model_output(axis_name=AXIS, **out)
  return collection, (probs if config.eval.get("crf", False) else None)


# ----------------------------------------------------------------------------------------------- driver


def save_examples_figure(
    spec: RunSpec,
    apply_fn,
    variables,
    batch: dict,
    path: str,
    max_examples: int = 4,
    class_names: Sequence[str] = (),
) -> None:
  """A PNG to look at: for the first examples of ``batch``, the input, its label, the prediction, the prediction
  after affinity propagation and the mean predicted affinity of the first rate (dark = boundary); with
  ``class_names``, a legend of the classes shown."""
  config, rates = spec.config, spec.rates
  flat = {k: np.asarray(v).reshape(-1, *np.asarray(v).shape[2:]) for k, v in batch.items() if k != "image_id"}
  keep = np.flatnonzero(flat["mask"])[:max_examples]
  if keep.size == 0:
    return
  images = jnp.asarray(flat["image"][keep])
  size = images.shape[1:3]
  fn = jax.jit(lambda variables, images: inference.predict_as_configured(apply_fn, variables, images, spec))
  probs, aff = fn(variables, images)
  prediction = np.asarray(probs).argmax(-1)
  palette = visualize.palette_for(config.dataset.name)
  columns = {
      "input": visualize.denormalize(flat["image"][keep], config.dataset.mean, config.dataset.std),
      "label": visualize.colorize(flat["label"][keep], palette),
      "prediction": visualize.colorize(prediction, palette),
  }
  if rates:
    inside = inference.inside_mask(jnp.asarray(flat["height"][keep]), jnp.asarray(flat["width"][keep]), size, rates)
    anchor = probs if spec.anchored else None
    refined = propagation.propagate(
        probs, aff * inside, rates, config.affinity.lam, int(config.affinity.iterations), anchor=anchor
    )
    columns[f"propagated ({config.affinity.iterations} it.)"] = visualize.colorize(
        np.asarray(refined).argmax(-1), palette
    )
    columns[f"affinity, rate {affinity.rate_label(rates[0])}"] = visualize.affinity_picture(np.asarray(aff)[..., :8])
  shown = sorted(set(np.unique(flat["label"][keep]).tolist()) | set(np.unique(prediction).tolist()))
  legend = {class_names[c]: palette[c] for c in shown if c < len(class_names)}
  visualize.save_grid(columns, flat["height"][keep], flat["width"][keep], path, legend)


class Totals(NamedTuple):
  """An evaluation's sums: ``metrics`` (the :func:`metrics_class` collection, on the host), and with the dense CRF
  its ``crf`` confusion matrix and the CRF's seconds."""

  metrics: Any
  crf: eval_metrics.ConfusionMatrix | None = None
  crf_seconds: float = 0.0


def accumulate(p_eval, variables, batches, num_batches: int | None = None, batch_size: int = 0, crf_fn=None) -> Totals:
  """Merges ``p_eval``'s per-batch metrics over the batches (all devices and processes) and, with ``crf_fn``, the
  dense CRF's confusion matrix. Prints progress and an ETA when ``num_batches`` is known."""
  totals = None
  start = time.time()
  crf_conf, crf_seconds = None, 0.0
  for i, batch in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    device_batch = {k: v for k, v in batch.items() if k != "image_id"}
    out, probs = p_eval(variables, device_batch)
    if crf_fn is not None:
      probs = np.asarray(probs)
      conf, sec = crf_fn(batch, probs.reshape(-1, *probs.shape[2:]))
      crf_conf = conf if crf_conf is None else crf_conf + conf
      crf_seconds += sec
    out = jax.device_get(out.unreplicate())
    totals = out if totals is None else totals.merge(out)
    if num_batches and ((i + 1) % max(num_batches // 10, 1) == 0 or i + 1 == num_batches):
      rate = (i + 1) / (time.time() - start)
      print(
          f"[eval] batch {i + 1}/{num_batches}, {rate * batch_size:.2f} images/s, "
          f"ETA {(num_batches - i - 1) / rate:.0f}s",
          flush=True,
      )
  if totals is None:
    raise ValueError("evaluation got no batches: is the eval split empty?")
  if crf_fn is None:
    return Totals(totals)
  if jax.process_count() > 1:  # each process refined its own shard on the host
    from jax.experimental import multihost_utils

    crf_conf = np.asarray(multihost_utils.process_allgather(crf_conf)).sum(0)
    crf_seconds = float(np.asarray(multihost_utils.process_allgather(np.float64(crf_seconds))).sum())
  return Totals(totals, eval_metrics.ConfusionMatrix(crf_conf), crf_seconds)


def results_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Folder of the ``step_<N>/`` result folders: ``eval.output_dir``, or ``<workdir>/eval`` when it is empty (so
  that evaluating a run's checkpoints with other options, e.g. ``eval.crf``, need not overwrite its results)."""
  return config.eval.get("output_dir") or os.path.join(workdir, "eval")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """The evaluation model and its ``pmap``'d :func:`eval_step`, built once: a training that validates every
  ``train.eval_every`` steps compiles the evaluation once."""

  model: Any
  p_eval: Callable
  iterations: tuple[int, ...]


def make_evaluator(spec: RunSpec) -> Evaluator:
  config = spec.config
  model = build_model(spec)
  iterations = tuple(sorted(set(config.eval.iterations) | {int(config.affinity.iterations)}))
  p_eval = jax.pmap(
      functools.partial(eval_step, apply_fn=model.apply, spec=spec, iterations=iterations), axis_name=AXIS
  )
  return Evaluator(model, p_eval, iterations)


def evaluate_state(
    spec: RunSpec,
    workdir: str,
    state,
    writer=None,
    *,
    evaluator: Evaluator | None = None,
    max_images: int | None = None,
    split: str | None = None,
    report: bool = True,
) -> dict:
  """Evaluates an (unreplicated) train state on ``dataset.eval_split`` and returns the results; with ``report``,
  writes JSON, Markdown and a Fig. 4 PNG to ``<results_dir>/step_<N>/`` (default ``<workdir>/eval/step_<N>/``) and
  the scalars to ``writer``. ``max_images`` replaces ``eval.max_images`` (0: every image), ``split`` the
  dataset's ``eval_split``."""
  config, rates = spec.config, spec.rates
  step = int(jax.device_get(state.step))
  evaluator = evaluator or make_evaluator(spec)
  model, p_eval = evaluator.model, evaluator.p_eval
  ndev = jax.local_device_count()
  per_device = config.eval.batch_size // jax.device_count()
  dataset = config.dataset
  if split is not None and split != dataset.eval_split:
    dataset = ml_collections.ConfigDict(dataset.to_dict())
    dataset.eval_split = split
  pipes = input_pipeline.eval_from_config(dataset, local_device_count=ndev, per_device_batch=per_device)
  variables = replicas.replicate({"params": state.params, "batch_stats": state.batch_stats}, axis_name=AXIS)
  num_batches = pipes.num_eval_batches()
  limit = config.eval.max_images if max_images is None else max_images
  if limit:
    num_batches = min(num_batches, -(-limit // config.eval.batch_size))
    if (
        report
        and jax.process_index() == 0
        and limit % config.eval.batch_size
        and num_batches * config.eval.batch_size > limit
    ):
      print(
          f"[eval] max_images={limit}: scored in whole batches of {config.eval.batch_size}, so up to "
          f"{num_batches * config.eval.batch_size} images ({num_batches} batch{'es' if num_batches > 1 else ''}); "
          "results.json says how many",
          flush=True,
      )
  start = time.time()
  crf_fn = functools.partial(crf.confusion_after_crf, config=config) if config.eval.crf else None
  totals = accumulate(p_eval, variables, pipes.make_eval(), num_batches, config.eval.batch_size, crf_fn)
  m = totals.metrics
  num_images = m.num_images.compute()
  elapsed = time.time() - start
  results = {
      "step": step,
      "split": dataset.eval_split,
      "num_images": num_images,
      "output_stride": config.eval.output_stride,
      "scales": list(config.eval.scales),
      "flip": config.eval.flip,
      "images_per_second": num_images / max(elapsed, 1e-9),
  }
  sweep = eval_metrics.sweep_name
  base = getattr(m, sweep("predicted", 0)) if rates else m.plain
  # the classes with ground-truth pixels: the one set every column, the oracle and the CRF average over
  present = eval_report.check_labelled(base.matrix, config.dataset.eval_split)
  scored = {"no_propagation": base.matrix}
  if rates:
    final = int(config.affinity.iterations)
    results["sweep"] = {
        "iterations": list(config.eval.iterations),
        "predicted": [getattr(m, sweep("predicted", it)).compute(present) for it in config.eval.iterations],
    }
    if config.eval.ground_truth_oracle:
      results["sweep"]["oracle"] = [getattr(m, sweep("oracle", it)).compute(present) for it in config.eval.iterations]
    scored["propagated"] = getattr(m, sweep("predicted", final)).matrix
    results["final_iterations"] = final
    acc = m.affinity_accuracy.compute()
    results["affinity_accuracy"] = {
        "per_rate": {affinity.rate_label(r): row for r, row in zip(rates, acc["per_rate"])},
        "mean": acc["mean"],
    }
  if totals.crf is not None:
    scored["crf"] = totals.crf.matrix
    results["crf_ms_per_image"] = 1e3 * totals.crf_seconds / max(num_images, 1)
  results.update(eval_report.class_fields(scored, pipes.class_names, num_images, config.dataset.eval_split))
  results["confusion"] = np.asarray(base.matrix).tolist()

  if report and jax.process_index() == 0:
    out_dir = os.path.join(results_dir(config, workdir), f"step_{step}")
    eval_report.write(results, out_dir, pipes.class_names, writer)
    save_examples_figure(
        spec,
        model.apply,
        {"params": state.params, "batch_stats": state.batch_stats},
        next(iter(pipes.make_eval())),
        os.path.join(out_dir, "examples.png"),
        class_names=pipes.class_names,
    )
    print(f"[eval] step {step}: results in {out_dir}", flush=True)
  return results


# ----------------------------------------------------------------------------------------------- checkpoints


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """Restores the latest (or ``step``) checkpoint of ``workdir`` and evaluates it."""
  return evaluate_checkpoints(config, workdir, steps=[step] if step is not None else None)[-1]


def summary_writer(config: ml_collections.ConfigDict, workdir: str):
  """A CLU writer of TensorBoard summaries into the results folder (``<workdir>/eval`` by default: a run of its own
  beside the training's under ``tensorboard --logdir <workdir>``); logging only on processes other than the first."""
  directory = results_dir(config, workdir)
  chief = jax.process_index() == 0
  if chief:
    os.makedirs(directory, exist_ok=True)
  return metric_writers.create_default_writer(directory, just_logging=not chief)


def final_step(config: ml_collections.ConfigDict, workdir: str) -> int:
  """The step a training in ``workdir`` ends at: ``train.num_steps`` of the workdir's ``config.json`` (the run's own
  record; it may differ from the config given to the evaluation), else of ``config``."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return int(json.load(f)["train"]["num_steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return int(config.train.num_steps)


def evaluate_checkpoints(
    config: ml_collections.ConfigDict,
    workdir: str,
    steps: Sequence[int] | None = None,
    watch: bool = False,
    poll_seconds: float = 30.0,
    timeout_seconds: float = 0.0,
    settle_seconds: float = 120.0,
) -> list[dict]:
  """Evaluates checkpoints of ``workdir``: ``steps``, or the newest intact one; with ``watch``, every checkpoint a
  running training writes, as it appears, until the training's final one (:func:`final_step`; or
  ``timeout_seconds`` without a new one). While watching, checkpoints already evaluated
  (``<results_dir>/step_N/results.json`` exists) are skipped; the newest checkpoint, which the training may still
  be writing, is retried while it does not read back intact, for up to ``settle_seconds`` or until a newer one
  appears, and only then reported damaged and skipped. Only reads: no lock, no folder created (a missing
  ``workdir`` is an error, also with ``watch``; a workdir whose training has not saved yet is waited for)."""
  config_checks.validate(config, num_devices=jax.device_count(), mode="evaluate")
  spec = run_spec.derive(config)
  if watch and not os.path.isdir(workdir):
    raise checkpoints.NoCheckpointError(
        f"--workdir={workdir}: no such folder: start the training first (it creates " "the workdir), or fix the path"
    )
  template = functools.cache(lambda: state_template(spec))
  writer = functools.cache(lambda: summary_writer(config, workdir))  # once a checkpoint was read
  if not watch:
    results = []
    for s in steps or [None]:
      state, _ = checkpoints.restore_from_workdir(workdir, spec, template, s)
      results.append(evaluate_state(spec, workdir, state, writer()))
    writer().flush()
    return results
  results = []
  last_new = time.time()
  done = set()
  unreadable_since: dict[int, float] = {}
  directory = checkpoints.checkpoints_dir(workdir)
  print(f"[eval] watching {directory} for new checkpoints (until step {final_step(config, workdir)})", flush=True)
  evaluated = lambda s: s in done or os.path.exists(
      os.path.join(results_dir(config, workdir), f"step_{s}", "results.json")
  )
  while True:
    saved = checkpoints.saved_steps(workdir)
    todo = [s for s in saved if not evaluated(s)]
    for s in sorted(todo):
      try:
        state, _ = checkpoints.restore_from_workdir(workdir, spec, template, s)
      except checkpoints.DamagedCheckpointError as e:
        first = unreadable_since.setdefault(s, time.time())
        if s == max(saved) and time.time() - first < settle_seconds:
          print(f"[eval] step {s} does not read back intact yet (still being written?): retrying", flush=True)
          continue
        print(f"[eval] skipping step {s}: {e}", flush=True)
      except checkpoints.NoCheckpointError:  # rotated out (or moved aside) since it was listed
        print(f"[eval] skipping step {s}: it was removed before it could be read", flush=True)
      else:
        results.append(evaluate_state(spec, workdir, state, writer()))
        writer().flush()
      done.add(s)
      last_new = time.time()
    if saved and max(saved) >= final_step(config, workdir) and evaluated(max(saved)):
      break
    if timeout_seconds and time.time() - last_new > timeout_seconds:
      print(f"[eval] no new checkpoint for {timeout_seconds:.0f}s: stopping", flush=True)
      break
    time.sleep(poll_seconds)
  return results
