"""One training step of the joint loss (paper Eq. 5): ``CE(ignore 255) + β · L_aff`` plus Table 5's optional
structure loss, its gradient summed over the ``pmap`` axis, and the step's metrics (``clu.metrics``). The loss and
the metrics are functions chosen once from the config (:func:`make_loss_fn`, :func:`make_metrics_fn`, in scenic's
``loss_fn`` / ``metrics_fn`` shape); :func:`train_step` itself knows no loss.

Imports only JAX-side libraries (jax, flax, optax, orbax, clu, ml_collections): the step runs, and is benchmarked,
on a machine without TensorFlow.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from dilaff_jax.method import affinity, structure_losses
from dilaff_jax.models.deeplab import upsample_logits
from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.engine.train_state import AAF_PARAMS, AXIS, TrainState
from dilaff_jax.method.neighbour_stats import AffinityStats


@flax.struct.dataclass
class SegmentationMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  ce_loss: metrics.Average.from_output("ce_loss")
  pixel_accuracy: metrics.Average.from_output("pixel_accuracy")
  learning_rate: metrics.LastValue.from_output("learning_rate")


# clu reads only a class's own annotations (no inheritance): the segmentation metrics plus the affinity ones
AffinityMetrics = metrics.Collection.create(
    **SegmentationMetrics.__annotations__,
    affinity_loss=metrics.Average.from_output("affinity_loss"),
    affinity_accuracy=metrics.Average.from_output("affinity_accuracy"),
)


@functools.cache
def _with_structure_loss(collection: type[metrics.Collection]) -> type[metrics.Collection]:
  """``collection`` plus the ``structure_loss`` average (AAF term, or the boundary-weighted CE)."""
  return metrics.Collection.create(
      **collection.__annotations__, structure_loss=metrics.Average.from_output("structure_loss")
  )


def segmentation_loss_sum(logits: jax.Array, labels: jax.Array, ignore_label: int) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy summed over labelled pixels, and their number.

  Equal to optax's masked ``softmax_cross_entropy_with_integer_labels`` up to rounding (tested); written out
  because optax's form (logsumexp minus the label's logit) rounds differently in the last bits, and the
  project's published runs were made with this one."""
  nll, valid = structure_losses.pixel_cross_entropy(logits, labels, ignore_label)
  return jnp.sum(nll), jnp.sum(valid)


LossFn = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict]]
MetricsFn = Callable[[dict, dict, jax.Array], metrics.Collection]


def _boundary_ce(config: ml_collections.ConfigDict):
  """Table 5's boundary reweighting: U-Net's weighted cross-entropy, which replaces the plain one."""
  ign = config.dataset.ignore_label

  def term(params, out, logits, batch, step, denom):
    del params, out, step
    weighted_sum, _ = structure_losses.boundary_loss_sum(logits, batch["label"], batch["weight"], ign)
    return weighted_sum / denom

  return term


def _aaf(config: ml_collections.ConfigDict):
  """Table 5's AAF term and its weight: λ, decayed tenfold over training as in the AAF code."""
  s, ign = config.structure, config.dataset.ignore_label

  def term(params, out, logits, batch, step, denom):
    del logits, denom
    grid = out["logits"].shape[1:3]  # on the output grid; each term's mean over the elements of the global batch
    sums, counts = structure_losses.aaf_loss_sum(
        out["logits"],
        structure_losses.labels_on_grid(batch["label"], grid),
        s.aaf_dilations,
        structure_losses.adaptive_weights(params[AAF_PARAMS]),
        s.aaf_margin,
        ign,
    )
    scale = s.aaf_weight * (10.0 ** (-step / config.train.num_steps) if s.aaf_decay else 1.0)
    return structure_losses.aaf_loss(sums, jax.lax.psum(counts, AXIS)), scale

  return term


# structure.kind -> (a term that replaces the cross-entropy, a weighted term added to the loss)
STRUCTURE_TERMS = {
    "none": lambda config: (None, None),
    "boundary": lambda config: (_boundary_ce(config), None),
    "aaf": lambda config: (None, _aaf(config)),
}


def make_loss_fn(spec: RunSpec, stats: AffinityStats | None) -> LossFn:
  """The training loss, chosen once from the spec: ``CE + β · L_aff`` (Eq. 5; no affinity term when ``spec.rates``
  is empty), with Table 5's structure loss plugged in (boundary reweighting replaces the CE, AAF adds its term).

  Returns ``loss_fn(params, out, batch, step) -> (loss, aux)`` on this device's shard of the batch: every term is
  normalised by the *global* number of labelled pixels (or AAF's global element counts), so the sum over the
  devices is the whole batch's loss. ``aux["terms"]`` holds ``loss``, ``ce_loss`` and, where used,
  ``affinity_loss`` and ``structure_loss`` on the same scale; ``aux["logits"]`` the upsampled logits the metrics
  read, and ``aux["affinity_counts"]`` (with ``rates``) this shard's correct and valid affinity signals."""
  config, rates = spec.config, spec.rates
  ign = config.dataset.ignore_label
  replace_ce, add_term = STRUCTURE_TERMS[spec.structure](config)
  a = config.affinity

  def loss_fn(params, out, batch, step):
    labels = batch["label"]
    size = labels.shape[1:3]
    logits = upsample_logits(out["logits"], size)
    ce_sum, n = segmentation_loss_sum(logits, labels, ign)
    denom = jnp.maximum(jax.lax.psum(n, AXIS), 1).astype(jnp.float32)
    terms = {"ce_loss": ce_sum / denom}
    aux = {"logits": logits, "terms": terms}
    loss = terms["ce_loss"]
    if replace_ce is not None:
      terms["structure_loss"] = loss = replace_ce(params, out, logits, batch, step, denom)
    if rates:
      aff_sum, _, aff_correct, aff_valid = affinity.affinity_loss_terms(
          out["affinity_logits"], labels, rates, stats, a.scheme, a.gamma, ign, a.max_weight, upsample=upsample_logits
      )
      aux["affinity_counts"] = (aff_correct, aff_valid)
      terms["affinity_loss"] = aff_sum / denom
      loss = loss + a.beta * terms["affinity_loss"]
    if add_term is not None:
      terms["structure_loss"], scale = add_term(params, out, logits, batch, step, denom)
      loss = loss + scale * terms["structure_loss"]
    terms["loss"] = loss
    return loss, aux

  return loss_fn


def make_metrics_fn(spec: RunSpec, schedule: optax.Schedule) -> MetricsFn:
  """The step's metrics, their collection chosen once: ``metrics_fn(aux, batch, step)`` sums :func:`make_loss_fn`'s
  terms over the devices and adds the pixel accuracy (and the affinity accuracy with ``rates``) and the learning
  rate. Every value is global: each device holds the same metrics."""
  rates = spec.rates
  ign = spec.config.dataset.ignore_label
  collection = AffinityMetrics if rates else SegmentationMetrics
  if spec.structure != "none":
    collection = _with_structure_loss(collection)
  psum = functools.partial(jax.lax.psum, axis_name=AXIS)

  def metrics_fn(aux, batch, step):
    labels = batch["label"]
    valid = labels != ign
    correct = jnp.sum((jnp.argmax(aux["logits"], -1) == labels) & valid)
    out = {k: psum(v) for k, v in aux["terms"].items()}
    out.update(learning_rate=schedule(step), pixel_accuracy=psum(correct) / jnp.maximum(psum(jnp.sum(valid)), 1))
    if rates:
      c, t = aux["affinity_counts"]
      out["affinity_accuracy"] = psum(c) / jnp.maximum(psum(t), 1)
    return collection.single_from_model_output(**out)

  return metrics_fn


def make_train_step(
    spec: RunSpec,
    stats: AffinityStats | None,
    schedule: optax.Schedule,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, metrics.Collection]]:
  """:func:`train_step` with the config's loss and metrics, for ``jax.pmap(..., axis_name="batch")``."""
  return functools.partial(
      train_step,
      loss_fn=make_loss_fn(spec, stats),
      metrics_fn=make_metrics_fn(spec, schedule),
      output_stride=spec.config.model.train_output_stride,
  )


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    metrics_fn: MetricsFn,
    output_stride: int,
) -> tuple[TrainState, metrics.Collection]:
  """One SGD step on this device's shard; call under ``pmap(axis_name="batch")``. The loss is computed once: its
  gradient is summed over the devices, and the metrics read the same computation's terms."""
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))

  def objective(params):
    out, new_vars = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        output_stride=output_stride,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    loss, aux = loss_fn(params, out, batch, state.step)
    return loss, (aux, new_vars["batch_stats"])

  grads, (aux, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  grads = jax.lax.psum(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, metrics_fn(aux, batch, state.step)
