"""One training step of the joint loss (paper Eq. 5): ``CE(ignore 255) + β · L_aff`` plus Table 5's optional
structure loss, its gradient summed over the ``pmap`` axis, and the step's metrics (``clu.metrics``).

Imports only JAX-side libraries (jax, flax, optax, orbax, clu, ml_collections): the step runs, and is benchmarked,
on a machine without TensorFlow.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics

from dilaff_jax import affinity, config_checks, structure_losses
from dilaff_jax.models.deeplab import upsample_logits
from dilaff_jax.state import AAF_PARAMS, AXIS, TrainState
from dilaff_jax.stats import AffinityStats


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


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    rates: affinity.Rates,
    stats: AffinityStats | None,
    schedule: optax.Schedule,
) -> tuple[TrainState, metrics.Collection]:
  """One SGD step on this device's shard; call under ``pmap(axis_name="batch")``."""
  ign = config.dataset.ignore_label
  images, labels = batch["image"], batch["label"]
  size = labels.shape[1:3]
  structure = config_checks.structure_kind(config)
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
  if structure == "aaf":  # λ, decayed tenfold over training as in the AAF code
    aaf_scale = config.structure.aaf_weight * (
        10.0 ** (-state.step / config.train.num_steps) if config.structure.aaf_decay else 1.0
    )

  def loss_fn(params):
    out, new_vars = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        output_stride=config.model.train_output_stride,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
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
      aff_sum, _ = affinity.affinity_loss_sum(
          aff_logits,
          labels,
          rates,
          stats,
          config.affinity.scheme,
          config.affinity.gamma,
          ign,
          config.affinity.max_weight,
      )
      aux.update(aff=aff_sum / denom, aff_logits=aff_logits)
      loss = loss + config.affinity.beta * aux["aff"]
    if structure == "aaf":  # on the output grid; each term's mean over the elements of the global batch
      s = config.structure
      grid = out["logits"].shape[1:3]
      sums, counts = structure_losses.aaf_loss_sum(
          out["logits"],
          structure_losses.labels_on_grid(labels, grid),
          s.aaf_dilations,
          structure_losses.adaptive_weights(params[AAF_PARAMS]),
          s.aaf_margin,
          ign,
      )
      aux["structure"] = structure_losses.aaf_loss(sums, jax.lax.psum(counts, AXIS))
      loss = loss + aaf_scale * aux["structure"]
    return loss, aux

  grads, aux = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.psum(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=aux["batch_stats"])

  valid = labels != ign
  correct = jnp.sum((jnp.argmax(aux["logits"], -1) == labels) & valid)
  psum = functools.partial(jax.lax.psum, axis_name=AXIS)
  out = dict(
      ce_loss=psum(aux["ce"]),
      learning_rate=schedule(state.step),
      pixel_accuracy=psum(correct) / jnp.maximum(psum(jnp.sum(valid)), 1),
  )
  out["loss"] = out["ce_loss"]
  collection = SegmentationMetrics
  if rates:
    c, t = affinity.affinity_accuracy_total(aux["aff_logits"], labels, rates, ign)
    out["affinity_loss"] = psum(aux["aff"])
    out["affinity_accuracy"] = psum(c) / jnp.maximum(psum(t), 1)
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
