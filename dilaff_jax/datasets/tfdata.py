"""tf.data options every pipeline of the project uses."""

from __future__ import annotations

import tensorflow as tf


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """``dataset`` with tf.data's autotuning off (parallel maps then use one thread per core).

  Why: the autotuner's background thread sleeps between rounds for a period that grows with the iterator's age, up
  to a minute, and deleting the iterator waits for that thread to wake. While JAX keeps the cores busy, an
  evaluation's iterator was measured to take 43 s to close after its last batch (a third of the evaluation of the
  300 tune scenes: 142 -> 98 s with autotuning off, the same numbers out) and a validation's up to 10 s. The
  pipelines here are light (decoding and cropping a few images per step), so the tuning gains nothing."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)
