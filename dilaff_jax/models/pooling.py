"""The ResNet stem's max pooling (3x3, stride 2, padding 1), with a gradient that runs as fast on CPU as the pooling.

The same values as ``flax.linen.max_pool`` (``lax.reduce_window`` with ``max``) and the same gradient: all of a
window's output gradient goes to the first position of the window, in row-major order, that holds its maximum (as
XLA's ``select_and_scatter`` with ``>=``). Written as the maximum of the window's ``k x k`` strided slices, with the
gradient spelled out as ``k x k`` strided pads of the selected output gradients: XLA:CPU runs
``reduce_window``'s automatic gradient as a scalar argmax loop (about 50 ms a step for the demo's stem, 4x the
forward and backward here; ``benchmarks/train_step.py`` measures the whole step). Overlapping windows add their
gradients in another order than ``select_and_scatter``, so the gradient equals the automatic one up to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _window_taps(padded: jax.Array, window: int, stride: int, out_hw: tuple[int, int]):
  """``(i, j, slice)`` for every position ``(i, j)`` of the window, row-major: ``slice[b, y, x, c] =
  padded[b, i + stride·y, j + stride·x, c]``, of the output's spatial size."""
  b, _, _, c = padded.shape
  ho, wo = out_hw
  for i in range(window):
    for j in range(window):
      end = (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c)
      yield i, j, jax.lax.slice(padded, (0, i, j, 0), end, (1, stride, stride, 1))


def _pad_and_size(x: jax.Array, window: int, stride: int, padding: int):
  _, h, w, _ = x.shape
  out_hw = ((h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1)
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jnp.pad(x, pads, constant_values=-jnp.inf), out_hw


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """Max pooling of ``[B, H, W, C]`` over ``window x window`` windows with ``stride`` and symmetric ``padding``
  (padding never wins: it is ``-inf``), as ``nn.max_pool(x, (window, window), (stride, stride), ((padding,
  padding),) * 2)``."""
  return _max_pool_fwd(x, window, stride, padding)[0]


def _max_pool_fwd(x, window, stride, padding):
  if window < 1 or stride < 1 or not 0 <= padding < window:
    raise ValueError(f"max_pool: window {window}, stride {stride}, padding {padding} (need 0 <= padding < window)")
  padded, out_hw = _pad_and_size(x, window, stride, padding)
  y = None
  for _, _, tap in _window_taps(padded, window, stride, out_hw):
    y = tap if y is None else jnp.maximum(y, tap)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
  x, y = residuals
  _, h, w, _ = x.shape
  padded, out_hw = _pad_and_size(x, window, stride, padding)
  hp, wp = padded.shape[1:3]
  ho, wo = out_hw
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)  # the window's maximum already found at an earlier position
  dx = None
  for i, j, tap in _window_taps(padded, window, stride, out_hw):
    chosen = (tap == y) & ~taken
    taken = taken | chosen
    # back to the padded input: position (y, x) of this tap is padded[i + stride·y, j + stride·x]
    spread = (
        (0, 0, 0),
        (i, hp - i - stride * (ho - 1) - 1, stride - 1),
        (j, wp - j - stride * (wo - 1) - 1, stride - 1),
        (0, 0, 0),
    )
    part = jax.lax.pad(jnp.where(chosen, g, zero), zero, spread)
    dx = part if dx is None else dx + part
  return (dx[:, padding : padding + h, padding : padding + w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
