"""Table 5's structure losses: AAF and U-Net's boundary weights against brute-force loops and hand-computed values,
the gradient reversal of AAF's adversarial weights, sharded sums, and training runs with each kind."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic, variants, voc
from dilaff_jax import train
from dilaff_jax.datasets import input_pipeline
from dilaff_jax.engine import checkpoints, config_checks, run_spec
from dilaff_jax.method import structure_losses
from dilaff_jax.engine import train_state as state_lib

V = 255


# ---------------------------------------------------------------------------------------------- AAF


def brute_force_aaf(logits, labels, dilations, weights, margin, ignore=V):
  """Per-term sums and counts by explicit loops over pixels, the 8 field corners, and classes."""
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  probs = e / e.sum(-1, keepdims=True)
  b, h, w, c = logits.shape
  sums = np.zeros((2, len(dilations)))
  counts = np.zeros((2, len(dilations)), np.int64)
  clip = lambda x: min(max(x, 1e-4), 1.0)
  for k, d in enumerate(dilations):
    for n in range(b):
      for i in range(h):
        for j in range(w):
          a = labels[n, i, j]
          if a == ignore:
            continue
          for di in (-d, 0, d):
            for dj in (-d, 0, d):
              ii, jj = i + di, j + dj
              oi, oj = i - di, j - dj  # the opposite corner: the authors' code drops the pair when it is void too
              if (di == 0 and dj == 0) or not (0 <= ii < h and 0 <= jj < w) or labels[n, ii, jj] == ignore:
                continue
              if not (0 <= oi < h and 0 <= oj < w) or labels[n, oi, oj] == ignore:
                continue
              bb = labels[n, ii, jj]
              for cls in range(c):
                p, q = clip(probs[n, i, j, cls]), clip(probs[n, ii, jj, cls])
                pn, qn = clip(1 - probs[n, i, j, cls]), clip(1 - probs[n, ii, jj, cls])
                kl = q * math.log(q / p) + qn * math.log(qn / pn)
                if (a == cls) != (bb == cls):
                  sums[1, k] += weights[1, a, k] * max(0.0, margin - kl)
                  counts[1, k] += 1
                else:
                  sums[0, k] += weights[0, a, k] * kl
                  counts[0, k] += 1
  return sums, counts


LABELS_3x4 = np.array(
    [[[0, 0, 1, 1], [0, V, 1, 2], [2, 2, 2, 2]], [[1, 1, 1, 1], [0, 0, V, V], [0, 2, 2, V]]], np.int32
)


# 2 x 5 x 6 labels of 3 classes with void pixels: big enough for whole d = 2 fields inside the map
LABELS_5x6 = np.where(
    np.random.default_rng(7).uniform(size=(2, 5, 6)) < 0.12, V, np.random.default_rng(8).integers(0, 3, (2, 5, 6))
).astype(np.int32)


def test_aaf_sums_match_brute_force_on_a_5x6_map_with_void_and_borders():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(2, 5, 6, 3)).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, size=(2, 3, 2)).astype(np.float32)
  dilations = (1, 2)
  sums, counts = structure_losses.aaf_loss_sum(
      jnp.asarray(logits), jnp.asarray(LABELS_5x6), dilations, jnp.asarray(weights), margin=3.0
  )
  ref_sums, ref_counts = brute_force_aaf(logits, LABELS_5x6, dilations, weights, 3.0)
  np.testing.assert_array_equal(np.asarray(counts), ref_counts)
  np.testing.assert_allclose(np.asarray(sums), ref_sums, rtol=1e-5, atol=1e-6)
  assert ref_counts[1].min() > 0 and ref_counts[0].min() > 0  # both kinds and both sizes are exercised
  loss = structure_losses.aaf_loss(sums, counts)
  np.testing.assert_allclose(float(loss), (ref_sums / ref_counts).sum(), rtol=1e-5)


def test_aaf_hand_computed_pair():
  # labels 0 | 1 | 0 on a 1x3 map with classes {0, 1}; d = 1. Only the middle pixel has both corners of a
  # horizontal diameter inside and labelled, so its two pairs are the only ones (the authors' rule: a pair whose
  # opposite corner is outside the image or void is dropped; every pair of the end pixels has one outside).
  labels = np.array([[[0, 1, 0]]], np.int32)
  p_left, p_mid, p_right = 0.8, 0.3, 0.6  # probability of class 0
  logits = np.log(np.array([[[[p, 1 - p] for p in (p_left, p_mid, p_right)]]], np.float32))
  sums, counts = structure_losses.aaf_loss_sum(jnp.asarray(logits), jnp.asarray(labels), (1,), margin=3.0)
  # both classes separate in each pair (exactly one pixel has label 0, the other label 1); KL(neighbour || centre)
  kl = lambda q, p: q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
  pairs = [(p_left, p_mid), (p_right, p_mid)]  # (neighbour, centre) for class 0
  expected = sum(max(0.0, 3.0 - kl(q, p)) + max(0.0, 3.0 - kl(1 - q, 1 - p)) for q, p in pairs)
  np.testing.assert_array_equal(np.asarray(counts), [[0], [4]])
  np.testing.assert_allclose(float(sums[1, 0]), expected, rtol=1e-5)
  assert float(sums[0, 0]) == 0.0
  # the same map with the right pixel void: the middle pixel's diameter has a void end, so no pair is left
  sums, counts = structure_losses.aaf_loss_sum(
      jnp.asarray(logits), jnp.asarray(np.array([[[0, 1, V]]], np.int32)), (1,), margin=3.0
  )
  np.testing.assert_array_equal(np.asarray(counts), [[0], [0]])


def test_adaptive_weights_gradient_is_reversed():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(scale=2.0, size=(2, 3, 4, 3)), jnp.float32)
  labels = jnp.asarray(LABELS_3x4)
  raw = jnp.asarray(rng.normal(size=(2, 3, 2)), jnp.float32)

  def loss(raw, normalise):
    sums, counts = structure_losses.aaf_loss_sum(logits, labels, (1, 2), normalise(raw))
    return structure_losses.aaf_loss(sums, counts)

  plain = jax.grad(loss)(raw, lambda r: jax.nn.softmax(r, axis=-1))
  reversed_ = jax.grad(loss)(raw, structure_losses.adaptive_weights)
  assert float(jnp.abs(plain).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(reversed_), -np.asarray(plain), rtol=1e-6)
  # forward values are untouched: the softmax over sizes
  np.testing.assert_allclose(
      np.asarray(structure_losses.adaptive_weights(raw)), np.asarray(jax.nn.softmax(raw, axis=-1)), rtol=1e-6
  )
  # the network's gradient is not reversed
  g_net = jax.grad(
      lambda lg: structure_losses.aaf_loss(
          *structure_losses.aaf_loss_sum(lg, labels, (1, 2), structure_losses.adaptive_weights(raw))
      )
  )(logits)
  g_ref = jax.grad(
      lambda lg: structure_losses.aaf_loss(
          *structure_losses.aaf_loss_sum(lg, labels, (1, 2), jax.nn.softmax(raw, axis=-1))
      )
  )(logits)
  np.testing.assert_allclose(np.asarray(g_net), np.asarray(g_ref), rtol=1e-6)


def test_labels_on_grid_picks_the_aligned_pixels():
  labels = jnp.arange(2 * 9 * 13).reshape(2, 9, 13)
  np.testing.assert_array_equal(
      np.asarray(structure_losses.labels_on_grid(labels, (3, 4))), np.asarray(labels[:, ::4, ::4])
  )


# ---------------------------------------------------------------------------------------------- boundary weights


def test_unet_weight_map_two_objects_hand_computed():
  # background 0; object A (class 1) in column 1, object B (class 2) in column 5; a void pixel
  label = np.zeros((3, 7), np.int32)
  label[:, 1] = 1
  label[:, 5] = 2
  label[0, 6] = V
  w = structure_losses.unet_weight_map(label, num_classes=3, w0=10.0, sigma=2.0, background=0, class_balance=True)
  counts = {0: 14, 1: 3, 2: 3}  # 15 background pixels, one of them void
  n = 20
  wc = {c: n / (3 * counts[c]) for c in counts}  # N / (K · n_c)
  border = lambda d1, d2: 10.0 * math.exp(-((d1 + d2) ** 2) / (2 * 2.0**2))
  # the background pixel midway (column 3): distance 2 to each object
  assert w[1, 3] == pytest.approx(wc[0] + border(2, 2), rel=1e-6)
  # a pixel of A: d1 = 0 (itself), d2 = 4 (B)
  assert w[1, 1] == pytest.approx(wc[1] + border(0, 4), rel=1e-6)
  # column 0: distances 1 (A) and 5 (B); column 6: 1 (B) and 5 (A)
  assert w[2, 0] == pytest.approx(wc[0] + border(1, 5), rel=1e-6)
  assert w[1, 6] == pytest.approx(wc[0] + border(1, 5), rel=1e-6)
  assert w[0, 6] == 0.0  # void
  # class balance: the labelled pixels' mean of w_c is 1
  no_border = structure_losses.unet_weight_map(label, num_classes=3, w0=0.0, sigma=2.0)
  assert no_border[label != V].mean() == pytest.approx(1.0, rel=1e-6)


def test_unet_weight_map_objects_are_components_and_background_choice():
  # one class in two separate components is two objects; with background=-1 class 0 regions are objects too
  label = np.array([[1, 0, 0, 1]], np.int32)
  w = structure_losses.unet_weight_map(label, num_classes=2, w0=10.0, sigma=1.0, class_balance=False)
  border = lambda d1, d2: 10.0 * math.exp(-((d1 + d2) ** 2) / 2.0)
  np.testing.assert_allclose(w, [[1 + border(0, 3), 1 + border(1, 2), 1 + border(1, 2), 1 + border(0, 3)]], rtol=1e-6)
  w_all = structure_losses.unet_weight_map(label, num_classes=2, w0=10.0, sigma=1.0, background=-1, class_balance=False)
  # three objects: {0}, {1, 2} (class 0), {3}
  np.testing.assert_allclose(
      w_all, [[1 + border(0, 1), 1 + border(0, 1), 1 + border(0, 1), 1 + border(0, 1)]], rtol=1e-6
  )
  # a single object: no border term
  one = structure_losses.unet_weight_map(np.array([[1, 1, 0]]), num_classes=2, class_balance=False)
  np.testing.assert_array_equal(one, [[1, 1, 1]])


def brute_force_unet_weights(label, num_classes, w0, sigma, background, ignore=V):
  """Objects by flood fill (8-connected), distances by looping over every object pixel, w_c by counting."""
  h, w = label.shape
  seen = np.zeros_like(label, bool)
  objects = []
  for i, j in np.ndindex(h, w):
    if seen[i, j] or label[i, j] in (ignore, background):
      continue
    stack, pixels = [(i, j)], []
    seen[i, j] = True
    while stack:
      y, x = stack.pop()
      pixels.append((y, x))
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          yy, xx = y + dy, x + dx
          if 0 <= yy < h and 0 <= xx < w and not seen[yy, xx] and label[yy, xx] == label[i, j]:
            seen[yy, xx] = True
            stack.append((yy, xx))
    objects.append(pixels)
  labelled = [(i, j) for i, j in np.ndindex(h, w) if label[i, j] != ignore]
  n = {c: sum(label[p] == c for p in labelled) for c in range(num_classes)}
  present = sum(v > 0 for v in n.values())
  out = np.zeros((h, w))
  for i, j in labelled:
    out[i, j] = len(labelled) / (present * n[label[i, j]])
    if len(objects) >= 2:
      d = sorted(min(math.hypot(i - y, j - x) for y, x in obj) for obj in objects)
      out[i, j] += w0 * math.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
  return out


def test_unet_weight_map_matches_brute_force_on_random_maps():
  rng = np.random.default_rng(4)
  for trial in range(3):
    label = rng.integers(0, 3, size=(14, 17)).astype(np.int32)
    label = np.repeat(np.repeat(label[::3, ::3], 3, 0), 3, 1)[:14, :17].copy()  # blocky regions
    label[rng.random(label.shape) < 0.1] = V
    sigma = (0.7, 1.5, 4.0)[trial]  # 6σ smaller and larger than the map: the distance cut-off is exercised
    w = structure_losses.unet_weight_map(label, num_classes=3, w0=10.0, sigma=sigma, background=0)
    np.testing.assert_allclose(w, brute_force_unet_weights(label, 3, 10.0, sigma, 0), rtol=1e-5, atol=1e-6)


def test_boundary_loss_sum_is_the_weighted_cross_entropy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
  weights = rng.uniform(0.5, 10.0, size=(2, 3, 4)).astype(np.float32)
  total, n = structure_losses.boundary_loss_sum(jnp.asarray(logits), jnp.asarray(LABELS_3x4), jnp.asarray(weights))
  ref, count = 0.0, 0
  for idx in np.ndindex(LABELS_3x4.shape):
    if LABELS_3x4[idx] != V:
      z = logits[idx].astype(np.float64)
      ref += weights[idx] * (np.log(np.exp(z).sum()) - z[LABELS_3x4[idx]])
      count += 1
  assert int(n) == count
  assert float(total) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------------- sharding


def test_sharded_sums_equal_the_whole_batch():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, size=(4, 6, 7)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = V
  labels[3] = V  # one shard without a labelled pixel
  logits = rng.normal(size=(4, 6, 7, 3)).astype(np.float32)
  weight_map = rng.uniform(0.5, 5.0, size=(4, 6, 7)).astype(np.float32)
  raw = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)

  def losses(logits, labels, weight_map):
    sums, counts = structure_losses.aaf_loss_sum(logits, labels, (1, 2, 3), structure_losses.adaptive_weights(raw))
    b_sum, n = structure_losses.boundary_loss_sum(logits, labels, weight_map)
    return sums, counts, b_sum, n

  sums, counts, b_sum, n = losses(logits, labels, weight_map)
  whole = (structure_losses.aaf_loss(sums, counts), b_sum / n)

  def sharded(lg, lb, wm):
    s, c, bs, bn = losses(lg, lb, wm)
    c, bn = jax.lax.psum(c, "d"), jax.lax.psum(bn, "d")
    # each device's part, over the global normalisers, summed over the devices (as the gradients are)
    return jax.lax.psum(jnp.sum(s / jnp.maximum(c, 1)), "d"), jax.lax.psum(bs, "d") / bn

  out = jax.pmap(sharded, axis_name="d", devices=jax.devices()[:4])(
      logits.reshape(4, 1, 6, 7, 3), labels.reshape(4, 1, 6, 7), weight_map.reshape(4, 1, 6, 7)
  )
  np.testing.assert_allclose(np.asarray(out[0]), float(whole[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out[1]), float(whole[1]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- config and training


def test_variants_and_config_errors():
  for cfg in (voc.get_config("aaf"), synthetic.get_config("aaf")):
    assert cfg.structure.kind == "aaf" and not cfg.affinity.enabled
    config_checks.validate(cfg, num_devices=2, mode="evaluate")  # (training would also need model.pretrained)
  for cfg in (voc.get_config("boundary"), synthetic.get_config("boundary")):
    assert cfg.structure.kind == "boundary" and not cfg.affinity.enabled
    config_checks.validate(cfg, num_devices=2, mode="evaluate")
  assert synthetic.get_config().structure.kind == "none"
  for key, value, match in [
      ("kind", "crf", r"config.structure.kind = 'crf': expected one of"),
      ("aaf_dilations", (1, 1), r"config.structure.aaf_dilations = \(1, 1\)"),
      ("aaf_margin", 0.0, r"config.structure.aaf_margin = 0.0"),
      ("boundary_background", 6, r"config.structure.boundary_background = 6"),
  ]:
    cfg = synthetic.get_config("boundary" if key.startswith("boundary") else "aaf")
    cfg.structure[key] = value
    with pytest.raises(config_checks.ConfigError, match=match):
      config_checks.validate(cfg, num_devices=2)
  # a config.json written without the section still validates (structure: none)
  cfg = synthetic.get_config()
  del cfg["structure"]
  config_checks.validate(cfg, num_devices=2)
  assert config_checks.structure_kind(cfg) == "none"


def test_boundary_weights_in_the_input_pipeline_are_the_weight_map_of_each_crop(data_dir):
  c = synthetic.get_config("boundary")
  c.dataset.name = "synthetic_shapes/tiny"
  c.dataset.data_dir = data_dir
  c.dataset.crop_size = 33
  wm = train.boundary_weight_map(run_spec.derive(c))
  assert wm.keywords["sigma"] == pytest.approx(5.0 * 33 / 512)
  make = functools.partial(input_pipeline.from_config, c.dataset, seed=3, local_device_count=2, per_device_batch=2)
  batch = next(make(weight_map=wm).train)
  plain = next(make().train)
  assert "weight" not in plain
  np.testing.assert_array_equal(batch["label"], plain["label"])
  assert batch["weight"].shape == batch["label"].shape
  for idx in np.ndindex(batch["label"].shape[:2]):
    np.testing.assert_allclose(batch["weight"][idx], wm(batch["label"][idx]), rtol=1e-6)
  assert batch["weight"].max() > 2.0  # the border term is there
  # resumable: batch 1 of a run equals batch 0 of a run started at step 1
  it = make(weight_map=wm).train
  next(it)
  np.testing.assert_array_equal(next(it)["weight"], next(make(weight_map=wm, start_step=1).train)["weight"])


def _tiny(data_dir, variant, **overrides):
  from test_train import tiny_config

  c = tiny_config(data_dir, **overrides)
  return variants.apply(c, variant, voc.VARIANTS)


@pytest.mark.parametrize("kind", ["aaf", "boundary"])
def test_training_with_a_structure_loss_runs_and_checkpoints(data_dir, tmp_path, kind):
  config = _tiny(data_dir, kind, **{"train.num_steps": 2})
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  metrics = result["train"]
  assert np.isfinite(metrics["structure_loss"]) and metrics["structure_loss"] > 0
  if kind == "boundary":  # the weighted CE replaces the CE; the weights are >= w_c with mean 1, plus the border
    assert metrics["loss"] == pytest.approx(metrics["structure_loss"], rel=1e-5)
    assert metrics["structure_loss"] > metrics["ce_loss"]
  else:  # CE + λ · 10^(-step/steps) · AAF, averaged over the logged steps 1 and 2 (step index 0 and 1)
    extra = metrics["loss"] - metrics["ce_loss"]
    assert 10**-0.5 * metrics["structure_loss"] * 0.9999 <= extra <= metrics["structure_loss"] * 1.0001
  spec = run_spec.derive(config)
  state = state_lib.create_train_state(spec, state_lib.build_model(spec), jax.random.key(0))
  mngr = checkpoints.checkpoint_manager(str(tmp_path / "run"), config)
  restored, _ = checkpoints.restore_checkpoint(mngr, state, checkpoints.compat_record(spec), 2)
  assert int(restored.step) == 2
  if kind == "aaf":
    # the adversarial weights trained (away from 0) and were checkpointed
    assert float(jnp.abs(restored.params[state_lib.AAF_PARAMS]).max()) > 0
    # restoring the AAF run into a config without AAF is refused with the reason
    plain = _tiny(data_dir, "baseline")
    with pytest.raises(
        checkpoints.IncompatibleCheckpointError, match=r"structure.aaf_weights \(shape\): checkpoint has \[2, 6, 3\]"
    ):
      checkpoints.restore_checkpoint(mngr, state, checkpoints.compat_record(run_spec.derive(plain)), 2)
  mngr.close()
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["structure"]["kind"] == kind


def test_pixel_cross_entropy_equals_the_gather_form_bit_for_bit_without_scatter():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(2, 5, 6, 7)) * 4, jnp.float32)
  labels = jnp.asarray(np.where(rng.random((2, 5, 6)) < 0.2, 255, rng.integers(0, 7, (2, 5, 6))), jnp.int32)
  labelled = labels != 255

  def gather_form(x):  # -log p(label) picked with take_along_axis (its gradient is a scatter-add)
    logp = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(labelled, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(labelled, nll, 0.0)

  nll, mask = structure_losses.pixel_cross_entropy(logits, labels, 255)
  np.testing.assert_array_equal(mask, labelled)
  np.testing.assert_array_equal(nll, gather_form(logits))
  # hand check of one pixel: -log softmax(x)[y]
  x, y = np.asarray(logits[0, 0, 0], np.float64), int(labels[0, 0, 0])
  if y != 255:
    np.testing.assert_allclose(nll[0, 0, 0], np.log(np.exp(x).sum()) - x[y], rtol=1e-5)
  w = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(w * structure_losses.pixel_cross_entropy(v, labels, 255)[0]))
  np.testing.assert_array_equal(grad(logits), jax.grad(lambda v: jnp.sum(w * gather_form(v)))(logits))
  assert "scatter" not in jax.jit(grad).lower(logits).as_text()
