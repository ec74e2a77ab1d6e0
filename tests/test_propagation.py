"""Affinity propagation (Eq. 6–7) against a brute-force loop, and the oracle's effect on a hand-made scene."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dilaff_jax.method import affinity, propagation
from test_affinity import IGN, brute_offsets, brute_targets

RATES = ((1, 2), (2, 1), (7, 9))  # asymmetric, and (7, 9) larger than the test images


def brute_propagate(p, a, rates, lam, iterations, anchored=False):
  p = np.array(p, np.float64)
  p0 = p.copy()
  a = np.asarray(a, np.float64)
  offs = brute_offsets(rates)
  b, h, w, c = p.shape
  for _ in range(iterations):
    new = np.zeros_like(p)
    for n in range(b):
      for i in range(h):
        for j in range(w):
          own = p0[n, i, j] if anchored else p[n, i, j]
          v = lam * own * own.max()
          for d, (s, t) in enumerate(offs):
            if 0 <= i + s < h and 0 <= j + t < w:
              v = v + a[n, i, j, d] * p[n, i + s, j + t]
          new[n, i, j] = v / v.sum()
    p = new
  return p


def random_inputs(seed, b=2, h=5, w=6, c=4, rates=RATES):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, c)) * 2
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  a = rng.uniform(size=(b, h, w, 8 * len(rates)))
  return p.astype(np.float32), a.astype(np.float32)


def test_steep_sigmoid_is_eq7():
  x = np.linspace(-3, 3, 13)
  want = 7.0**x / (1 + 7.0**x)
  np.testing.assert_allclose(propagation.steep_sigmoid(jnp.asarray(x, jnp.float32)), want, rtol=1e-5)
  np.testing.assert_allclose(propagation.steep_sigmoid(jnp.asarray(x), mu=math.e), 1 / (1 + np.exp(-x)), rtol=1e-5)
  with pytest.raises(ValueError):
    propagation.steep_sigmoid(x, mu=1.0)


@pytest.mark.parametrize("iterations", [1, 3])
def test_propagate_matches_brute_force(iterations):
  p, a = random_inputs(0)
  got = propagation.propagate(jnp.asarray(p), jnp.asarray(a), RATES, lam=6.0, iterations=iterations)
  want = brute_propagate(p, a, RATES, 6.0, iterations)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


def test_a_fixed_count_inside_a_jitted_program_keeps_the_two_step_loop():
  """Evaluation calls propagate with constant counts inside its jitted step: the loop must stay the one the
  top-level call compiles (a conditional ping-pong), not a folded one that fuses each step into the next (2.5x
  slower), and give the brute-force values."""
  p, a = random_inputs(2)
  inner = jax.jit(lambda p, a: propagation.propagate(p, a, RATES, lam=6.0, iterations=4))
  hlo = inner.lower(jnp.asarray(p), jnp.asarray(a)).compile().as_text()
  assert " conditional(" in hlo and " while(" in hlo
  np.testing.assert_allclose(np.asarray(inner(p, a)), brute_propagate(p, a, RATES, 6.0, 4), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_anchored_reading_matches_brute_force_and_differs_from_the_papers(iterations):
  """The anchored reading keeps λ·p⁰·max p⁰ (the network's prediction) as the self term of every iteration."""
  p, a = random_inputs(2, c=11)  # 11 classes: padded to 16 inside, the padding must stay out of the self term
  p, a = jnp.asarray(p), jnp.asarray(a)
  got = propagation.propagate(p, a, RATES, lam=6.0, iterations=iterations, anchor=p)
  want = brute_propagate(p, a, RATES, 6.0, iterations, anchored=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
  paper = brute_propagate(p, a, RATES, 6.0, iterations)
  assert (iterations == 1) == np.allclose(want, paper, atol=1e-6)  # one step is the same, two are not
  # a sweep continued from an intermediate state keeps the anchor: 1 then iterations - 1 more = iterations at once
  first = propagation.propagate(p, a, RATES, lam=6.0, iterations=1, anchor=p)
  rest = propagation.propagate(first, a, RATES, lam=6.0, iterations=iterations - 1, anchor=p)
  np.testing.assert_allclose(np.asarray(rest), want, rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="anchor has shape"):
    propagation.propagate(p, a, RATES, anchor=p[:1])


def test_propagate_zero_iterations_is_identity_and_outputs_are_distributions():
  p, a = random_inputs(1, b=1, h=9, w=7, c=5)
  np.testing.assert_array_equal(np.asarray(propagation.propagate(p, a, RATES, iterations=0)), p)
  out = np.asarray(propagation.propagate(p, a, RATES, iterations=10))
  assert np.all(out >= 0)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  # neighbours outside the image contribute nothing: affinity only on the (7, 9) rate, whose neighbours on a
  # 9x7 map are inside only for the (+-7, 0) directions of the first/last two rows
  a_far = np.zeros_like(a)
  a_far[..., 16:] = 1.0
  only_far = np.asarray(propagation.propagate(p, a_far, RATES, lam=6.0, iterations=1))
  np.testing.assert_allclose(only_far, brute_propagate(p, a_far, RATES, 6.0, 1), rtol=2e-5, atol=1e-6)


def test_the_input_is_renormalised_over_its_classes_first():
  """Each pixel's classes are made to sum to 1 before Eq. 6 (its normaliser relies on it): scores that do not sum
  to 1 give the brute-force result of the renormalised probabilities, under both readings."""
  p, a = random_inputs(4, c=5)
  scale = np.random.default_rng(4).uniform(0.2, 3.0, size=p.shape[:3] + (1,)).astype(np.float32)
  unnormalised = p * scale
  for anchored in (False, True):
    got = propagation.propagate(unnormalised, a, RATES, lam=6.0, iterations=3, anchor=p if anchored else None)
    want = brute_propagate(p, a, RATES, 6.0, 3, anchored=anchored)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


def test_propagate_any_size_and_bfloat16():
  for h, w in ((3, 4), (11, 2)):
    p, a = random_inputs(h * w, b=1, h=h, w=w, c=3)
    got = propagation.propagate(jnp.asarray(p), jnp.asarray(a), RATES, iterations=2)
    np.testing.assert_allclose(np.asarray(got), brute_propagate(p, a, RATES, 6.0, 2), rtol=2e-5, atol=1e-6)
  p, a = random_inputs(5)
  bf = propagation.propagate(jnp.asarray(p, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16), RATES, iterations=3)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), brute_propagate(p, a, RATES, 6.0, 3), atol=2e-2)
  jitted = jax.jit(propagation.propagate, static_argnames=("rates", "iterations"))
  np.testing.assert_allclose(
      np.asarray(jitted(p, a, rates=RATES, lam=6.0, iterations=3)),
      brute_propagate(p, a, RATES, 6.0, 3),
      rtol=2e-5,
      atol=1e-6,
  )


def test_propagate_rejects_bad_shapes():
  p, a = random_inputs(2)
  with pytest.raises(ValueError, match="expected"):
    propagation.propagate(p, a[..., :8], RATES)
  with pytest.raises(ValueError, match="iterations"):
    propagation.propagate(p, a, RATES, iterations=-1)


def test_gt_affinity_is_target_times_valid():
  labels = np.array([[[0, 0, 1, 1], [0, IGN, 1, 1], [2, 2, 2, 1]]], np.int32)
  a = np.asarray(propagation.gt_affinity(labels, RATES))
  t, v = brute_targets(labels, RATES)
  np.testing.assert_array_equal(a, t * v)


def miou(pred, labels, num_classes):
  ious = []
  for c in range(num_classes):
    inter = np.sum((pred == c) & (labels == c))
    union = np.sum(((pred == c) | (labels == c)) & (labels != IGN))
    if union:
      ious.append(inter / union)
  return float(np.mean(ious))


def test_ground_truth_oracle_repairs_a_corrupted_prediction():
  """A hand-made scene: two rectangles on background, a prediction that is right on average but noisy."""
  h, w, c = 32, 32, 3
  labels = np.zeros((h, w), np.int32)
  labels[4:20, 3:14] = 1
  labels[12:28, 16:29] = 2
  labels[19, 3:14] = IGN  # a void band, as in VOC
  rng = np.random.default_rng(0)
  probs = np.full((h, w, c), 0.1 / (c - 1))
  probs[np.arange(h)[:, None], np.arange(w)[None], np.where(labels == IGN, 0, labels)] = 0.9
  noisy = rng.random((h, w)) < 0.3  # 30% of pixels get a confident wrong class
  wrong = (np.where(labels == IGN, 0, labels) + rng.integers(1, c, size=(h, w))) % c
  probs[noisy] = 0.05
  probs[noisy, wrong[noisy]] = 0.9
  probs /= probs.sum(-1, keepdims=True)
  rates = affinity.expand_rates([1, 2])
  aff = propagation.gt_affinity(labels[None], rates)
  scores = []
  for it in (0, 1, 3, 6, 10):
    out = propagation.propagate(jnp.asarray(probs[None], jnp.float32), aff, rates, lam=6.0, iterations=it)
    scores.append(miou(np.asarray(out[0]).argmax(-1), labels, c))
  print("oracle mIoU by iterations", scores)
  assert scores[0] < 0.6
  assert all(b >= a - 1e-9 for a, b in zip(scores, scores[1:])), scores
  assert scores[-1] > 0.95, scores
  # predicted-like affinity that says "everything is one region" does not repair it (the oracle is what helps)
  flat = jnp.ones_like(aff)
  out = propagation.propagate(jnp.asarray(probs[None], jnp.float32), flat, rates, iterations=10)
  assert miou(np.asarray(out[0]).argmax(-1), labels, c) < scores[-1]


def test_a_sweep_continues_each_count_from_the_last_and_equals_propagating_from_scratch():
  """``sweep`` gives, for every count (in any order), what ``propagate`` gives for that count from the start: the
  paper's reading and the anchored one (whose p⁰ stays the sweep's input)."""
  rng = np.random.default_rng(3)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 9, 11, 4)), jnp.float32), axis=-1)
  aff = jnp.asarray(rng.uniform(size=(2, 9, 11, 8 * len(RATES))), jnp.float32)
  for anchor in (None, probs):
    got = propagation.sweep(probs, aff, RATES, (3, 0, 1), lam=4.0, anchor=anchor)
    assert list(got) == [0, 1, 3]
    for n, p in got.items():
      want = propagation.propagate(probs, aff, RATES, lam=4.0, iterations=n, anchor=anchor)
      np.testing.assert_allclose(np.asarray(p), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got[3]), np.asarray(got[1]), atol=1e-4)
