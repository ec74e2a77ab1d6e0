"""tf.data options every pipeline of the project uses (TensorFlow is imported at the first call, not with this
module: the commands set TensorFlow's environment first, ``process/tf_env``)."""

from __future__ import annotations


def without_autotune(dataset):
  """``dataset`` with tf.data's autotuning off (its maps keep ``AUTOTUNE`` parallelism, which then takes a fixed
  default instead of being tuned: the demo's training input read 200 batches in 2.7 s either way).

  Why: the autotuner's background thread sleeps between rounds for a period that grows with the iterator's age, up
  to a minute, and deleting the iterator waits for that thread to wake. While JAX keeps the cores busy, an
  evaluation's iterator was measured to take 43 s to close after its last batch (a third of the evaluation of the
  300 tune scenes: 142 -> 98 s with autotuning off, the same numbers out) and a validation's up to 10 s. The
  pipelines here are light (decoding and cropping a few images per step), so the tuning gains nothing."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)
