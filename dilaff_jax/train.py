"""The training loop of the joint model (paper §3.2, §4.1): it runs the pmapped step (:mod:`dilaff_jax.engine.train_step`:
``CE + β · L_aff`` and Table 5's structure losses) over the data with the affinity statistics
(:func:`dilaff_jax.stats.load_or_compute`), writes checkpoints and summaries, stops on preemption
(:mod:`dilaff_jax.process.preemption`) and evaluates at the end.

The step is ``jax.pmap``'d over axis ``batch`` with cross-replica BatchNorm. Checkpoints
(:mod:`dilaff_jax.engine.checkpoints`: finite, fingerprinted) hold the train state; the data position and the RNG are
functions of the step, so a resumed run continues exactly where the interrupted one stopped. One training per
workdir (:mod:`dilaff_jax.process.workdir_lock`). U-Net's boundary weight maps are computed by the input pipeline.
"""

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from dilaff_jax import datasets, errors, evaluate
from dilaff_jax.datasets import input_pipeline
from dilaff_jax.engine import device_feed
from dilaff_jax.engine import affinity_stats, checkpoints, config_checks, replicas, run_spec, warm_start
from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.method import neighbour_stats, affinity
from dilaff_jax.process import files, multihost
from dilaff_jax.process import preemption as preemption_lib
from dilaff_jax.engine import eval_report, visualize
from dilaff_jax.method import structure_losses
from dilaff_jax.process import workdir_lock
from dilaff_jax.engine.train_state import AXIS, build_model, create_train_state, learning_rate_schedule
from dilaff_jax.engine.train_step import make_train_step

Hook = Callable[[int, Any], None]


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot go on (non-finite loss, incompatible checkpoint, ...); the message says what to do."""


def boundary_weight_map(spec: RunSpec) -> Callable[[np.ndarray], np.ndarray] | None:
  """U-Net's weight map for the input pipeline when ``structure.kind`` is ``boundary``, else None.

  σ is scaled from U-Net's 512-px images to the training crop: ``σ_px = boundary_sigma · crop_size / 512``.
  """
  if spec.structure != "boundary":
    return None
  config = spec.config
  s = config.structure
  return functools.partial(
      structure_losses.unet_weight_map,
      num_classes=config.dataset.num_classes,
      ignore_label=config.dataset.ignore_label,
      w0=s.boundary_w0,
      sigma=s.boundary_sigma * config.dataset.crop_size / structure_losses.UNET_SCALE,
      background=s.boundary_background,
      class_balance=s.boundary_class_balance,
  )


# ----------------------------------------------------------------------------------------------- the loop


NO_STEP = np.iinfo(np.int32).max  # "no non-finite loss yet"
BEST_NAME = "best.json"  # the best validated checkpoint's step and score


@jax.jit
def _track_nonfinite(
    first: tuple[jax.Array, jax.Array], loss: metrics.Average, step: int
) -> tuple[jax.Array, jax.Array]:
  """``(step, loss)`` of the first non-finite loss so far. Updated on the device after every step and read only
  at log and checkpoint steps, so that the loop never waits for the device just to look at the loss."""
  first_step, first_loss = first
  value = loss.compute()
  new = ~jnp.isfinite(value) & (first_step == NO_STEP)
  return jnp.where(new, step, first_step), jnp.where(new, value, first_loss)


def _lowered_rates(workdir: str) -> list[dict]:
  """The entries of ``config_history.json`` that resumed the run with a lower ``train.learning_rate``."""
  try:
    with open(os.path.join(workdir, CONFIG_HISTORY)) as f:
      history = json.load(f)
    return [
        h
        for h in history
        if "train.learning_rate" in h.get("changes", {})
        and float(h["changes"]["train.learning_rate"][1]) < float(h["changes"]["train.learning_rate"][0])
    ]
  except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
    return []


def divergence_advice(config: ml_collections.ConfigDict, workdir: str, step: int) -> str:
  """What to try after a non-finite loss or state at ``step``: names the learning rate that step used, and says
  so when the run was already resumed with a lowered ``train.learning_rate`` (``config_history.json``). A resume
  replays the same batches, so an unchanged config diverges at the same step again; a warm-up counts from step 0,
  so it helps a run started again, not a resume."""
  t = config.train
  rate = float(learning_rate_schedule(config)(max(step - 1, 0)))
  text = (
      f"Step {step} trained at learning rate {rate:.3g} (train.learning_rate={t.learning_rate:g}, poly schedule"
      + (f", {t.warmup_steps} warm-up steps" if t.warmup_steps else ", no warm-up")
      + "). "
  )
  alternatives = (["a lower affinity.beta"] if config_checks.rates_of(config) else []) + (
      ["model.dtype=float32"] if config.model.get("dtype", "float32") != "float32" else []
  )
  restart = f"or start the run again with {'more ' if t.warmup_steps else ''}train.warmup_steps (e.g. 500)"
  lowered = _lowered_rates(workdir)
  if lowered:
    last = lowered[-1]
    old, new = last["changes"]["train.learning_rate"]
    return text + (
        f"The run was already resumed at step {last['step']} with train.learning_rate lowered from {old:g} to "
        f"{new:g} ({CONFIG_HISTORY}) and diverged again {step - int(last['step'])} step(s) later: lowering the "
        f"rate further may only postpone it. Check the input data of the steps before {step} (a bad image or mask)"
        + (f"; resume with --allow_config_change and {' or '.join(alternatives)}" if alternatives else "")
        + f"; {restart}."
    )
  return text + (
      "A resume replays the same batches, so the same config diverges there again: resume with "
      f"--allow_config_change and a lower train.learning_rate (e.g. {rate / 2:.3g})"
      + "".join(f" or {a}" for a in alternatives)
      + f"; {restart}; or check the input data."
  )


def _check_loss(first: tuple[jax.Array, jax.Array], mngr, advice: Callable[[int], str] = lambda step: "") -> None:
  step, loss = (x.item() for x in jax.device_get(first))
  if step != NO_STEP:
    checkpoints.finish(mngr)
    good = mngr.latest_step()
    raise TrainingError(
        f"non-finite loss ({loss}) at step {step}: stopping without saving this state. The last good "
        f"checkpoint is {'step ' + str(good) if good is not None else 'none'} in {mngr.directory}. {advice(step)}"
    )


@contextlib.contextmanager
def _workdir_locked(workdir: str, is_chief: bool) -> Iterator[None]:
  """Process 0 holds ``<workdir>/train.lock`` for the run; every process stops when it could not take it."""
  with contextlib.ExitStack() as stack:
    busy = None
    if is_chief:
      try:
        stack.enter_context(workdir_lock.hold(workdir))
      except workdir_lock.WorkdirBusyError as e:
        busy = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      if int(multihost_utils.broadcast_one_to_all(np.int32(busy is not None))) and busy is None:
        busy = workdir_lock.WorkdirBusyError(f"--workdir={workdir} is in use by another training (see process 0)")
    if busy is not None:
      raise busy
    yield


# Keys a resume may change without --allow_config_change: they change how a run is logged, saved, evaluated or
# where its files are, not how its steps are trained. Every change is recorded in config_history.json all the same.
RESUME_FREE_KEYS = (
    "eval.",
    "train.log_every",
    "train.image_summary_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_at_end",
    "train.eval_every",
    "train.eval_max_images",
    "train.validation_split",
    "train.init_from",  # read only when a run starts
    "dataset.data_dir",
    "dataset.manual_dir",
    "dataset.eval_max_size",
)
LAUNCH_KEYS = ("distributed.",)  # how the processes found each other (a new port every launch): not recorded
CONFIG_HISTORY = "config_history.json"


class ConfigChangedError(errors.UserError):
  """A resume with a config that trains differently from the one the run's first steps were trained with."""


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
  """``{key: (old value, new value)}`` for the keys both JSON configs have and give different values (a key only
  one of them has is a key of another version of the code, not a change of the run)."""
  a, b = _flat(old), _flat(new)
  return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def record_config(
    workdir: str, config: ml_collections.ConfigDict, step: int, allow_change: bool, write: bool = True
) -> None:
  """Writes ``<workdir>/config.json`` (atomically) for a run that starts, or resumes at ``step``. A resume whose
  config differs from the recorded one is refused, naming the keys, unless every differing key is one of
  :data:`RESUME_FREE_KEYS` or ``allow_change``; an accepted change is appended to ``config_history.json`` with its
  step, so the record always says how every step was trained. Every process checks; only one with ``write``
  writes (multi-host: the chief), so all of them refuse alike."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=1)
  if step > 0 and os.path.isfile(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigChangedError(f"{path} cannot be read ({e}); it records how this run was trained") from None
    changes = {k: v for k, v in config_changes(old, json.loads(text)).items() if not k.startswith(LAUNCH_KEYS)}
    if not changes:
      return
    binding = [k for k in changes if not k.startswith(RESUME_FREE_KEYS)]
    if binding and not allow_change:
      listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in binding)
      raise ConfigChangedError(
          f"--workdir={workdir} was trained to step {step} with another config ({listed}); rerun with the recorded "
          "values, or pass --allow_config_change to train the remaining steps with the new ones (the change is "
          f"recorded in {CONFIG_HISTORY})"
      )
    if not write:
      return
    history_path = os.path.join(workdir, CONFIG_HISTORY)
    history = []
    if os.path.isfile(history_path):
      try:
        history = files.read_json(history_path, list, "a list of changes")
      except (OSError, ValueError) as e:
        raise ConfigChangedError(
            f"{history_path} cannot be read ({e}); it records this run's earlier config changes: restore it, or "
            "delete it to start a new record"
        ) from None
    history.append({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes})
    files.write_atomic(history_path, json.dumps(history, indent=1))
    print(f"[train] config changed at step {step}: {', '.join(changes)} (recorded in {history_path})", flush=True)
  if write:
    files.write_atomic(path, text)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    allow_config_change: bool = False,
) -> dict:
  """Trains to ``config.train.num_steps`` (resuming from ``workdir``), then evaluates if configured.

  One training per workdir (``<workdir>/train.lock``). ``hooks`` are called as ``hook(step, state)`` after every
  step (tests use them to interrupt runs). A resume with a config that trains differently is refused unless
  ``allow_config_change`` (:func:`record_config`). Returns the last training metrics and, when evaluated, the
  evaluation results.
  """
  config_checks.validate(config, num_devices=jax.device_count())
  spec = run_spec.derive(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir} is a file, not a folder; give a folder (new or of this run)")
  os.makedirs(workdir, exist_ok=True)
  with _workdir_locked(workdir, jax.process_index() == 0):
    return _train_and_evaluate(spec, workdir, hooks, allow_config_change)


def _train_and_evaluate(
    spec: RunSpec,
    workdir: str,
    hooks: Sequence[Hook],
    allow_config_change: bool = False,
) -> dict:
  config, rates = spec.config, spec.rates
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

  ndev = jax.local_device_count()
  per_device = config.train.batch_size // jax.device_count()
  # The dataset is prepared (if needed, by process 0 only) before anything reads it.
  if is_chief:
    builder = datasets.get_builder(
        config.dataset.name,
        data_dir=config.dataset.get("data_dir"),
        manual_dir=config.dataset.get("manual_dir"),
        num_classes=config.dataset.num_classes,
        foreground_255=bool(config.dataset.get("foreground_255", False)),
    )
    check_splits(config, list(builder.info.splits))  # before a training that would fail at its first validation
    for line in datasets.split_warnings(builder, config.dataset.eval_split):
      print(f"[train] warning: {line}", flush=True)
  multihost.barrier("dataset prepared")
  stats = affinity_stats.load_or_compute(spec, workdir) if rates else None
  if stats is not None and is_chief:
    print(
        "[train] " + neighbour_stats.weight_table(stats, config.affinity.scheme, config.affinity.max_weight), flush=True
    )
  bias = affinity.prior_bias(stats.pos_freq) if rates else None
  model = build_model(spec, bias)
  rng = jax.random.key(config.seed)
  state = create_train_state(spec, model, rng)
  compat = checkpoints.compat_record(spec)
  with checkpoints.opened(workdir, config, write=True) as mngr, contextlib.ExitStack() as stack:
    if mngr.latest_step() is not None:
      state, _, damaged = checkpoints.restore_newest_intact(mngr, state, compat)
      multihost.barrier("checkpoints verified")
      if is_chief:  # out of the way of this run's saves and of rotation; kept for inspection
        checkpoints.move_aside(mngr, damaged)
      multihost.barrier("damaged checkpoints moved aside")
      mngr.reload()
      print(f"[train] resumed from the checkpoint at step {int(state.step)} in {mngr.directory}", flush=True)
    elif config_checks.init_from(config) is not None:  # a new run starting from another run's weights
      state = warm_start.warm_start(config, state, report=print if is_chief else lambda _: None)
    start = int(state.step)
    # written once the checkpoint is known to fit this config (predict reads it); every process checks it and
    # refuses alike (the chief writes only after its own check passed), so no barrier is needed here
    record_config(workdir, config, start, allow_config_change, write=is_chief)

    schedule = learning_rate_schedule(config)
    p_step = jax.pmap(
        make_train_step(spec, stats, schedule),
        axis_name=AXIS,
        in_axes=(0, 0, None),
        donate_argnums=(0,),
    )
    p_predict = jax.pmap(
        functools.partial(model.apply, train=False, output_stride=config.model.train_output_stride), axis_name=AXIS
    )
    pipes = input_pipeline.from_config(
        config.dataset,
        seed=config.seed,
        local_device_count=ndev,
        per_device_batch=per_device,
        start_step=start,
        weight_map=boundary_weight_map(spec),
    )
    batches = device_feed.prefetch_to_device(pipes.train)
    stack.callback(pipes.train.close)  # on every exit path: tf.data's threads must not outlive the run
    stack.callback(batches.close)
    palette = visualize.palette_for(config.dataset.name)
    total = config.train.num_steps
    if start >= total:
      logging.info("Checkpoint is at step %d >= train.num_steps=%d: nothing to train", start, total)
    state = replicas.replicate(state, axis_name=AXIS)
    progress = periodic_actions.ReportProgress(
        num_train_steps=total, writer=writer, every_steps=config.train.log_every, every_secs=None
    )
    meta = lambda step: {
        "compat": compat,
        "step": step,
        "data_position": step * config.train.batch_size,
        "seed": config.seed,
    }
    eval_every = int(config.train.get("eval_every", 0))
    evaluator = functools.cache(lambda: evaluate.make_evaluator(spec))  # compiled once, at the first validation
    train_metrics = None
    last = {}
    first_nonfinite = (jnp.int32(NO_STEP), jnp.float32(0.0))
    advice = functools.partial(divergence_advice, config, workdir)
    t0 = time.time()
    with preemption_lib.Preemption() as preemption:
      for step in range(start + 1, total + 1):
        batch = next(batches)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, step_metrics = p_step(state, batch, rng)
        step_metrics = step_metrics.unreplicate()
        first_nonfinite = _track_nonfinite(first_nonfinite, step_metrics.loss, step)
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        progress(step)
        if step % config.train.log_every == 0 or step == total:
          _check_loss(first_nonfinite, mngr, advice)
          last = {k: float(v) for k, v in train_metrics.compute().items()}
          writer.write_scalars(step, {f"train/{k}": v for k, v in last.items()})
          elapsed = time.time() - t0
          eta = elapsed / (step - start) * (total - step)
          print(
              f"[train] step {step}/{total} loss {last['loss']:.4f} pixel_acc {last['pixel_accuracy']:.3f}"
              + (f" aff_acc {last['affinity_accuracy']:.3f}" if rates else "")
              + f" lr {last['learning_rate']:.2e} | {(step - start) / elapsed:.2f} steps/s, ETA {eta:.0f}s",
              flush=True,
          )
          train_metrics = None
        if is_chief and config.train.image_summary_every and step % config.train.image_summary_every == 0:
          variables = {"params": state.params, "batch_stats": state.batch_stats}
          writer.write_images(
              step,
              visualize.summary_images(p_predict(variables, batch["image"]), batch, spec, palette),
          )
        for hook in hooks:
          hook(step, state)
        stop = preemption.requested or (jax.process_count() > 1 and mngr.reached_preemption(step))
        score = None
        if eval_every and step % eval_every == 0:
          _check_loss(first_nonfinite, mngr, advice)
          score = _validate(spec, workdir, replicas.first_replica(state), writer, evaluator())
        if step % config.train.checkpoint_every == 0 or step == total or stop or score is not None:
          _check_loss(first_nonfinite, mngr, advice)  # names the step where it went wrong, before the state check
          try:  # batch statistics can blow up while the loss (computed with batch statistics) stays finite
            checkpoints.save_checkpoint(mngr, replicas.first_replica(state), meta(step), score)
          except checkpoints.NonFiniteStateError as e:
            raise TrainingError(f"{e}. {advice(step)}") from None
          if score is not None and is_chief:
            _record_best(workdir, step, score[checkpoints.BEST_METRIC])
        if stop:
          checkpoints.finish(mngr)
          logging.warning(
              "Stopped at step %d after a preemption request; rerun with the same --workdir to resume", step
          )
          print(f"[train] preempted: checkpoint saved at step {step}; rerun to resume", flush=True)
          writer.flush()
          return {"train": last, "preempted_at": step}
  writer.flush()
  result = {"train": last}
  if config.train.eval_at_end:
    final = replicas.first_replica(state)
    result["eval"] = evaluate.evaluate_state(
        spec, workdir, final, writer, evaluator=evaluator() if eval_every else None
    )
  return result


def check_splits(config: ml_collections.ConfigDict, known: Sequence[str]) -> None:
  """Raises :class:`config_checks.ConfigError` for a split the run will read that the prepared dataset lacks: the
  training split, the evaluation split (``train.eval_at_end``) and the validation split (``train.eval_every``)."""
  wanted = {"dataset.train_split": config.dataset.train_split}
  if config.train.eval_at_end:
    wanted["dataset.eval_split"] = config.dataset.eval_split
  if config.train.get("eval_every", 0):
    wanted["train.validation_split"] = config.train.get("validation_split") or config.dataset.eval_split
  for key, split in wanted.items():
    if split.split("[")[0] not in known:  # a slice such as "train[:100]" names its split first
      raise config_checks.ConfigError(
          f"config.{key} = {split!r}: {config.dataset.name} has no such split (its splits: {', '.join(known)})"
      )


def validation_score(results: dict) -> float:
  """What ranks checkpoints for ``best.json``: the mIoU after the configured propagation (what ``predict`` and the
  export output), or the network's mIoU without the affinity head."""
  return float(results.get("miou_propagated", results["miou"]))


def _validate(spec: RunSpec, workdir: str, state, writer, evaluator) -> dict:
  """A validation during training (``train.eval_every``): the first ``train.eval_max_images`` images of
  ``train.validation_split`` (default ``dataset.eval_split``), its scalars under ``validation/`` at the step, one printed line; no result files (the final evaluation
  writes them). Returns the checkpoint's metrics for Orbax's best-checkpoint policy."""
  config = spec.config
  limit = int(config.train.eval_max_images) or int(config.eval.max_images)
  split = config.train.validation_split or config.dataset.eval_split
  results = evaluate.evaluate_state(
      spec, workdir, state, evaluator=evaluator, max_images=limit, split=split, report=False
  )
  score = validation_score(results)
  scalars = {f"validation/{k.split('/', 1)[1]}": v for k, v in eval_report.scalars(results).items()}
  writer.write_scalars(results["step"], scalars)
  print(
      f"[train] validation at step {results['step']} on {results['num_images']} {split} "
      f"images: mIoU {100 * results['miou']:.2f}%"
      + (f", {100 * score:.2f}% after {results['final_iterations']} propagation iteration(s)" if spec.rates else ""),
      flush=True,
  )
  return {checkpoints.BEST_METRIC: score}


def _record_best(workdir: str, step: int, score: float) -> None:
  """``<workdir>/best.json``: the step and score of the best validated checkpoint so far, the one Orbax's policy
  keeps beside the newest (the latest of equal scores, as Orbax ranks them)."""
  path = os.path.join(workdir, BEST_NAME)
  try:
    with open(path) as f:
      best = json.load(f)
    better = score >= float(best["score"])
  except (OSError, ValueError, KeyError, TypeError):  # none yet (or unreadable: rewritten)
    better = True
  if better:
    files.write_atomic(path, json.dumps({"step": step, "score": score}, indent=1))
    print(f"[train] best validated checkpoint so far: step {step} ({path})", flush=True)
