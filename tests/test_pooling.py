"""The stem's max pooling: nn.max_pool's values, and the gradient of a brute-force loop over the windows."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dilaff_jax.models.pooling import max_pool


def brute_max_pool_grad(x, g, window, stride, padding):
  """Each window's output gradient to the first (row-major) position of the window holding its maximum."""
  b, h, w, c = x.shape
  dx = np.zeros_like(x, dtype=np.float64)
  for n, oy, ox, ch in np.ndindex(*g.shape):
    best, where = -np.inf, None
    for i in range(window):
      for j in range(window):
        yy, xx = oy * stride + i - padding, ox * stride + j - padding
        if 0 <= yy < h and 0 <= xx < w and x[n, yy, xx, ch] > best:
          best, where = x[n, yy, xx, ch], (yy, xx)
    dx[n, where[0], where[1], ch] += g[n, oy, ox, ch]
  return dx


CASES = [((2, 9, 8, 3), 3, 2, 1), ((1, 7, 7, 2), 3, 1, 1), ((2, 8, 6, 2), 2, 2, 0), ((1, 10, 11, 2), 3, 2, 0)]


@pytest.mark.parametrize("shape,window,stride,padding", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_values_and_gradient_match_flax_and_a_loop(shape, window, stride, padding, ties):
  rng = np.random.default_rng(sum(shape) + window + ties)
  x = rng.integers(0, 3, size=shape).astype(np.float32) if ties else rng.normal(size=shape).astype(np.float32)
  flax_pool = lambda x: nn.max_pool(x, (window, window), (stride, stride), ((padding, padding), (padding, padding)))
  y = max_pool(jnp.asarray(x), window, stride, padding)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(flax_pool(jnp.asarray(x))))
  g = rng.normal(size=y.shape).astype(np.float32)
  (dx,) = jax.vjp(lambda x: max_pool(x, window, stride, padding), jnp.asarray(x))[1](jnp.asarray(g))
  want = brute_max_pool_grad(x, g, window, stride, padding)
  np.testing.assert_allclose(np.asarray(dx), want, rtol=1e-6, atol=1e-6)
  (flax_dx,) = jax.vjp(flax_pool, jnp.asarray(x))[1](jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), np.asarray(flax_dx), rtol=1e-6, atol=1e-6)
  if ties:  # many windows hold their maximum twice or more: all of the gradient still goes to one position
    assert np.count_nonzero(np.asarray(dx)) <= g.size


def test_max_pool_in_bfloat16_and_under_jit():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 4)), jnp.bfloat16)
  y = jax.jit(lambda x: max_pool(x))(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(y, np.float32), np.asarray(nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))), np.float32)
  )


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 3), (0, 1, 0), (3, 0, 1), (3, 2, -1)])
def test_max_pool_refuses_a_window_that_padding_could_fill(window, stride, padding):
  with pytest.raises(ValueError, match="max_pool"):
    max_pool(jnp.zeros((1, 5, 5, 1)), window, stride, padding)
