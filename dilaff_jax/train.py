"""Joint training of DeepLabv3+ and the dilated-affinity head (paper §3.2, §4.1).

Loss ``CE(ignore 255) + β · L_aff`` (Eq. 5) plus weight decay on kernels; SGD with momentum and DeepLab's poly
schedule (optax). Table 5's other structure losses (``config.structure``, :mod:`dilaff_jax.structure_losses`): AAF
adds its term (its adversarial size weights are the extra parameter ``params["aaf_weights"]``, updated by the same
optimizer through a gradient reversal); boundary reweighting replaces the CE by U-Net's weighted CE, with the weight
maps computed by the input pipeline. The step is ``jax.pmap``'d over axis ``batch`` with cross-replica BatchNorm;
the loss terms are normalised by the number of labelled pixels (AAF: of pairs) of the *global* batch, so a sharded
step equals the unsharded one. Checkpoints (:mod:`dilaff_jax.checkpoints`: finite, fingerprinted) hold the train
state; the data position and the RNG are functions of the step, so a resumed run continues exactly where the
interrupted one stopped. One training per workdir (:mod:`dilaff_jax.workdir_lock`).
"""

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from flax.training import train_state

from dilaff_jax import affinity, checkpoints, config_checks, datasets, errors, input_pipeline, pretrained
from dilaff_jax import structure_losses, visualize, workdir_lock
from dilaff_jax import stats as stats_lib
from dilaff_jax.models.deeplab import DeepLabV3Plus, upsample_logits

AXIS = "batch"
AAF_PARAMS = "aaf_weights"  # params key of AAF's raw adversarial size weights [2, num_classes, num_sizes]
Hook = Callable[[int, Any], None]


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot go on (non-finite loss, incompatible checkpoint, ...); the message says what to do."""


class TrainState(train_state.TrainState):
  batch_stats: Any


@flax.struct.dataclass
class SegmentationMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  ce_loss: metrics.Average.from_output("ce_loss")
  pixel_accuracy: metrics.Average.from_output("pixel_accuracy")
  learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class AffinityMetrics(metrics.Collection):  # clu reads only a class's own annotations: no inheritance
  loss: metrics.Average.from_output("loss")
  ce_loss: metrics.Average.from_output("ce_loss")
  pixel_accuracy: metrics.Average.from_output("pixel_accuracy")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  affinity_loss: metrics.Average.from_output("affinity_loss")
  affinity_accuracy: metrics.Average.from_output("affinity_accuracy")


@functools.cache
def _with_structure_loss(collection: type[metrics.Collection]) -> type[metrics.Collection]:
  """``collection`` plus the ``structure_loss`` average (AAF term, or the boundary-weighted CE)."""
  return metrics.Collection.create(**collection.__annotations__,
                                   structure_loss=metrics.Average.from_output("structure_loss"))


# ----------------------------------------------------------------------------------------------- model and state


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def build_model(config: ml_collections.ConfigDict, rates: affinity.Rates,
                affinity_bias: Sequence[float] | None = None, axis_name: str | None = AXIS) -> DeepLabV3Plus:
  """The DeepLabv3+ of ``config.model``; with ``rates`` it has the affinity head (bias from ``prior_bias``)."""
  m = config.model
  return DeepLabV3Plus(
      num_classes=config.dataset.num_classes, rates=tuple(rates),
      affinity_bias=None if affinity_bias is None else tuple(float(b) for b in affinity_bias),
      depth=m.depth, stem=m.stem, multi_grid=tuple(m.multi_grid), aspp_channels=m.aspp_channels,
      low_level_channels=m.low_level_channels, decoder_channels=m.decoder_channels, separable=m.separable,
      dropout_rate=m.dropout_rate, dtype=compute_dtype(m.dtype), bn_momentum=m.bn_momentum,
      bn_epsilon=m.bn_epsilon, axis_name=axis_name)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """DeepLab's poly schedule ``lr · (1 - step/steps)^power`` (optax), after an optional linear warm-up."""
  t = config.train
  poly = optax.polynomial_schedule(init_value=t.learning_rate, end_value=t.end_learning_rate, power=t.lr_power,
                                   transition_steps=max(t.num_steps - t.warmup_steps, 1))
  if not t.warmup_steps:
    return poly
  warm = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
  return optax.join_schedules([warm, poly], [t.warmup_steps])


def _kernel_mask(params):
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Weight decay on kernels (DeepLab's L2 regulariser) then SGD with momentum on the poly schedule."""
  return optax.chain(optax.add_decayed_weights(config.train.weight_decay, mask=_kernel_mask),
                     optax.sgd(learning_rate_schedule(config), momentum=config.train.momentum))


def create_train_state(config: ml_collections.ConfigDict, model: DeepLabV3Plus, rng: jax.Array) -> TrainState:
  """Initialises the variables (and loads ImageNet weights into the backbone when configured)."""
  size = config.dataset.crop_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  init = jax.jit(functools.partial(model.init, train=False, output_stride=config.model.train_output_stride))
  variables = flax.core.unfreeze(init({"params": rng, "dropout": rng}, dummy))
  weights = config_checks.pretrained_path(config)
  if weights is not None:
    variables = pretrained.load_pretrained_backbone(variables, weights, config.model.depth, config.model.stem)
    logging.info("Loaded ImageNet backbone weights from %s", weights)
  params = variables["params"]
  if config_checks.structure_kind(config) == "aaf":  # extra parameters beside the model's (flax ignores them)
    params[AAF_PARAMS] = structure_losses.init_adaptive_weights(config.dataset.num_classes,
                                                                len(config.structure.aaf_dilations))
  return TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(config),
                           batch_stats=variables["batch_stats"])


def state_template(config: ml_collections.ConfigDict, rates: affinity.Rates) -> TrainState:
  """A train state of ``config``'s structure to restore a checkpoint into (without the ImageNet weights: the
  checkpoint replaces every variable)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.pretrained = "none"
  return create_train_state(c, build_model(c, rates, axis_name=None), jax.random.key(0))


# ----------------------------------------------------------------------------------------------- losses


def segmentation_loss_sum(logits: jax.Array, labels: jax.Array, ignore_label: int) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy summed over labelled pixels, and their number."""
  valid = labels != ignore_label
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, config: ml_collections.ConfigDict,
               rates: affinity.Rates, stats: stats_lib.AffinityStats | None,
               schedule: optax.Schedule) -> tuple[TrainState, metrics.Collection]:
  """One SGD step on this device's shard; call under ``pmap(axis_name="batch")``."""
  ign = config.dataset.ignore_label
  images, labels = batch["image"], batch["label"]
  size = labels.shape[1:3]
  structure = config_checks.structure_kind(config)
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
  if structure == "aaf":  # λ, decayed tenfold over training as in the AAF code
    aaf_scale = config.structure.aaf_weight * (
        10.0 ** (-state.step / config.train.num_steps) if config.structure.aaf_decay else 1.0)

  def loss_fn(params):
    out, new_vars = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                   output_stride=config.model.train_output_stride, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    logits = upsample_logits(out["logits"], size)
    ce_sum, n = segmentation_loss_sum(logits, labels, ign)
    denom = jnp.maximum(jax.lax.psum(n, AXIS), 1).astype(jnp.float32)
    aux = {"batch_stats": new_vars["batch_stats"], "logits": logits, "ce": ce_sum / denom}
    loss = ce_sum / denom
    if structure == "boundary":  # U-Net's weighted CE replaces the plain one
      weighted_sum, _ = structure_losses.boundary_loss_sum(logits, labels, batch["weight"], ign)
      aux["structure"] = loss = weighted_sum / denom
    if rates:
      aff_logits = upsample_logits(out["affinity_logits"], size)
      aff_sum, _ = affinity.affinity_loss_sum(aff_logits, labels, rates, stats, config.affinity.scheme,
                                              config.affinity.gamma, ign, config.affinity.max_weight)
      aux.update(aff=aff_sum / denom, aff_logits=aff_logits)
      loss = loss + config.affinity.beta * aux["aff"]
    if structure == "aaf":  # on the output grid; each term's mean over the elements of the global batch
      s = config.structure
      grid = out["logits"].shape[1:3]
      sums, counts = structure_losses.aaf_loss_sum(
          out["logits"], structure_losses.labels_on_grid(labels, grid), s.aaf_dilations,
          structure_losses.adaptive_weights(params[AAF_PARAMS]), s.aaf_margin, ign)
      aux["structure"] = structure_losses.aaf_loss(sums, jax.lax.psum(counts, AXIS))
      loss = loss + aaf_scale * aux["structure"]
    return loss, aux

  grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.psum(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=aux["batch_stats"])

  valid = labels != ign
  correct = jnp.sum((jnp.argmax(aux["logits"], -1) == labels) & valid)
  psum = functools.partial(jax.lax.psum, axis_name=AXIS)
  out = dict(ce_loss=psum(aux["ce"]), learning_rate=schedule(state.step),
             pixel_accuracy=psum(correct) / jnp.maximum(psum(jnp.sum(valid)), 1))
  out["loss"] = out["ce_loss"]
  collection = SegmentationMetrics
  if rates:
    c, t = affinity.affinity_accuracy_counts(aux["aff_logits"], labels, rates, ign, stats.partial_neighbors)
    out["affinity_loss"] = psum(aux["aff"])
    out["affinity_accuracy"] = psum(c.sum()) / jnp.maximum(psum(t.sum()), 1)
    out["loss"] = out["ce_loss"] + config.affinity.beta * out["affinity_loss"]
    collection = AffinityMetrics
  if structure != "none":
    out["structure_loss"] = psum(aux["structure"])
    if structure == "boundary":
      out["loss"] = out["loss"] - out["ce_loss"] + out["structure_loss"]
    else:
      out["loss"] = out["loss"] + aaf_scale * out["structure_loss"]
    collection = _with_structure_loss(collection)
  # every value is already summed over the devices: each device holds the global metrics
  return new_state, collection.single_from_model_output(**out)


def boundary_weight_map(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray] | None:
  """U-Net's weight map for the input pipeline when ``structure.kind`` is ``boundary``, else None.

  σ is scaled from U-Net's 512-px images to the training crop: ``σ_px = boundary_sigma · crop_size / 512``.
  """
  if config_checks.structure_kind(config) != "boundary":
    return None
  s = config.structure
  return functools.partial(
      structure_losses.unet_weight_map, num_classes=config.dataset.num_classes,
      ignore_label=config.dataset.ignore_label, w0=s.boundary_w0,
      sigma=s.boundary_sigma * config.dataset.crop_size / structure_losses.UNET_SCALE,
      background=s.boundary_background, class_balance=s.boundary_class_balance)


# ----------------------------------------------------------------------------------------------- statistics


def load_or_compute_stats(config: ml_collections.ConfigDict, workdir: str,
                          rates: affinity.Rates) -> stats_lib.AffinityStats:
  """``freq(n_k, r)`` and ``π_r`` for ``rates``: from ``affinity.stats_path`` if set, else from
  ``<workdir>/affinity_stats.json``, computing and writing that file from the training labels when missing.
  Statistics that leave ``affinity.scheme``'s weights undefined (a rate too large for the images) raise a
  :class:`stats_lib.StatsError` here, before anything is compiled."""
  path = config.affinity.stats_path or os.path.join(workdir, "affinity_stats.json")
  rule = config.affinity.partial_neighbors
  _barrier("before affinity statistics")  # every process sees the same file state below
  compute = not os.path.exists(path) and not config.affinity.stats_path  # the same on every process
  if compute and jax.process_index() > 0:  # process 0 computes and writes the file; the others wait for it
    _barrier("affinity statistics written")
  if not compute or jax.process_index() > 0:
    try:
      s = stats_lib.AffinityStats.load(path).select(rates)
    except (ValueError, KeyError) as e:
      raise config_checks.ConfigError(f"config.affinity.stats_path = {path!r}: {e}; recompute with "
                                      "`python -m dilaff_jax.stats`") from None
    if s.partial_neighbors != rule:
      raise config_checks.ConfigError(
          f"config.affinity.partial_neighbors = {rule!r}, but the statistics in {path!r} were counted with "
          f"{s.partial_neighbors!r}: recompute them with `python -m dilaff_jax.stats --partial_neighbors={rule}` "
          "(or delete the workdir's file to let training recompute it)")
    logging.info("Affinity statistics from %s (%s)", path, s.source)
    stats_lib.check_weights_defined(s, config.affinity.scheme)
    return s
  d = config.dataset
  name, data_dir = datasets.location(d.name, data_dir=d.get("data_dir"), manual_dir=d.get("manual_dir"),
                                     num_classes=d.num_classes)
  maps, total = stats_lib.tfds_label_maps(name, d.train_split, data_dir, config.affinity.stats_max_images)
  logging.info("Computing affinity statistics over %d training label maps (once; saved to %s)", total, path)
  s = stats_lib.compute_usable_stats(maps, rates, d.ignore_label, f"{d.name}:{d.train_split}",
                                     scheme=config.affinity.scheme, log_every=max(total // 10, 1), total=total,
                                     partial_neighbors=rule)
  s.save(path)
  _barrier("affinity statistics written")
  return s


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------- summaries


def _image_summaries(p_predict, variables, batch, rates, config, palette) -> dict[str, np.ndarray]:
  out = p_predict(variables, batch["image"])
  labels = np.asarray(batch["label"][0][:2])
  size = labels.shape[1:3]
  logits = np.asarray(upsample_logits(out["logits"][0][:2], size))
  images = visualize.denormalize(np.asarray(batch["image"][0][:2]), config.dataset.mean, config.dataset.std)
  pics = {"input": images, "label": visualize.colorize(labels, palette),
          "prediction": visualize.colorize(logits.argmax(-1), palette)}
  if rates:
    aff = np.asarray(jax.nn.sigmoid(upsample_logits(out["affinity_logits"][0][:2, ..., :8], size)))
    pics[f"affinity_rate_{affinity.rate_label(rates[0])}"] = visualize.affinity_picture(aff)
  return pics


# ----------------------------------------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (then it checkpoints and returns)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, the orbax preemption check still works multi-host
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


NO_STEP = np.iinfo(np.int32).max  # "no non-finite loss yet"


@jax.jit
def _track_nonfinite(first: tuple[jax.Array, jax.Array], loss: metrics.Average,
                     step: int) -> tuple[jax.Array, jax.Array]:
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
        "train.learning_rate or affinity.beta, or check the input data.")


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[Hook] = ()) -> dict:
  """Trains to ``config.train.num_steps`` (resuming from ``workdir``), then evaluates if configured.

  One training per workdir (``<workdir>/train.lock``). ``hooks`` are called as ``hook(step, state)`` after every
  step (tests use them to interrupt runs). Returns the last training metrics and, when evaluated, the evaluation
  results.
  """
  config_checks.validate(config, num_devices=jax.device_count())
  rates = config_checks.rates_of(config)
  os.makedirs(workdir, exist_ok=True)
  with _workdir_locked(workdir, jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, rates, hooks)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, rates: affinity.Rates,
                        hooks: Sequence[Hook]) -> dict:
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)

  ndev = jax.local_device_count()
  per_device = config.train.batch_size // jax.device_count()
  # The dataset is prepared (if needed, by process 0 only) before anything reads it.
  if is_chief:
    datasets.get_builder(config.dataset.name, data_dir=config.dataset.get("data_dir"),
                         manual_dir=config.dataset.get("manual_dir"), num_classes=config.dataset.num_classes)
  _barrier("dataset prepared")
  stats = load_or_compute_stats(config, workdir, rates) if rates else None
  if stats is not None and is_chief:
    print("[train] " + stats_lib.weight_table(stats, config.affinity.scheme, config.affinity.max_weight), flush=True)
  bias = affinity.prior_bias(stats.pos_freq) if rates else None
  model = build_model(config, rates, bias)
  rng = jax.random.key(config.seed)
  state = create_train_state(config, model, rng)
  compat = checkpoints.compat_record(config, rates)
  with checkpoints.opened(workdir, config, write=True) as mngr:
    if mngr.latest_step() is not None:
      state, _, damaged = checkpoints.restore_newest_intact(mngr, state, compat)
      _barrier("checkpoints verified")
      if is_chief:  # out of the way of this run's saves and of rotation; kept for inspection
        checkpoints.move_aside(mngr, damaged)
      _barrier("damaged checkpoints moved aside")
      mngr.reload()
      print(f"[train] resumed from the checkpoint at step {int(state.step)} in {mngr.directory}", flush=True)
    start = int(state.step)
    if is_chief:  # written once the checkpoint is known to fit this config (predict reads it)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))

    schedule = learning_rate_schedule(config)
    p_step = jax.pmap(functools.partial(train_step, config=config, rates=rates, stats=stats, schedule=schedule),
                      axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
    p_predict = jax.pmap(functools.partial(model.apply, train=False,
                                           output_stride=config.model.train_output_stride), axis_name=AXIS)
    pipes = input_pipeline.from_config(config.dataset, seed=config.seed, local_device_count=ndev,
                                       per_device_batch=per_device, start_step=start,
                                       weight_map=boundary_weight_map(config))
    batches = input_pipeline.prefetch_to_device(pipes.train)
    palette = visualize.palette_for(config.dataset.name)
    total = config.train.num_steps
    if start >= total:
      logging.info("Checkpoint is at step %d >= train.num_steps=%d: nothing to train", start, total)
    state = flax.jax_utils.replicate(state)
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                               every_steps=config.train.log_every, every_secs=None)
    meta = lambda step: {"compat": compat, "step": step, "data_position": step * config.train.batch_size,
                         "seed": config.seed}
    train_metrics = None
    last = {}
    first_nonfinite = (jnp.int32(NO_STEP), jnp.float32(0.0))
    t0 = time.time()
    with _Preemption() as preemption:
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
          print(f"[train] step {step}/{total} loss {last['loss']:.4f} pixel_acc {last['pixel_accuracy']:.3f}"
                + (f" aff_acc {last['affinity_accuracy']:.3f}" if rates else "")
                + f" lr {last['learning_rate']:.2e} | {(step - start) / elapsed:.2f} steps/s, ETA {eta:.0f}s",
                flush=True)
          train_metrics = None
        if is_chief and config.train.image_summary_every and step % config.train.image_summary_every == 0:
          variables = {"params": state.params, "batch_stats": state.batch_stats}
          writer.write_images(step, _image_summaries(p_predict, variables, batch, rates, config, palette))
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
          logging.warning("Stopped at step %d after a preemption request; rerun with the same --workdir to resume",
                          step)
          print(f"[train] preempted: checkpoint saved at step {step}; rerun to resume", flush=True)
          writer.flush()
          return {"train": last, "preempted_at": step}
  writer.flush()
  result = {"train": last}
  if config.train.eval_at_end:
    from dilaff_jax import evaluate  # local: evaluation imports this module
    result["eval"] = evaluate.evaluate_state(config, workdir, flax.jax_utils.unreplicate(state), rates, writer)
  return result
