"""Dilated-affinity core against brute-force loops and hand-computed cases (paper Eq. 1–5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dilaff_jax.method import affinity
from dilaff_jax.method.neighbour_stats import AffinityStats

IGN = 255
RATES = ((1, 2), (2, 1), (3, 3), (9, 20))  # asymmetric, and one larger than the test images


def random_labels(seed, shape=(2, 7, 9), num_classes=3, ignore_share=0.15):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=shape)
  labels[rng.random(shape) < ignore_share] = IGN
  return labels.astype(np.int32)


def brute_offsets(rates):
  out = []
  for r1, r2 in rates:
    for s in (-r1, 0, r1):
      for t in (-r2, 0, r2):
        if (s, t) != (0, 0):
          out.append((s, t))
  return out


def brute_targets(labels, rates):
  b, h, w = labels.shape
  offs = brute_offsets(rates)
  targets = np.zeros((b, h, w, len(offs)), np.float32)
  valid = np.zeros((b, h, w, len(offs)), bool)
  for n in range(b):
    for i in range(h):
      for j in range(w):
        for c, (s, t) in enumerate(offs):
          ii, jj = i + s, j + t
          if 0 <= ii < h and 0 <= jj < w and labels[n, i, j] != IGN and labels[n, ii, jj] != IGN:
            valid[n, i, j, c] = True
            targets[n, i, j, c] = float(labels[n, i, j] == labels[n, ii, jj])
  return targets, valid


def brute_categories(labels, rates, rule="rescale"):
  """n_k per pixel and rate: q positives among v valid neighbours; -1 when v = 0; k = round(8q/v) or q."""
  targets, valid = brute_targets(labels, rates)
  b, h, w, _ = targets.shape
  k = np.zeros((b, h, w, len(rates)), np.int32)
  for n in range(b):
    for i in range(h):
      for j in range(w):
        for r in range(len(rates)):
          q = sum(1 for c in range(8 * r, 8 * r + 8) if valid[n, i, j, c] and targets[n, i, j, c] == 1)
          v = sum(1 for c in range(8 * r, 8 * r + 8) if valid[n, i, j, c])
          if v == 0:
            k[n, i, j, r] = -1
          else:
            k[n, i, j, r] = round(8 * q / v) if rule == "rescale" else q  # Python's round: half to even
  return k


def brute_focal(x, y, gamma):
  p = 1.0 / (1.0 + math.exp(-x))
  pt = p if y == 1 else 1 - p
  return -((1 - pt) ** gamma) * math.log(pt)


def brute_affinity_loss(logits, labels, rates, freq, pos_freq, scheme, gamma, max_weight, rule="rescale"):
  targets, valid = brute_targets(labels, rates)
  k = brute_categories(labels, rates, rule)
  cap = math.inf if max_weight is None else max_weight
  b, h, w, _ = targets.shape
  g = 0.0 if scheme == "none" else gamma
  total, n = 0.0, 0
  for bi in range(b):
    for i in range(h):
      for j in range(w):
        if labels[bi, i, j] == IGN:
          continue
        n += 1
        for r in range(len(rates)):
          kk = k[bi, i, j, r]
          if kk < 0:  # no valid neighbour at this rate: no category, no loss
            assert not valid[bi, i, j, 8 * r : 8 * r + 8].any()
            continue
          if scheme in ("neighbor", "sqrt"):
            seen = [freq[r][8] / f for f in freq[r] if f > 0]
            wr = freq[r][8] / freq[r][kk] if freq[r][kk] > 0 else max(seen)  # unseen: the rate's largest weight
            wr = math.sqrt(wr) if scheme == "sqrt" else wr
            wr = min(wr, cap)
          for c in range(8 * r, 8 * r + 8):
            if not valid[bi, i, j, c]:
              continue
            y = targets[bi, i, j, c]
            if scheme == "none":
              wgt = 1.0
            elif scheme == "signal":
              wgt = 1.0 if y == 1 else min(pos_freq[r] / (1 - pos_freq[r]), cap)
            else:
              wgt = wr
            total += wgt * brute_focal(float(logits[bi, i, j, c]), y, g)
  return total / max(n, 1)


# ---------------------------------------------------------------------------------------------- rates


def test_expand_rates_contract_example():
  assert affinity.expand_rates([8, (12, 24), 16]) == ((8, 8), (12, 24), (24, 12), (16, 16))
  assert affinity.expand_rates([(5, 5), 3]) == ((5, 5), (3, 3))


@pytest.mark.parametrize("bad", [[], [0], [(3, -1)], [8, 8], [(12, 24), (24, 12)], ["8"], [(1, 2, 3)]])
def test_expand_rates_rejects_bad_input(bad):
  with pytest.raises(ValueError):
    affinity.expand_rates(bad)


def test_rates_that_share_a_neighbour_offset_are_refused_with_the_offsets_named():
  # (8, 8) and (8, 16) both reach (-8, 0) and (8, 0): Eq. 6 would add that neighbour's term twice
  with pytest.raises(ValueError, match=r"rates \(8, 8\) and \(8, 16\) share the neighbour offsets \(-8, 0\), \(8, 0\)"):
    affinity.expand_rates([8, (8, 16)])
  with pytest.raises(ValueError, match=r"share the neighbour offsets \(0, -12\), \(0, 12\)"):
    affinity.explicit_rates([(6, 12), (4, 12)])
  # rates whose 8 offsets are all distinct pass, including the paper's sets and a pair with its swap
  for rates in ([8, (12, 24), 16], [8, 16, 32, 64], [(4, 8), 6]):
    pairs = affinity.expand_rates(rates)
    offsets = affinity.neighbor_offsets(pairs)
    assert len(set(offsets)) == len(offsets) == 8 * len(pairs)


def test_parse_rates_shorthand():
  assert affinity.parse_rates("8,12x24,16") == ((8, 8), (12, 24), (24, 12), (16, 16))
  with pytest.raises(ValueError, match="cannot parse"):
    affinity.parse_rates("8,a")


def test_neighbor_offsets_contract_order():
  assert affinity.neighbor_offsets([(1, 2)]) == ((-1, -2), (-1, 0), (-1, 2), (0, -2), (0, 2), (1, -2), (1, 0), (1, 2))
  assert affinity.neighbor_offsets(RATES) == tuple(brute_offsets(RATES))


# ---------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("seed", [0, 1])
def test_affinity_targets_match_brute_force(seed):
  labels = random_labels(seed)
  targets, valid = affinity.affinity_targets(jnp.asarray(labels), RATES, IGN)
  bt, bv = brute_targets(labels, RATES)
  assert targets.dtype == jnp.float32 and valid.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(valid), bv)
  np.testing.assert_array_equal(np.asarray(targets), bt)
  # the rate larger than the image (9, 20) on a 7x9 map gives no valid pair
  assert not np.asarray(valid)[..., 24:].any()


def test_affinity_targets_hand_case():
  # 1x3x3, rate 1: the centre sees all 8 neighbours; one is ignored, two differ.
  labels = np.array([[[0, 0, 1], [0, 0, 1], [0, 0, IGN]]], np.int32)
  targets, valid = affinity.affinity_targets(labels, [1])
  # directions: (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)
  np.testing.assert_array_equal(np.asarray(valid)[0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(targets)[0, 1, 1], [1, 1, 0, 1, 0, 1, 1, 0])
  # the top-left corner has only 3 in-image neighbours
  np.testing.assert_array_equal(np.asarray(valid)[0, 0, 0], [0, 0, 0, 0, 1, 0, 1, 1])


@pytest.mark.parametrize("rule", ["rescale", "count"])
def test_neighbor_categories_match_brute_force(rule):
  labels = random_labels(3, shape=(3, 8, 6))
  targets, valid = affinity.affinity_targets(labels, RATES)
  k = affinity.neighbor_categories(targets, valid, len(RATES), rule)
  np.testing.assert_array_equal(np.asarray(k), brute_categories(labels, RATES, rule))
  with pytest.raises(ValueError, match="num_rates"):
    affinity.neighbor_categories(targets, valid, 3, rule)


def test_neighbor_categories_border_of_uniform_region():
  # A uniform 6x6 region, rate 2: every pixel has only positive valid neighbours. "rescale" keeps the border band
  # in n_8 (it is no boundary); "count" puts edges in n_5 and corners in n_3. A void pixel has no category.
  labels = np.zeros((1, 6, 6), np.int32)
  labels[0, 5, 5] = IGN
  targets, valid = affinity.affinity_targets(labels, [(2, 2)])
  rescale = np.asarray(affinity.neighbor_categories(targets, valid, 1, "rescale"))[0, ..., 0]
  count = np.asarray(affinity.neighbor_categories(targets, valid, 1, "count"))[0, ..., 0]
  assert rescale[0, 0] == 8 and rescale[0, 3] == 8 and rescale[2, 2] == 8 and rescale[5, 5] == -1
  assert count[0, 0] == 3 and count[0, 3] == 5 and count[2, 2] == 8 and count[5, 5] == -1
  assert count[3, 3] == 7  # its (+2, +2) neighbour is void: unknown, not negative ... and not positive either
  assert rescale[3, 3] == 8
  # a labelled pixel whose 8 neighbours are all outside the image (v = 0) has no category under both rules
  # (docs/conventions.md §4), not n_0
  targets, valid = affinity.affinity_targets(np.zeros((1, 3, 3), np.int32), [(4, 4)])
  for rule in ("rescale", "count"):
    assert (np.asarray(affinity.neighbor_categories(targets, valid, 1, rule)) == -1).all()
  # a pixel whose neighbours are all outside the image (rate larger than the map) has no category
  targets, valid = affinity.affinity_targets(labels, [(7, 7)])
  assert np.all(np.asarray(affinity.neighbor_categories(targets, valid, 1)) == -1)


# ---------------------------------------------------------------------------------------------- focal loss


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_closed_form(gamma):
  xs = np.linspace(-8, 8, 33)
  for y in (0.0, 1.0):
    got = np.asarray(affinity.focal_loss(jnp.asarray(xs, jnp.float32), jnp.full(xs.shape, y), gamma))
    want = np.array([brute_focal(x, y, gamma) for x in xs])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_focal_loss_extreme_logits_finite():
  x = jnp.array([-100.0, -30.0, 30.0, 100.0, 1e4, -1e4])
  for y in (0.0, 1.0):
    t = jnp.full(x.shape, y)
    for gamma in (0.0, 2.0):
      val = affinity.focal_loss(x, t, gamma)
      grad = jax.grad(lambda v: affinity.focal_loss(v, t, gamma).sum())(x)
      assert np.all(np.isfinite(val)) and np.all(np.isfinite(grad))
  # a confident wrong prediction costs about |x| (cross-entropy), a confident right one about 0
  np.testing.assert_allclose(affinity.focal_loss(jnp.array([-100.0]), jnp.array([1.0]), 2.0), [100.0], rtol=1e-6)
  assert float(affinity.focal_loss(jnp.array([100.0]), jnp.array([1.0]), 2.0)[0]) < 1e-30


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_loss_agrees_with_optax(gamma):
  """optax's log-space focal loss gives the same values and gradients (to rounding), extreme logits included."""
  import optax

  x = jnp.asarray(np.concatenate([np.linspace(-12, 12, 49), [-1e4, -100.0, 100.0, 1e4]]), jnp.float32)
  for y in (0.0, 1.0):
    t = jnp.full(x.shape, y)
    ours = lambda v: affinity.focal_loss(v, t, gamma)  # noqa: E731
    theirs = lambda v: optax.sigmoid_focal_loss(v, t, gamma=gamma)  # noqa: E731
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(
        jax.grad(lambda v: ours(v).sum())(x), jax.grad(lambda v: theirs(v).sum())(x), rtol=1e-6, atol=1e-30
    )


# ---------------------------------------------------------------------------------------------- weights and loss


FREQ = np.array(
    [
        [0.02, 0.0, 0.05, 0.03, 0.1, 0.1, 0.1, 0.1, 0.5],  # n_1 never seen -> the rate's largest weight
        [0.04, 0.06, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2],
        [0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
    ]
)
POS = np.array([0.9, 0.8, 0.7, 0.75])


def test_neighbor_weights_hand_computed():
  w = affinity.neighbor_weights(FREQ, "neighbor")
  np.testing.assert_allclose(w[0], [25, 25, 10, 50 / 3, 5, 5, 5, 5, 1], rtol=1e-6)  # unseen n_1: max seen, 25
  np.testing.assert_allclose(w[:, 8], 1.0)
  s = affinity.neighbor_weights(FREQ, "sqrt")
  np.testing.assert_allclose(
      s[0],
      [5, 5, math.sqrt(10), math.sqrt(50 / 3), math.sqrt(5), math.sqrt(5), math.sqrt(5), math.sqrt(5), 1],
      rtol=1e-6,
  )
  np.testing.assert_allclose(affinity.neighbor_weights(FREQ, "neighbor", max_weight=20.0)[0, :3], [20, 20, 10])
  # no cap by default: Table 1's "absurdly large" neighbor weights stay as large as the statistics make them
  rare = np.array([[1e-4, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.5]])
  np.testing.assert_allclose(affinity.neighbor_weights(rare, "neighbor")[0, 0], 5000.0, rtol=1e-6)
  np.testing.assert_allclose(affinity.signal_weights([0.999])[0], [999.0, 1.0], rtol=1e-4)
  np.testing.assert_allclose(affinity.signal_weights([1.0])[0], [1.0, 1.0])  # no negatives: nothing to weigh
  np.testing.assert_array_equal(affinity.neighbor_weights(FREQ, "none"), np.ones((4, 9)))
  sig = affinity.signal_weights(POS)
  np.testing.assert_allclose(sig, [[9, 1], [4, 1], [7 / 3, 1], [3, 1]], rtol=1e-6)
  with pytest.raises(ValueError, match="n_8"):
    affinity.neighbor_weights(np.array([[0.5, 0.5, 0, 0, 0, 0, 0, 0, 0]]), "sqrt")


@pytest.mark.parametrize("rule", ["rescale", "count"])
def test_affinity_loss_each_scheme_hand_computed(rule):
  # One 3x3 map, rate 1. Centre label 0 with neighbours [0,0,1 / 0,1 / 0,0,255] -> 5 positives of 7 valid.
  labels = np.array([[[0, 0, 1], [0, 0, 1], [0, 0, IGN]]], np.int32)
  rates = [(1, 1)]
  freq = np.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.04, 0.16, 0.1, 0.2]])
  stats = AffinityStats(rates, freq, np.array([0.8]), partial_neighbors=rule)
  # all logits 0 -> p = 0.5 everywhere, FL = 0.25 * log 2 (γ=2) or log 2 (γ=0), per valid signal
  logits = jnp.zeros((1, 3, 3, 8))
  # per-pixel (k, #valid, #pos): computed by hand from the 3x3 map
  #  (0,0): nbrs (0,1)=0 (1,0)=0 (1,1)=0          -> k=3, 3 valid, 3 pos
  #  (0,1): (0,0)=0 (0,2)=1 (1,0)=0 (1,1)=0 (1,2)=1 -> k=3, 5 valid, 3 pos
  #  (0,2)=1: (0,1)=0 (1,1)=0 (1,2)=1             -> k=1, 3 valid, 1 pos
  #  (1,0): (0,0) (0,1) (1,1) (2,0) (2,1) all 0   -> k=5, 5 valid, 5 pos
  #  (1,1): 7 valid (255 excluded), 5 pos         -> k=5
  #  (1,2)=1: (0,1)=0 (0,2)=1 (1,1)=0 (2,1)=0; (2,2) ignored -> k=1, 4 valid, 1 pos
  #  (2,0): (1,0) (1,1) (2,1) all 0               -> k=3, 3 valid, 3 pos
  #  (2,1): (1,0)=0 (1,1)=0 (1,2)=1 (2,0)=0; (2,2) ignored -> k=3, 4 valid, 3 pos
  #  (2,2) ignored centre.
  pix = [(3, 3, 3), (3, 5, 3), (1, 3, 1), (5, 5, 5), (5, 7, 5), (1, 4, 1), (3, 3, 3), (3, 4, 3)]
  if rule == "rescale":  # k = round(8 · pos / valid): 8, 4.8 -> 5, 2.67 -> 3, 8, 5.71 -> 6, 2, 8, 6
    pix = [(k, v, p) for (_, v, p), k in zip(pix, [8, 5, 3, 8, 6, 2, 8, 6])]
  n = 8
  fl2, fl0 = 0.25 * math.log(2), math.log(2)
  want = {
      "none": sum(v for _, v, _ in pix) * fl0 / n,
      "neighbor": sum(0.2 / freq[0, k] * v for k, v, _ in pix) * fl2 / n,
      "sqrt": sum(math.sqrt(0.2 / freq[0, k]) * v for k, v, _ in pix) * fl2 / n,
      "signal": sum(p * 1.0 + (v - p) * 4.0 for _, v, p in pix) * fl2 / n,  # π=0.8: negatives weigh 4
  }
  for scheme, value in want.items():
    got = float(affinity.affinity_loss(logits, jnp.asarray(labels), rates, stats, scheme=scheme))
    assert got == pytest.approx(value, rel=1e-5), scheme


@pytest.mark.parametrize("scheme", ["none", "signal", "neighbor", "sqrt"])
@pytest.mark.parametrize("rule,max_weight", [("rescale", None), ("count", None), ("rescale", 8.0)])
def test_affinity_loss_matches_brute_force(scheme, rule, max_weight):
  labels = random_labels(7, shape=(2, 6, 7))
  rng = np.random.default_rng(8)
  logits = rng.normal(scale=3.0, size=(2, 6, 7, 8 * len(RATES))).astype(np.float32)
  stats = AffinityStats(RATES, FREQ, POS, partial_neighbors=rule)
  got = float(
      affinity.affinity_loss(
          jnp.asarray(logits), jnp.asarray(labels), RATES, stats, scheme=scheme, gamma=2.0, max_weight=max_weight
      )
  )
  want = brute_affinity_loss(logits, labels, RATES, FREQ, POS, scheme, 2.0, max_weight, rule)
  assert got == pytest.approx(want, rel=1e-5)


def test_affinity_loss_gradient_matches_finite_differences():
  labels = random_labels(11, shape=(1, 5, 6))
  rates = ((1, 2), (2, 1))
  stats = AffinityStats(rates, FREQ[:2], POS[:2])
  rng = np.random.default_rng(12)
  with jax.enable_x64(True):
    logits = jnp.asarray(rng.normal(size=(1, 5, 6, 16)), jnp.float64)
    f = lambda x: affinity.affinity_loss(x, jnp.asarray(labels), rates, stats, scheme="sqrt")
    grad = np.asarray(jax.grad(f)(logits))
    eps = 1e-6
    for idx in [(0, 0, 0, 0), (0, 2, 3, 5), (0, 4, 5, 15), (0, 1, 1, 9), (0, 3, 2, 12)]:
      e = np.zeros(logits.shape)
      e[idx] = eps
      fd = (float(f(logits + e)) - float(f(logits - e))) / (2 * eps)
      assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-9), idx
    # invalid signals (centre ignored, or neighbour outside) get exactly zero gradient
    _, valid = affinity.affinity_targets(jnp.asarray(labels), rates)
    assert np.all(grad[~np.asarray(valid)] == 0)
    assert np.any(grad[np.asarray(valid)] != 0)


def test_affinity_loss_rejects_mismatches():
  labels = jnp.zeros((1, 4, 4), jnp.int32)
  stats = AffinityStats(((1, 1),), FREQ[:1], POS[:1])
  with pytest.raises(ValueError, match="differ from the statistics"):
    affinity.affinity_loss(jnp.zeros((1, 4, 4, 8)), labels, [(2, 2)], stats)
  with pytest.raises(ValueError, match="unknown weighting scheme"):
    affinity.affinity_loss(jnp.zeros((1, 4, 4, 8)), labels, [(1, 1)], stats, scheme="sqrt-reweight")
  with pytest.raises(ValueError, match="do not match"):
    affinity.affinity_loss(jnp.zeros((1, 4, 4, 16)), labels, [(1, 1)], stats)


def autodiff_reference_loss(logits, labels, rates, stats, scheme, gamma, max_weight):
  """The loss in its unpacked form: rolled targets, categories, a weight lookup and the focal loss of Eq. 4
  differentiated automatically (no written-out gradient)."""
  targets, valid = affinity.affinity_targets(labels, rates)
  z = jnp.where(targets > 0.5, logits, -logits)
  g = 0.0 if scheme == "none" else gamma
  fl = jnp.exp(g * jax.nn.log_sigmoid(-z)) * -jax.nn.log_sigmoid(z)
  fl = jnp.where(valid, fl, 0.0)
  shape5 = (*labels.shape, len(rates), 8)
  if scheme == "none":
    w = jnp.ones(shape5)
  elif scheme == "signal":
    sw = jnp.asarray(affinity.signal_weights(stats.pos_freq, max_weight))
    w = jnp.where(targets.reshape(shape5) > 0.5, sw[:, 1][:, None], sw[:, 0][:, None])
  else:
    k = affinity.neighbor_categories(targets, valid, len(rates), stats.partial_neighbors)
    table = jnp.asarray(affinity.neighbor_weights(stats.freq, scheme, max_weight))
    w = jnp.broadcast_to(table[jnp.arange(len(rates)), jnp.maximum(k, 0)][..., None], shape5)
  return jnp.sum(fl.reshape(shape5) * w) / jnp.sum(labels != IGN)


# "none" is plain cross-entropy whatever γ; each of γ's three paths (0, an integer power, a real power) is covered
@pytest.mark.parametrize(
    "scheme,gamma", [("none", 2.0), ("signal", 0.0), ("signal", 1.5), ("sqrt", 2.0), ("sqrt", 1.5)]
)
def test_affinity_loss_gradient_equals_automatic_differentiation_of_the_unpacked_form(scheme, gamma):
  labels = jnp.asarray(random_labels(31, shape=(2, 6, 7)))
  rng = np.random.default_rng(32)
  logits = rng.normal(scale=3.0, size=(2, 6, 7, 8 * len(RATES)))
  logits[0, 1, 2, :5] = [0.0, 40.0, -40.0, 200.0, -200.0]  # a tie and saturated logits
  stats = AffinityStats(RATES, FREQ, POS, partial_neighbors="count")
  with jax.enable_x64(True):
    x = jnp.asarray(logits, jnp.float64)
    f = lambda x: affinity.affinity_loss(x, labels, RATES, stats, scheme=scheme, gamma=gamma, max_weight=8.0)
    ref = lambda x: autodiff_reference_loss(x, labels, RATES, stats, scheme, gamma, 8.0)
    value, grad = jax.value_and_grad(f)(x)
    want_value, want_grad = jax.value_and_grad(ref)(x)
  assert float(value) == pytest.approx(float(want_value), rel=1e-12)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-9, atol=1e-15)
  assert np.abs(np.asarray(grad)).max() > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_affinity_loss_terms_upsampling_inside_equal_upsampling_first(dtype):
  """The training step passes the stride-4 logits and DeepLab's upsampling; the loss, counts and gradient are those
  of upsampling first (the gradient pulled back through the same linear map, image by image)."""
  from dilaff_jax.models.deeplab import upsample_logits

  labels = jnp.asarray(random_labels(41, shape=(3, 13, 17)))
  x = jnp.asarray(np.random.default_rng(42).normal(scale=2.0, size=(3, 4, 5, 8 * len(RATES))), dtype)
  stats = AffinityStats(RATES, FREQ, POS)

  def inside(x):
    total, n, correct, valid = affinity.affinity_loss_terms(x, labels, RATES, stats, upsample=upsample_logits)
    return total / n, (correct, valid)

  def first(x):
    z = upsample_logits(x, labels.shape[1:])
    total, n, correct, valid = affinity.affinity_loss_terms(z, labels, RATES, stats)
    return total / n, (correct, valid)

  (got, got_counts), got_grad = jax.value_and_grad(inside, has_aux=True)(x)
  (want, want_counts), want_grad = jax.value_and_grad(first, has_aux=True)(x)
  assert got_grad.dtype == dtype and got_grad.shape == x.shape
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert [int(c) for c in got_counts] == [int(c) for c in want_counts] and int(want_counts[1]) > 0
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(
      np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32), rtol=tol, atol=tol * 1e-3
  )
  assert np.abs(np.asarray(want_grad, np.float32)).max() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_bits_unpack_to_the_brute_force_targets(seed):
  labels = random_labels(seed, shape=(2, 7, 9))
  positive, valid = affinity.direction_bits(jnp.asarray(labels), RATES, IGN)
  assert positive.dtype == valid.dtype == jnp.uint8 and positive.shape == (2, 7, 9, len(RATES))
  targets, want_valid = brute_targets(labels, RATES)
  np.testing.assert_array_equal(np.asarray(affinity.unpack_bits(valid)), want_valid)
  np.testing.assert_array_equal(np.asarray(affinity.unpack_bits(positive)), targets == 1)


def test_affinity_loss_all_ignored_is_zero():
  labels = jnp.full((1, 4, 4), IGN, jnp.int32)
  stats = AffinityStats(((1, 1),), FREQ[:1], POS[:1])
  assert float(affinity.affinity_loss(jnp.ones((1, 4, 4, 8)), labels, [(1, 1)], stats)) == 0.0


# ---------------------------------------------------------------------------------------------- bias, accuracy


def test_prior_bias_sigmoid_equals_pi():
  pi = np.array([0.9, 0.6, 0.75])
  b = affinity.prior_bias(pi)
  assert b.shape == (24,) and b.dtype == np.float32
  np.testing.assert_allclose(1 / (1 + np.exp(-b)), np.repeat(pi, 8), rtol=1e-6)
  assert np.all(np.isfinite(affinity.prior_bias([0.0, 1.0])))


@pytest.mark.parametrize("rule", ["rescale", "count"])
def test_affinity_accuracy_counts_brute_force(rule):
  labels = random_labels(21, shape=(2, 6, 5))
  rng = np.random.default_rng(22)
  logits = rng.normal(size=(2, 6, 5, 8 * len(RATES))).astype(np.float32)
  correct, total = affinity.affinity_accuracy_counts(
      jnp.asarray(logits), jnp.asarray(labels), RATES, partial_neighbors=rule
  )
  targets, valid = brute_targets(labels, RATES)
  k = brute_categories(labels, RATES, rule)
  want_c = np.zeros((len(RATES), 9), int)
  want_t = np.zeros((len(RATES), 9), int)
  for idx in np.ndindex(*labels.shape):
    for c in range(8 * len(RATES)):
      if valid[idx][c]:
        r = c // 8
        want_t[r, k[idx][r]] += 1
        want_c[r, k[idx][r]] += int((logits[idx][c] > 0) == (targets[idx][c] == 1))
  np.testing.assert_array_equal(np.asarray(correct), want_c)
  np.testing.assert_array_equal(np.asarray(total), want_t)
  # the training step's total: the same counts, summed
  c_all, t_all = affinity.affinity_accuracy_total(jnp.asarray(logits), jnp.asarray(labels), RATES)
  assert (int(c_all), int(t_all)) == (want_c.sum(), want_t.sum()) and want_t.sum() > 0
  # ... and as the training step counts them, beside the loss (zero logits included: σ(0) = 0.5 is not > 0.5)
  logits[0, 0, 0, :] = 0.0
  stats = AffinityStats(RATES, FREQ, POS, partial_neighbors=rule)
  _, _, c_step, t_step = affinity.affinity_loss_terms(jnp.asarray(logits), jnp.asarray(labels), RATES, stats)
  c_all, t_all = affinity.affinity_accuracy_total(jnp.asarray(logits), jnp.asarray(labels), RATES)
  assert (int(c_step), int(t_step)) == (int(c_all), int(t_all))


def test_neighbour_inside_matches_a_loop_for_the_image_and_for_each_examples_real_size():
  offsets = affinity.neighbor_offsets([(1, 2), (3, 3)])
  size = (5, 7)
  whole = np.asarray(affinity.neighbour_inside(size, offsets))
  per_example = np.asarray(affinity.neighbour_inside(size, offsets, jnp.array([5, 3]), jnp.array([7, 4])))
  constant = affinity.neighbour_inside(size, offsets, xp=np)
  assert isinstance(constant, np.ndarray) and (constant == whole).all()
  for k, (s, t) in enumerate(offsets):
    for i in range(5):
      for j in range(7):
        assert whole[i, j, k] == (0 <= i + s < 5 and 0 <= j + t < 7)
        for b, (h, w) in enumerate(((5, 7), (3, 4))):
          assert per_example[b, i, j, k] == (0 <= i + s < h and 0 <= j + t < w)
