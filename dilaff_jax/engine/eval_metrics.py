"""Evaluation metrics as ``clu.metrics``: the confusion matrix behind mIoU (paper §4) and the counts behind Fig. 4's
affinity accuracy per rate and neighbour category n_k.

Every metric here is a sum of integer counts: ``merge`` adds, so any split of the evaluation set into batches,
devices and hosts gives the same totals, and ``compute`` turns the totals into scores on the host.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int, valid: jax.Array) -> jax.Array:
  """``[C, C]`` int32 counts (row: ground truth, column: prediction) over the ``valid`` pixels."""
  idx = jnp.where(valid, labels * num_classes + preds, 0).reshape(-1)
  return (
      jnp.bincount(idx, weights=valid.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
      .reshape(num_classes, num_classes)
      .astype(jnp.int32)
  )


def confusion_matrix_np(labels: np.ndarray, preds: np.ndarray, num_classes: int, valid: np.ndarray) -> np.ndarray:
  """:func:`confusion_matrix` on the host (int64), for predictions made outside JAX (the dense CRF)."""
  idx = labels[valid].astype(np.int64) * num_classes + preds[valid]
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def present_classes(conf: np.ndarray) -> np.ndarray:
  """``[C]`` bool: the classes with at least one ground-truth pixel (a row sum > 0). Rows depend on the labels
  only, so every prediction scored on the same pixels (sweep columns, oracle, dense CRF) has the same set."""
  return np.asarray(conf).sum(1) > 0


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
  """Per-class IoU ``TP / (TP + FP + FN)``; NaN for a class absent from the labels (its IoU is undefined: a few
  false-positive pixels would make it 0, none would drop it, so it never counts; see :func:`present_classes`)."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(present_classes(conf), tp / union, np.nan)


def accuracy_from_confusion(conf: np.ndarray) -> np.ndarray:
  """Per-class pixel accuracy (recall) ``TP / (TP + FN)``; NaN for a class absent from the labels."""
  conf = np.asarray(conf, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(present_classes(conf), np.diag(conf) / conf.sum(1), np.nan)


def _mean_over(per_class: np.ndarray, classes: np.ndarray | None) -> float:
  """Mean of ``per_class`` over ``classes`` (bool ``[C]``; None: the defined ones). A class of ``classes`` whose
  score is undefined means the matrix was scored on other pixels than the one ``classes`` came from: a bug."""
  if classes is None:
    classes = ~np.isnan(per_class)
  chosen = per_class[np.asarray(classes, bool)]
  if chosen.size == 0:
    raise ValueError("no class has a ground-truth pixel: nothing to average")
  if np.isnan(chosen).any():
    raise ValueError("a class present in the reference ground truth has no pixel in this confusion matrix")
  return float(chosen.mean())


def mean_iou(conf: np.ndarray, classes: np.ndarray | None = None) -> float:
  """Mean IoU over ``classes`` (bool ``[C]``), by default those present in the labels (:func:`present_classes`)."""
  return _mean_over(iou_from_confusion(conf), classes)


def mean_accuracy(conf: np.ndarray, classes: np.ndarray | None = None) -> float:
  """mAcc: mean per-class pixel accuracy over ``classes`` (default: those present in the labels)."""
  return _mean_over(accuracy_from_confusion(conf), classes)


def overall_accuracy(conf: np.ndarray) -> float:
  """aAcc: the share of all scored pixels predicted right."""
  conf = np.asarray(conf, np.float64)
  return float(np.trace(conf) / conf.sum()) if conf.sum() else float("nan")


def _ratios(num: np.ndarray, den: np.ndarray) -> list:
  return [None if d == 0 else float(n / d) for n, d in zip(num, den)]


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
  """Summed ``[C, C]`` pixel counts (row: ground truth, column: prediction) of one batch's
  :func:`confusion_matrix`; ``compute`` gives the mIoU over the classes present in the labels."""

  matrix: jax.Array

  @classmethod
  def from_model_output(cls, matrix: jax.Array, **_) -> ConfusionMatrix:
    return cls(jnp.asarray(matrix))

  def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
    return type(self)(self.matrix + other.matrix)

  def reduce(self) -> ConfusionMatrix:
    return type(self)(self.matrix.sum(0))

  def per_class_iou(self) -> np.ndarray:
    return iou_from_confusion(np.asarray(self.matrix))

  def compute(self, classes: np.ndarray | None = None) -> float:
    """The mIoU over ``classes`` (default: the classes present in this matrix's labels)."""
    return mean_iou(np.asarray(self.matrix), classes)


@flax.struct.dataclass
class Count(metrics.Metric):
  """A summed integer count (the number of real images evaluated)."""

  total: jax.Array

  @classmethod
  def from_model_output(cls, total: jax.Array, **_) -> Count:
    return cls(jnp.asarray(total))

  def merge(self, other: Count) -> Count:
    return type(self)(self.total + other.total)

  def reduce(self) -> Count:
    return type(self)(self.total.sum(0))

  def compute(self) -> int:
    return int(self.total)


@flax.struct.dataclass
class AffinityAccuracy(metrics.Metric):
  """Fig. 4's counts ``[2, |R|, 9]``: correct and valid affinity signals per rate and centre-pixel category n_k
  (``affinity.affinity_accuracy_counts``, stacked); ``compute`` gives the accuracy per rate and the mean over
  rates, None where a category has no signal."""

  counts: jax.Array

  @classmethod
  def from_model_output(cls, counts: jax.Array, **_) -> AffinityAccuracy:
    return cls(jnp.asarray(counts))

  def merge(self, other: AffinityAccuracy) -> AffinityAccuracy:
    return type(self)(self.counts + other.counts)

  def reduce(self) -> AffinityAccuracy:
    return type(self)(self.counts.sum(0))

  def compute(self) -> dict:
    correct, total = np.asarray(self.counts)
    return {"per_rate": [_ratios(c, t) for c, t in zip(correct, total)], "mean": _ratios(correct.sum(0), total.sum(0))}


def sweep_name(affinity_source: str, iterations: int) -> str:
  """The field of a propagation sweep's confusion matrix: ``predicted_3`` (predicted affinity, 3 iterations)."""
  return f"{affinity_source}_{iterations}"


@functools.cache
def eval_collection(confusions: tuple[str, ...], with_affinity: bool) -> type[metrics.Collection]:
  """The evaluation's ``Collection``, filled from the model outputs of the same names: a :class:`ConfusionMatrix`
  per name in ``confusions`` (``plain`` without affinity, else one per propagation sweep point, see
  :func:`sweep_name`), ``num_images`` (:class:`Count`) and, ``with_affinity``, Fig. 4's ``affinity_accuracy``
  (:class:`AffinityAccuracy`)."""
  fields = {name: ConfusionMatrix.from_output(name) for name in confusions}
  fields["num_images"] = Count.from_output("num_images")
  if with_affinity:
    fields["affinity_accuracy"] = AffinityAccuracy.from_output("affinity_accuracy")
  return metrics.Collection.create(**fields)
