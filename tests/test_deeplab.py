"""DeepLabv3+ with the dilated-affinity head: shapes, rates, head init, resizing, and a jit'd ResNet-101 forward."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_probes import conv_calls

from dilaff_jax.models.deeplab import DeepLabV3Plus, resize_bilinear, upsample_logits

PAPER_RATES = ((8, 8), (12, 24), (24, 12), (16, 16))  # R = {8, (12, 24), 16}, expanded
PI = np.array([0.9, 0.8, 0.75, 0.6])  # a made-up prior pi_r per rate
PRIOR_BIAS = tuple(float(b) for b in np.repeat(np.log(PI / (1 - PI)), 8))  # what affinity.prior_bias(PI) returns


def _abstract(model, size, output_stride, batch=2):
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(partial(model.init, train=False, output_stride=output_stride), jax.random.key(0), images)
  return variables, jax.eval_shape(partial(model.apply, train=False, output_stride=output_stride), variables, images)


@pytest.mark.parametrize("size, h4", [(513, 129), (129, 33)])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes(size, h4, output_stride):
  model = DeepLabV3Plus(num_classes=21, rates=PAPER_RATES, affinity_bias=PRIOR_BIAS)
  variables, out = _abstract(model, size, output_stride)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      "logits": ((2, h4, h4, 21), jnp.float32),
      "affinity_logits": ((2, h4, h4, 32), jnp.float32),
  }
  assert set(variables) == {"params", "batch_stats"}
  assert "backbone" in variables["params"] and "backbone" in variables["batch_stats"]


def test_paper_model_parameter_count():
  variables, _ = _abstract(DeepLabV3Plus(num_classes=21, rates=PAPER_RATES), 65, 16)
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
  conv_bn = lambda k, c_in, c_out: k * k * c_in * c_out + 2 * c_out  # noqa: E731  conv without bias + BN
  aspp = conv_bn(1, 2048, 256) * 2 + conv_bn(3, 2048, 256) * 3 + conv_bn(1, 5 * 256, 256)
  decoder = conv_bn(1, 256, 48) + conv_bn(3, 256 + 48, 256) + conv_bn(3, 256, 256)
  heads = 256 * 21 + 21 + 256 * 32 + 32
  assert count == 42_500_160 + aspp + decoder + heads == 59_352_533


def test_plain_deeplab_has_no_affinity_head():
  variables, out = _abstract(DeepLabV3Plus(num_classes=21), 65, 16)
  assert set(out) == {"logits"}
  assert "affinity" not in variables["params"]


def test_bfloat16_compute_returns_float32_logits_and_params():
  model = DeepLabV3Plus(num_classes=21, rates=((8, 8),), dtype=jnp.bfloat16)
  variables, out = _abstract(model, 65, 16)
  assert out["logits"].dtype == out["affinity_logits"].dtype == jnp.float32
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rates=((8, 8),), affinity_bias=(0.0,) * 9), r"9 values, but 1 affinity rates need 8 \* 1 = 8"),
        (dict(rates=((8, 0),)), r"pairs of positive integers .*\(8, 0\)"),
        (dict(rates=((8, 8, 8),)), r"pairs of positive integers"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_rejects_bad_configuration(kwargs, message):
  model = DeepLabV3Plus(**{"num_classes": 21, **kwargs})
  with pytest.raises(ValueError, match=message):
    _abstract(model, 65, 16)


def test_rejects_bad_output_stride():
  with pytest.raises(ValueError, match="output_stride must be one of"):
    _abstract(DeepLabV3Plus(num_classes=21), 65, 4)


def _conv_dilations(model, output_stride, in_features, kernel=3):
  """Atrous rates of the model's convolutions whose kernel is [kernel, kernel, in_features, *], in call order."""
  calls = conv_calls(model, jnp.zeros((1, 65, 65, 3)), output_stride=output_stride)
  return [dilation[0] for shape, dilation in calls if shape == (kernel, kernel, in_features)]


@pytest.mark.parametrize("output_stride, aspp, layer4", [(16, [6, 12, 18], [2, 4, 8]), (8, [12, 24, 36], [4, 8, 16])])
def test_atrous_rates_follow_output_stride(output_stride, aspp, layer4):
  model = DeepLabV3Plus(num_classes=21, depth=50)
  assert _conv_dilations(model, output_stride, 2048) == aspp  # ASPP's three atrous 3x3 on the 2048-d features
  assert _conv_dilations(model, output_stride, 512) == layer4  # layer4's 3x3 convs: multi-grid (1, 2, 4)


def test_separable_option_uses_depthwise_convolutions():
  model = DeepLabV3Plus(num_classes=21, separable=True, depth=50)
  variables, out = _abstract(model, 65, 16)
  atrous = jax.tree_util.tree_map(lambda x: x.shape, variables["params"]["aspp"]["atrous_0"])
  assert atrous["depthwise"]["kernel"] == (3, 3, 1, 2048) and atrous["pointwise"]["kernel"] == (1, 1, 2048, 256)
  assert variables["params"]["decoder"]["conv_0"]["depthwise"]["kernel"].shape == (3, 3, 1, 304)
  assert _conv_dilations(model, 8, 1) == [12, 24, 36, 1, 1]  # depthwise kernels: ASPP then the decoder's two
  assert out["logits"].shape == (2, 17, 17, 21)


def _bilinear_reference(x, size, align_corners):
  """Brute force, pixel by pixel (PyTorch's definition of bilinear resizing)."""
  n, h_in, w_in, c = x.shape
  out = np.zeros((n, size[0], size[1], c))
  for i in range(size[0]):
    for j in range(size[1]):
      pos = []
      for o, n_in, n_out in ((i, h_in, size[0]), (j, w_in, size[1])):
        if align_corners:
          p = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
          p = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        pos.append(p)
      (y, x_), (y0, x0) = pos, (int(np.floor(pos[0])), int(np.floor(pos[1])))
      y1, x1 = min(y0 + 1, h_in - 1), min(x0 + 1, w_in - 1)
      dy, dx = y - y0, x_ - x0
      out[:, i, j] = (
          (1 - dy) * (1 - dx) * x[:, y0, x0]
          + (1 - dy) * dx * x[:, y0, x1]
          + dy * (1 - dx) * x[:, y1, x0]
          + dy * dx * x[:, y1, x1]
      )
  return out


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(17, 13), (3, 4), (1, 9)])
def test_resize_bilinear_matches_brute_force(align_corners, size):
  x = np.random.RandomState(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
  got = resize_bilinear(jnp.asarray(x), size, align_corners=align_corners)
  np.testing.assert_allclose(got, _bilinear_reference(x, size, align_corners), atol=1e-5)


def test_half_pixel_resize_equals_jax_image_resize():
  x = jnp.asarray(np.random.RandomState(1).standard_normal((1, 9, 6, 2)), jnp.float32)
  for size in ((33, 21), (4, 3)):
    ref = jax.image.resize(x, (1, *size, 2), "bilinear", antialias=False)
    np.testing.assert_allclose(resize_bilinear(x, size, align_corners=False), ref, atol=1e-5)


def test_upsample_logits_aligns_stride4_features_with_pixels():
  # 513 = 4 * 128 + 1: stride-4 logit i sits on pixel 4i, so upsampling keeps it there exactly.
  logits = jnp.asarray(np.random.RandomState(2).standard_normal((1, 129, 129, 3)), jnp.bfloat16)
  up = upsample_logits(logits, (513, 513))
  assert up.shape == (1, 513, 513, 3) and up.dtype == jnp.float32
  np.testing.assert_array_equal(up[:, ::4, ::4], logits.astype(jnp.float32))
  np.testing.assert_allclose(up[:, 2, ::4], (up[:, 0, ::4] + up[:, 4, ::4]) / 2, atol=1e-6)


@pytest.fixture(scope="module")
def paper_model():
  """The paper's network (ResNet-101 DeepLabv3+, 21 classes, R = {8, (12, 24), 16}) at a 65x65 crop, initialised."""
  model = DeepLabV3Plus(num_classes=21, rates=PAPER_RATES, affinity_bias=PRIOR_BIAS)
  images = jnp.asarray(np.random.RandomState(0).standard_normal((2, 65, 65, 3)), jnp.float32)
  variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), images)

  @jax.jit
  def train_forward(variables, key):
    return model.apply(variables, images, train=True, output_stride=16, mutable=["batch_stats"], rngs={"dropout": key})

  return model, variables, images, train_forward


@pytest.mark.slow
def test_jit_forward_of_paper_model_train_and_eval(paper_model):
  model, variables, images, train_step = paper_model
  out, updates = train_step(variables, jax.random.key(1))
  assert out["logits"].shape == (2, 17, 17, 21) and out["affinity_logits"].shape == (2, 17, 17, 32)
  assert all(bool(jnp.isfinite(v).all()) for v in out.values())
  # Train-mode BN: running mean <- 0.99 * 0 + 0.01 * batch mean (checked on the stem's BN against a direct conv).
  kernel = variables["params"]["backbone"]["conv1"]["kernel"]
  stem = jax.lax.conv_general_dilated(
      images, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(
      updates["batch_stats"]["backbone"]["bn1"]["mean"], 0.01 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-7
  )
  # Dropout is driven by the "dropout" rng.
  again, _ = train_step(variables, jax.random.key(1))
  other, _ = train_step(variables, jax.random.key(2))
  np.testing.assert_array_equal(again["logits"], out["logits"])
  assert not np.allclose(other["logits"], out["logits"])

  evaluate = jax.jit(partial(model.apply, train=False, output_stride=8))
  eval_out = evaluate({**variables, "batch_stats": updates["batch_stats"]}, images)
  assert eval_out["logits"].shape == (2, 17, 17, 21) and eval_out["affinity_logits"].shape == (2, 17, 17, 32)
  assert all(bool(jnp.isfinite(v).all()) for v in eval_out.values())


@pytest.mark.slow
def test_affinity_head_starts_at_the_prior(paper_model):
  model, variables, images, train_forward = paper_model
  np.testing.assert_allclose(variables["params"]["affinity"]["bias"], PRIOR_BIAS, rtol=1e-6)
  evaluate = jax.jit(partial(model.apply, train=False, output_stride=16))
  # With the head's kernel zeroed, every pixel's sigmoid is exactly pi_r on the 8 channels of rate r.
  params = {**variables["params"], "affinity": {**variables["params"]["affinity"]}}
  params["affinity"]["kernel"] = jnp.zeros_like(params["affinity"]["kernel"])
  prob = jax.nn.sigmoid(evaluate({**variables, "params": params}, images)["affinity_logits"])
  np.testing.assert_allclose(prob, np.broadcast_to(np.repeat(PI, 8), prob.shape), rtol=1e-5)
  # With the initial kernel (N(0, 0.01^2), the focal-loss paper's init), the first training step's affinities
  # scatter a little around pi_r. (Eval mode at init is no test: untrained running statistics do not normalise.)
  out, _ = train_forward(variables, jax.random.key(1))
  prob = np.asarray(jax.nn.sigmoid(out["affinity_logits"]))
  assert np.abs(prob.mean(axis=(0, 1, 2)) - np.repeat(PI, 8)).max() < 0.06
  assert np.abs(prob - np.repeat(PI, 8)).max() < 0.2


def _gather_resize(x, size, align_corners):
  """The general form, ``x[lo]·(1 - t) + x[hi]·t`` per axis with gathers: what the integer-factor path must equal."""
  hlo = jax.jit(lambda v: resize_bilinear(v, size, align_corners=align_corners, gather=True)).lower(x).as_text()
  assert "gather" in hlo
  return resize_bilinear(x, size, align_corners=align_corners, gather=True)


@pytest.mark.parametrize(
    "in_hw, size, dtype",
    [((33, 33), (129, 129), jnp.float32), ((5, 9), (13, 33), jnp.float32), ((4, 6), (10, 26), jnp.bfloat16)],
)
def test_integer_factor_resize_equals_gather_form_bit_for_bit_and_has_no_scatter(in_hw, size, dtype):
  # factors 4 (DeepLab's stride 4 -> pixels), 3 and 4 along different axes, 3 and 5 in bfloat16 (the GPU dtype)
  x = jnp.asarray(np.random.RandomState(3).standard_normal((2, *in_hw, 3)), dtype)
  got = resize_bilinear(x, size)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(_gather_resize(x, size, True), np.float32))
  # the gradient (the transpose: a sum of slices instead of a scatter-add) agrees with the gather form's
  w = jnp.asarray(np.random.RandomState(4).standard_normal((2, *size, 3)), jnp.float32)

  def loss(resize):
    return lambda v: jnp.sum(resize(v.astype(jnp.float32)) * w)

  g = jax.grad(loss(lambda v: resize_bilinear(v, size)))(x.astype(jnp.float32))
  g_ref = jax.grad(loss(lambda v: _gather_resize(v, size, True)))(x.astype(jnp.float32))
  np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-5)
  hlo = jax.jit(jax.grad(loss(lambda v: resize_bilinear(v, size)))).lower(x.astype(jnp.float32)).as_text()
  assert "scatter" not in hlo and "gather" not in hlo
  # a size that is not an integer factor still gathers (and matches the brute force above)
  hlo = jax.jit(lambda v: resize_bilinear(v, (size[0] + 1, size[1]))).lower(x).as_text()
  assert "gather" in hlo
