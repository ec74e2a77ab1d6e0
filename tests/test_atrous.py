"""Atrous convolution tap by tap: lax.conv_general_dilated's values and gradients, and when it is used."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dilaff_jax.models import atrous

NUMBERS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w, rate, pad, groups=1):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), pad, rhs_dilation=rate, dimension_numbers=NUMBERS, feature_group_count=groups
  )


def taps_conv(x, w, rate, pad, groups=1):
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, NUMBERS)
  return atrous.conv_general_dilated(
      x, w, (1, 1), pad, rhs_dilation=rate, dimension_numbers=numbers, feature_group_count=groups
  )


def brute_conv(x, w, rate, pad):
  """out[b, y, x, o] = sum over taps inside the map of x[b, y + i·r - pad, x + j·r - pad, c] · w[i, j, c, o]."""
  b, h, wd, _ = x.shape
  kh, kw, _, co = w.shape
  ho = h + sum(pad[0]) - (kh - 1) * rate[0]
  wo = wd + sum(pad[1]) - (kw - 1) * rate[1]
  out = np.zeros((b, ho, wo, co))
  for y, xx, i, j in np.ndindex(ho, wo, kh, kw):
    sy, sx = y + i * rate[0] - pad[0][0], xx + j * rate[1] - pad[1][0]
    if 0 <= sy < h and 0 <= sx < wd:
      out[:, y, xx] += x[:, sy, sx] @ w[i, j]
  return out


@pytest.mark.parametrize(
    "shape,rate", [((2, 9, 7, 3), (2, 2)), ((1, 6, 6, 2), (4, 4)), ((2, 5, 8, 3), (6, 3)), ((1, 4, 4, 2), (9, 9))]
)
def test_taps_equal_the_convolution_and_a_loop_values_and_gradients(shape, rate):
  rng = np.random.default_rng(sum(shape) + rate[0])
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(3, 3, shape[-1], 4)).astype(np.float32)
  pad = ((rate[0], rate[0]), (rate[1], rate[1]))  # DeepLab's "same" padding of a 3x3 atrous convolution
  assert atrous.padding_share(shape[1:3], (3, 3), rate, pad) >= atrous.MIN_PADDING_SHARE
  got = taps_conv(jnp.asarray(x), jnp.asarray(w), rate, pad)
  np.testing.assert_allclose(np.asarray(got), brute_conv(x, w, rate, pad), rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=got.shape).astype(np.float32))
  want_grads = jax.vjp(lambda x, w: lax_conv(x, w, rate, pad), jnp.asarray(x), jnp.asarray(w))[1](g)
  got_grads = jax.vjp(lambda x, w: taps_conv(x, w, rate, pad), jnp.asarray(x), jnp.asarray(w))[1](g)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # the program holds no convolution: the taps ran
  assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, w: taps_conv(x, w, rate, pad))(x, w))


def test_depthwise_and_bfloat16_taps_equal_the_convolution():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 5)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 5)).astype(np.float32))
  pad = ((4, 4), (4, 4))
  np.testing.assert_allclose(
      np.asarray(taps_conv(x, w, (4, 4), pad, groups=5)),
      np.asarray(lax_conv(x, w, (4, 4), pad, groups=5)),
      rtol=1e-5,
      atol=1e-5,
  )
  w2 = jnp.asarray(rng.normal(size=(3, 3, 5, 6)).astype(np.float32))
  xb, wb = x.astype(jnp.bfloat16), w2.astype(jnp.bfloat16)
  got = taps_conv(xb, wb, (4, 4), pad)
  assert got.dtype == jnp.bfloat16
  want = lax_conv(xb.astype(jnp.float32), wb.astype(jnp.float32), (4, 4), pad)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


def test_other_convolutions_stay_with_lax():
  x = jnp.ones((1, 33, 33, 2))
  w = jnp.ones((3, 3, 2, 2))
  for rate, stride in (((1, 1), (1, 1)), ((2, 2), (2, 2))):
    pad = ((rate[0], rate[0]), (rate[1], rate[1]))
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, NUMBERS)
    fn = lambda x, w: atrous.conv_general_dilated(x, w, stride, pad, rhs_dilation=rate, dimension_numbers=numbers)
    assert "conv_general_dilated" in str(jax.make_jaxpr(fn)(x, w))
  # rate 2 on a 33x33 map: padding is 8% of the taps, under the threshold
  assert atrous.padding_share((33, 33), (3, 3), (2, 2), ((2, 2), (2, 2))) < atrous.MIN_PADDING_SHARE


def test_flax_conv_with_taps_keeps_its_parameters_and_values():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 9, 9, 3)).astype(np.float32))
  plain = nn.Conv(4, (3, 3), padding=((4, 4), (4, 4)), kernel_dilation=(4, 4), use_bias=False)
  taps = nn.Conv(
      4,
      (3, 3),
      padding=((4, 4), (4, 4)),
      kernel_dilation=(4, 4),
      use_bias=False,
      conv_general_dilated=atrous.conv_general_dilated,
  )
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, taps.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(
      np.asarray(taps.apply(variables, x)), np.asarray(plain.apply(variables, x)), rtol=1e-5, atol=1e-5
  )


def brute_pointwise(x, w, stride):
  """out[b, y, x, o] = sum_c x[b, y·s, x·s, c] · w[0, 0, c, o], by loops over the output positions."""
  b, h, wd, _ = x.shape
  ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
  out = np.zeros((b, ho, wo, w.shape[-1]))
  for y, xx in np.ndindex(ho, wo):
    out[:, y, xx] = x[:, y * stride, xx * stride].astype(np.float64) @ w[0, 0].astype(np.float64)
  return out


@pytest.mark.parametrize("stride,padding", [(1, ((0, 0), (0, 0))), (2, ((0, 0), (0, 0))), (1, "VALID"), (2, "VALID")])
def test_pointwise_is_a_matrix_product_with_the_convolution_values_and_gradients(stride, padding):
  rng = np.random.default_rng(7 + stride)
  x = rng.normal(size=(2, 9, 7, 5)).astype(np.float32)
  w = rng.normal(size=(1, 1, 5, 3)).astype(np.float32)
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, NUMBERS)

  def ours(x, w):
    return atrous.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=numbers)

  def theirs(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NUMBERS)

  got = ours(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(got), brute_pointwise(x, w, stride), rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=got.shape).astype(np.float32))
  want_grads = jax.vjp(theirs, jnp.asarray(x), jnp.asarray(w))[1](g)
  got_grads = jax.vjp(ours, jnp.asarray(x), jnp.asarray(w))[1](g)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(ours)(x, w))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


def test_pointwise_with_padding_groups_or_a_narrow_dtype():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(1, 5, 5, 4)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(1, 1, 4, 4)).astype(np.float32))
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, NUMBERS)
  # a padded 1x1 convolution (its border is 0) and a grouped one stay convolutions
  padded = lambda x, w: atrous.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers)
  assert "conv_general_dilated" in str(jax.make_jaxpr(padded)(x, w))
  np.testing.assert_allclose(
      np.asarray(padded(x, w)),
      np.asarray(jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NUMBERS)),
      rtol=1e-6,
  )
  w2 = jnp.asarray(rng.normal(size=(1, 1, 2, 4)).astype(np.float32))
  grouped = lambda x, w: atrous.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=numbers, feature_group_count=2
  )
  assert "conv_general_dilated" in str(jax.make_jaxpr(grouped)(x, w2))
  # bfloat16 in, bfloat16 out, as the convolution
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  got = atrous.conv_general_dilated(xb, wb, (1, 1), "VALID", dimension_numbers=numbers)
  assert got.dtype == jnp.bfloat16
  want = np.asarray(x.astype(jnp.bfloat16), np.float32)[0] @ np.asarray(wb, np.float32)[0, 0]
  np.testing.assert_allclose(np.asarray(got, np.float32)[0], want, rtol=2e-2, atol=2e-2)


def test_flax_pointwise_conv_with_bias_keeps_its_parameters_and_values():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 7, 7, 6)).astype(np.float32))
  plain = nn.Conv(3, (1, 1), strides=(2, 2))
  ours = nn.Conv(3, (1, 1), strides=(2, 2), padding="VALID", conv_general_dilated=atrous.conv_general_dilated)
  variables = plain.init(jax.random.key(1), x)
  variables = {"params": {**variables["params"], "bias": jnp.arange(3.0)}}
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(
      np.asarray(ours.apply(variables, x)), np.asarray(plain.apply(variables, x)), rtol=1e-5, atol=1e-5
  )
