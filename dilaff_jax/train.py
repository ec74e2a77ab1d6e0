"""Joint training of DeepLabv3+ and the dilated-affinity head (paper §3.2, §4.1).

Loss ``CE(ignore 255) + β · L_aff`` (Eq. 5) plus weight decay on kernels; SGD with momentum and DeepLab's poly
schedule (optax). The step is ``jax.pmap``'d over axis ``batch`` with cross-replica BatchNorm; both loss terms are
normalised by the number of labelled pixels of the *global* batch, so a sharded step equals the unsharded one.
Checkpoints (Orbax, asynchronous) hold the train state; the data position and the RNG are functions of the step,
so a resumed run continues exactly where the interrupted one stopped.
"""

import functools
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from flax.training import train_state

from dilaff_jax import affinity, config_checks, datasets, errors, input_pipeline, pretrained, visualize
from dilaff_jax import stats as stats_lib
from dilaff_jax.models.deeplab import DeepLabV3Plus, upsample_logits

AXIS = "batch"
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
  if config.model.pretrained:
    variables = pretrained.load_pretrained_backbone(variables, config.model.pretrained, config.model.depth,
                                                    config.model.stem)
    logging.info("Loaded ImageNet backbone weights from %s", config.model.pretrained)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=create_optimizer(config),
                           batch_stats=variables["batch_stats"])


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
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))

  def loss_fn(params):
    out, new_vars = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                   output_stride=config.model.train_output_stride, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    logits = upsample_logits(out["logits"], size)
    ce_sum, n = segmentation_loss_sum(logits, labels, ign)
    denom = jnp.maximum(jax.lax.psum(n, AXIS), 1).astype(jnp.float32)
    aux = {"batch_stats": new_vars["batch_stats"], "logits": logits, "ce": ce_sum / denom}
    loss = ce_sum / denom
    if rates:
      aff_logits = upsample_logits(out["affinity_logits"], size)
      aff_sum, _ = affinity.affinity_loss_sum(aff_logits, labels, rates, stats, config.affinity.scheme,
                                              config.affinity.gamma, ign, config.affinity.max_weight)
      aux.update(aff=aff_sum / denom, aff_logits=aff_logits)
      loss = loss + config.affinity.beta * aux["aff"]
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
    c, t = affinity.affinity_accuracy_counts(aux["aff_logits"], labels, rates, ign)
    out["affinity_loss"] = psum(aux["aff"])
    out["affinity_accuracy"] = psum(c.sum()) / jnp.maximum(psum(t.sum()), 1)
    out["loss"] = out["ce_loss"] + config.affinity.beta * out["affinity_loss"]
    collection = AffinityMetrics
  # every value is already summed over the devices: each device holds the global metrics
  return new_state, collection.single_from_model_output(**out)


# ----------------------------------------------------------------------------------------------- statistics


def load_or_compute_stats(config: ml_collections.ConfigDict, workdir: str,
                          rates: affinity.Rates) -> stats_lib.AffinityStats:
  """``freq(n_k, r)`` and ``π_r`` for ``rates``: from ``affinity.stats_path`` if set, else from
  ``<workdir>/affinity_stats.json``, computing and writing that file from the training labels when missing."""
  path = config.affinity.stats_path or os.path.join(workdir, "affinity_stats.json")
  _barrier("before affinity statistics")  # every process sees the same file state below
  if os.path.exists(path) or config.affinity.stats_path:
    s = stats_lib.AffinityStats.load(path)
    try:
      s = s.select(rates)
    except ValueError as e:
      raise config_checks.ConfigError(f"config.affinity.stats_path = {path!r}: {e}; recompute with "
                                      "`python -m dilaff_jax.stats`") from None
    logging.info("Affinity statistics from %s (%s)", path, s.source)
    return s
  if jax.process_index() > 0:  # process 0 computes and writes the file; the others wait for it
    _barrier("affinity statistics written")
    return stats_lib.AffinityStats.load(path).select(rates)
  d = config.dataset
  name, data_dir = datasets.location(d.name, data_dir=d.get("data_dir"), manual_dir=d.get("manual_dir"),
                                     num_classes=d.num_classes)
  maps, total = stats_lib.tfds_label_maps(name, d.train_split, data_dir, config.affinity.stats_max_images)
  logging.info("Computing affinity statistics over %d training label maps (once; saved to %s)", total, path)
  s = stats_lib.compute_stats(maps, rates, d.ignore_label, f"{d.name}:{d.train_split}",
                              log_every=max(total // 10, 1), total=total)
  s.save(path)
  _barrier("affinity statistics written")
  return s


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------- checkpoints


def compat_record(config: ml_collections.ConfigDict, rates: affinity.Rates) -> dict:
  """What a checkpoint must agree with to be restored into this config."""
  m = config.model
  return {"model.depth": m.depth, "model.stem": m.stem, "model.multi_grid": list(m.multi_grid),
          "model.aspp_channels": m.aspp_channels, "model.low_level_channels": m.low_level_channels,
          "model.decoder_channels": m.decoder_channels, "model.separable": m.separable,
          "dataset.num_classes": config.dataset.num_classes,
          "affinity.rates (explicit)": [list(r) for r in rates]}


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                               item_names=("state", "meta"))


def _host_state(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
  """Saves an (unreplicated) state asynchronously; ``meta`` is JSON (compat record, data position)."""
  host = jax.device_get(_host_state(state))
  mngr.save(int(host["step"]), args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                       meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, compat: dict,
                       step: int | None = None) -> tuple[TrainState, dict]:
  """Restores the latest (or ``step``) checkpoint into ``state``'s structure, checking compatibility first."""
  step = mngr.latest_step() if step is None else step
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  diffs = [f"{k}: checkpoint has {meta['compat'].get(k)!r}, config has {v!r}" for k, v in compat.items()
           if meta["compat"].get(k) != v]
  if diffs:
    raise TrainingError(f"checkpoint {mngr.directory}/{step} comes from an incompatible config:\n  "
                        + "\n  ".join(diffs) + "\nUse another --workdir or the config the run was started with.")
  target = jax.device_get(_host_state(state))
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except (ValueError, KeyError) as e:
    raise TrainingError(f"checkpoint {mngr.directory}/{step} does not fit this model: {e}") from None
  new = state.replace(step=restored["step"], params=restored["params"], batch_stats=restored["batch_stats"],
                      opt_state=restored["opt_state"])
  return new, meta


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Sequence[Hook] = ()) -> dict:
  """Trains to ``config.train.num_steps`` (resuming from ``workdir``), then evaluates if configured.

  ``hooks`` are called as ``hook(step, state)`` after every step (tests use them to interrupt runs).
  Returns the last training metrics and, when evaluated, the evaluation results.
  """
  config_checks.validate(config, num_devices=jax.device_count())
  rates = config_checks.rates_of(config)
  os.makedirs(workdir, exist_ok=True)
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
  bias = affinity.prior_bias(stats.pos_freq) if rates else None
  model = build_model(config, rates, bias)
  rng = jax.random.key(config.seed)
  state = create_train_state(config, model, rng)
  compat = compat_record(config, rates)
  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    state, meta = restore_checkpoint(mngr, state, compat)
    print(f"[train] resumed from the checkpoint at step {int(state.step)} in {mngr.directory}", flush=True)
  start = int(state.step)
  if is_chief:  # written once the checkpoint is known to fit this config (predict reads it)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  schedule = learning_rate_schedule(config)
  p_step = jax.pmap(functools.partial(train_step, config=config, rates=rates, stats=stats, schedule=schedule),
                    axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
  p_predict = jax.pmap(functools.partial(model.apply, train=False, output_stride=config.model.train_output_stride),
                       axis_name=AXIS)
  pipes = input_pipeline.from_config(config.dataset, seed=config.seed, local_device_count=ndev,
                                     per_device_batch=per_device, start_step=start)
  batches = input_pipeline.prefetch_to_device(pipes.train)
  palette = visualize.palette_for(config.dataset.name)
  total = config.train.num_steps
  if start >= total:
    logging.info("Checkpoint is at step %d >= train.num_steps=%d: nothing to train", start, total)
  state = flax.jax_utils.replicate(state)
  progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_steps=config.train.log_every,
                                             every_secs=None)
  meta = lambda step: {"compat": compat, "step": step, "data_position": step * config.train.batch_size,
                       "seed": config.seed}
  train_metrics = None
  last = {}
  t0 = time.time()
  with _Preemption() as preemption:
    for step in range(start + 1, total + 1):
      batch = next(batches)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = p_step(state, batch, rng)
      step_metrics = step_metrics.unreplicate()
      loss = float(step_metrics.loss.compute())
      if not np.isfinite(loss):
        mngr.wait_until_finished()
        good = mngr.latest_step()
        mngr.close()
        raise TrainingError(
            f"non-finite loss ({loss}) at step {step}: stopping without saving this state. The last good "
            f"checkpoint is {'step ' + str(good) if good is not None else 'none'} in {mngr.directory}. Lower "
            "train.learning_rate or affinity.beta, or check the input data.")
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      progress(step)
      if step % config.train.log_every == 0 or step == total:
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
        save_checkpoint(mngr, flax.jax_utils.unreplicate(state), meta(step))
      if stop:
        mngr.wait_until_finished()
        logging.warning("Stopped at step %d after a preemption request; rerun with the same --workdir to resume",
                        step)
        print(f"[train] preempted: checkpoint saved at step {step}; rerun to resume", flush=True)
        writer.flush()
        mngr.close()
        return {"train": last, "preempted_at": step}
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  result = {"train": last}
  if config.train.eval_at_end:
    from dilaff_jax import evaluate  # local: evaluation imports this module
    result["eval"] = evaluate.evaluate_state(config, workdir, flax.jax_utils.unreplicate(state), rates, writer)
  return result
