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

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from dilaff_jax import datasets, errors, evaluate
from dilaff_jax.datasets import device_feed, input_pipeline
from dilaff_jax.engine import affinity_stats, checkpoints, config_checks, warm_start
from dilaff_jax.method import neighbour_stats, affinity
from dilaff_jax.process import files, multihost
from dilaff_jax.process import preemption as preemption_lib
from dilaff_jax.engine import visualize
from dilaff_jax.method import structure_losses
from dilaff_jax.process import workdir_lock
from dilaff_jax.engine.train_state import AXIS, build_model, create_train_state, learning_rate_schedule
from dilaff_jax.engine.train_step import make_train_step

Hook = Callable[[int, Any], None]


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot go on (non-finite loss, incompatible checkpoint, ...); the message says what to do."""


def boundary_weight_map(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray] | None:
  """U-Net's weight map for the input pipeline when ``structure.kind`` is ``boundary``, else None.

  σ is scaled from U-Net's 512-px images to the training crop: ``σ_px = boundary_sigma · crop_size / 512``.
  """
  if config_checks.structure_kind(config) != "boundary":
    return None
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


def _check_loss(first: tuple[jax.Array, jax.Array], mngr) -> None:
  step, loss = (x.item() for x in jax.device_get(first))
  if step != NO_STEP:
    checkpoints.finish(mngr)
    good = mngr.latest_step()
    raise TrainingError(
        f"non-finite loss ({loss}) at step {step}: stopping without saving this state. The last good "
        f"checkpoint is {'step ' + str(good) if good is not None else 'none'} in {mngr.directory}. Lower "
        "train.learning_rate or affinity.beta, or check the input data."
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
    "train.init_from",  # read only when a run starts
    "dataset.data_dir",
    "dataset.manual_dir",
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
      with open(history_path) as f:
        history = json.load(f)
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
  rates = config_checks.rates_of(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"--workdir={workdir} is a file, not a folder; give a folder (new or of this run)")
  os.makedirs(workdir, exist_ok=True)
  with _workdir_locked(workdir, jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, rates, hooks, allow_config_change)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    rates: affinity.Rates,
    hooks: Sequence[Hook],
    allow_config_change: bool = False,
) -> dict:
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

  ndev = jax.local_device_count()
  per_device = config.train.batch_size // jax.device_count()
  # The dataset is prepared (if needed, by process 0 only) before anything reads it.
  if is_chief:
    datasets.get_builder(
        config.dataset.name,
        data_dir=config.dataset.get("data_dir"),
        manual_dir=config.dataset.get("manual_dir"),
        num_classes=config.dataset.num_classes,
    )
  multihost.barrier("dataset prepared")
  stats = affinity_stats.load_or_compute(config, workdir, rates) if rates else None
  if stats is not None and is_chief:
    print(
        "[train] " + neighbour_stats.weight_table(stats, config.affinity.scheme, config.affinity.max_weight), flush=True
    )
  bias = affinity.prior_bias(stats.pos_freq) if rates else None
  model = build_model(config, rates, bias)
  rng = jax.random.key(config.seed)
  state = create_train_state(config, model, rng)
  compat = checkpoints.compat_record(config, rates)
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
        make_train_step(config, rates, stats, schedule),
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
        weight_map=boundary_weight_map(config),
    )
    batches = device_feed.prefetch_to_device(pipes.train)
    stack.callback(pipes.train.close)  # on every exit path: tf.data's threads must not outlive the run
    stack.callback(batches.close)
    palette = visualize.palette_for(config.dataset.name)
    total = config.train.num_steps
    if start >= total:
      logging.info("Checkpoint is at step %d >= train.num_steps=%d: nothing to train", start, total)
    state = flax.jax_utils.replicate(state)
    progress = periodic_actions.ReportProgress(
        num_train_steps=total, writer=writer, every_steps=config.train.log_every, every_secs=None
    )
    meta = lambda step: {
        "compat": compat,
        "step": step,
        "data_position": step * config.train.batch_size,
        "seed": config.seed,
    }
    train_metrics = None
    last = {}
    first_nonfinite = (jnp.int32(NO_STEP), jnp.float32(0.0))
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
          _check_loss(first_nonfinite, mngr)
          last = {k: float(v) for k, v in train_metrics.compute().items()}
          writer.write_scalars(step, last)
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
              visualize.summary_images(p_predict(variables, batch["image"]), batch, rates, config.dataset, palette),
          )
        for hook in hooks:
          hook(step, state)
        stop = preemption.requested or (jax.process_count() > 1 and mngr.reached_preemption(step))
        if step % config.train.checkpoint_every == 0 or step == total or stop:
          _check_loss(first_nonfinite, mngr)  # names the step where it went wrong, before the state check
          try:  # batch statistics can blow up while the loss (computed with batch statistics) stays finite
            checkpoints.save_checkpoint(mngr, flax.jax_utils.unreplicate(state), meta(step))
          except checkpoints.NonFiniteStateError as e:
            raise TrainingError(str(e)) from None
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
    result["eval"] = evaluate.evaluate_state(config, workdir, flax.jax_utils.unreplicate(state), rates, writer)
  return result
