"""A fusion barrier for XLA: compute a function's inputs once, into buffers of their own."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def computed_once(fn, *args):
  """``fn(*args)`` in a conditional whose two branches are both ``fn``.

  XLA fuses nothing across a conditional, so ``args`` are computed into buffers before ``fn`` runs and ``fn``'s
  outputs are computed once. Without it XLA:CPU fuses cheap-looking producers into their consumers and recomputes
  them per use: the 8·|R| label comparisons for every channel of every pixel in the affinity loss, the focal
  loss's gradient at each read of the upsampling's transpose, or propagation's last step once per class in the
  argmax after it (3-50x slower). ``jax.lax.optimization_barrier`` does not do this: XLA:CPU removes it before
  fusion. The predicate is traced (any value: both branches are ``fn``), so it is never folded away.
  """
  pred = jnp.ravel(args[0])[0] != 0
  return jax.lax.cond(pred, fn, fn, *args)
