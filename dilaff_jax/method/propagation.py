"""Affinity propagation (paper §3.3, Eq. 6–7): refine class probabilities with the predicted dilated affinity."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.method import affinity
from dilaff_jax.method.conventions import IGNORE_LABEL


def steep_sigmoid(logits: jax.Array, mu: float = 7.0) -> jax.Array:
  """Eq. 7: ``g(x) = μ^x / (1 + μ^x) = σ(x · ln μ)``, a steeper sigmoid for μ > e (μ = 7 in the paper)."""
  if mu <= 1.0:
    raise ValueError(f"steep_sigmoid: mu must be > 1, got {mu}")
  return jax.nn.sigmoid(jnp.asarray(logits) * math.log(mu))


def gt_affinity(labels: jax.Array, rates: Sequence, ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """The ground-truth oracle of Tables 3–4: ``a = target · valid`` as float32 ``[B, H, W, 8·|R|]``."""
  targets, valid = affinity.affinity_targets(labels, rates, ignore_label)
  return targets * valid


_TINY = float(np.finfo(np.float32).tiny)
_LANES = 8  # float32 lanes of an AVX2 vector: the class axis is padded to a multiple of this


def _live_offsets(offsets, h: int, w: int) -> tuple[tuple[int, int, int], ...]:
  """``(channel, s, t)`` of the directions that can reach inside an ``h x w`` image (the others are always 0)."""
  return tuple((c, s, t) for c, (s, t) in enumerate(offsets) if abs(s) < h and abs(t) < w)


def _masked_affinity(aff: jax.Array, live) -> jax.Array:
  """Affinities ``[B, H, W, D]`` in float32, one entry per live direction, zero where the neighbour is outside the
  image (one scalar per pixel and direction, broadcast over the classes by :func:`_neighbour_sum`).

  Folding "outside the image contributes nothing" into the weights lets the neighbour sums read shifted
  neighbours as flat offsets that may wrap into the next row: whatever finite value they read there is weighed
  0 (with non-finite probabilities, 0 · inf = nan could then leak in from the far side of the image).
  """
  _, h, w, _ = aff.shape
  ds = np.array([s for _, s, _ in live], np.int32)
  dt = np.array([t for _, _, t in live], np.int32)
  rows, cols = jnp.arange(h)[:, None, None] + ds, jnp.arange(w)[None, :, None] + dt
  inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # from iotas (no big constant)
  channels = [c for c, _, _ in live]
  a = aff if channels == list(range(aff.shape[-1])) else jnp.stack([aff[..., c] for c in channels], axis=-1)
  return jnp.where(inside, a.astype(jnp.float32), 0.0)


def _class_max(pp: jax.Array, c: int) -> jax.Array:
  """``max_c p`` over the first ``c`` entries of the class axis (3) of ``[B, H', W, K]``, float32.

  A variadic reduce (the max and, unused, the sum): XLA:CPU hands a plain large ``reduce`` to YNNPACK, whose
  fusions cannot read strided slices and would then materialise every shifted copy of ``p`` (about 50 ms per
  iteration instead of a few).
  """
  pf = pp[..., :c].astype(jnp.float32)
  both = lambda x, y: (jnp.maximum(x[0], y[0]), x[1] + y[1])
  return jax.lax.reduce((pf, pf), (np.float32(-np.inf), np.float32(0)), both, (3,))[0]


def _neighbour_sum(x: jax.Array, am: jax.Array, live, pad: int, h: int) -> jax.Array:
  """``Σ_s a_s · x_s`` over the live directions, for the ``h`` image rows of ``x`` ``[B, h + 2·pad, W, K]``.

  ``x`` holds ``pad`` zero rows above and below the image; a neighbour ``(i+s, j+t)`` is read as a static slice
  of the flattened ``(row, W, K)`` axes at offset ``(s·W + t)·K``, which wraps across rows when ``j+t`` leaves the
  image; ``am`` (:func:`_masked_affinity`, ``[B, h, W, D]``) is zero exactly there, so the sum equals the
  zero-padded one. With the classes innermost, the fused loop loads each ``a_s`` once per pixel and broadcasts it
  over the class vectors: one load per multiply-add (classes-outer layouts need two, and re-read all ``a``
  rows once per class).
  """
  b, hp, w, k = x.shape
  flat = x.reshape(b, hp * w * k)
  acc = None
  for d, (_, s, t) in enumerate(live):
    o = ((pad + s) * w + t) * k
    term = am[..., d : d + 1] * jax.lax.slice_in_dim(flat, o, o + h * w * k, axis=1).reshape(b, h, w, k)
    acc = term if acc is None else acc + term
  return acc


@functools.partial(jax.jit, static_argnames=("rates",))
def _propagate(probs, aff, rates, lam, iterations, anchor=None):
  """Eq. 6 on the layout ``[B, H + 2·pad, W, K]``: rows padded with zeros, classes padded to ``K``, a multiple of
  the vector width (the extra classes stay 0), so XLA:CPU vectorises along the classes.

  The state's classes sum to 1 (the input is renormalised once; every iteration's output is a distribution), so
  the normaliser ``Σ_c(λ·p·max p + Σ_s a_s·p_s)`` is ``λ·max p + Σ_s a_s``, with ``Σ_s a_s`` over the neighbours
  inside the image summed once per call: per iteration one reduce for ``max_c p``, then one fused loop for the
  neighbour sum, the self term and the normalisation, written back row-padded. (Anchored: ``λ·max p⁰·Σ_c p⁰ +
  Σ_s a_s``, fixed.) The state keeps the input dtype between iterations (as ``p`` itself would); arithmetic is
  float32. ``iterations`` is traced: one compilation serves every count (``iterations // 2`` double steps, then one
  more step if odd), and a count of 1 is not unrolled (unrolled, XLA fuses the once-per-call layout changes into
  the 32-term loop and recomputes them per element).
  """
  _, h, w, c = probs.shape
  live = _live_offsets(affinity.neighbor_offsets(rates), h, w)
  pad = max([abs(s) for _, s, _ in live], default=0) + 1  # +1 row: flat reads at t < 0 on the first row
  am = _masked_affinity(aff, live) if live else None
  a_sum = am.sum(-1) if live else jnp.zeros(probs.shape[:3], jnp.float32)  # Σ_s a_s, neighbours inside
  rows = ((0, 0), (pad, pad), (0, 0), (0, 0))
  k = -(-c // _LANES) * _LANES
  anchored = anchor is not None
  if anchored:  # the self term of the network's own prediction, fixed over the iterations
    p0 = anchor.astype(jnp.float32)
    m0 = p0.max(-1)
    self0 = jnp.pad(lam * p0 * m0[..., None], ((0, 0), (0, 0), (0, 0), (0, k - c)))
    norm0 = lam * m0 * p0.sum(-1) + a_sum

  def body(_, pp):
    if anchored:
      norm, un = norm0, self0
    else:
      m = _class_max(pp, c)[:, pad : pad + h]
      norm = lam * m + a_sum
      un = lam * pp[:, pad : pad + h].astype(jnp.float32) * m[..., None]
    if live:
      un = un + _neighbour_sum(pp.astype(jnp.float32), am, live, pad, h)
    out = un * (1.0 / jnp.maximum(norm, _TINY))[..., None]
    return jnp.pad(out.astype(pp.dtype), rows)

  def twice(i, pp):
    # Two steps per trip, the first inside a conditional whose branches are both that step (so the predicate,
    # which XLA cannot fold, does not matter): the conditional keeps XLA from fusing the first step into the
    # 32 reads of the second, and its output is a buffer of its own, so the trip ping-pongs between two
    # buffers. One step per trip costs a copy of the state (~15% of an iteration): the step reads the state
    # buffer it would overwrite.
    pp = jax.lax.cond(iterations > 0, lambda x: body(i, x), lambda x: body(i, x), pp)
    return body(i, pp)

  # Inside a larger jitted program (evaluation's sweep) the count is a constant: XLA would fold the conditional's
  # predicate, drop the ping-pong and fuse each step into the next one's 32 reads (2.5x slower per sweep). The
  # barrier keeps the count opaque to the compiler.
  iterations = jax.lax.optimization_barrier(iterations)
  p = probs.astype(jnp.float32)
  p = (p / jnp.maximum(p.sum(-1, keepdims=True), _TINY)).astype(probs.dtype)  # each pixel's classes sum to 1
  pp = jnp.pad(p, ((0, 0), (pad, pad), (0, 0), (0, k - c)))
  pp = jax.lax.fori_loop(0, iterations // 2, twice, pp)
  pp = jax.lax.fori_loop(0, iterations % 2, body, pp)
  return pp[:, pad : pad + h, :, :c]


READINGS = ("paper", "anchored")  # affinity.propagation_reading: the paper's Eq. 6, or its self term anchored on p⁰


def propagate(
    probs: jax.Array,
    affinity_map: jax.Array,
    rates: Sequence,
    lam: float = 6.0,
    iterations: int = 10,
    anchor: jax.Array | None = None,
) -> jax.Array:
  """Eq. 6 applied ``iterations`` times: ``p ← N(λ · p · max_c(p) + Σ_{s ∈ S_{i,j}} a_s · p_s)``.

  With ``anchor`` (the anchored reading, ``affinity.propagation_reading="anchored"``) the self term stays on the
  network's own prediction ``p⁰ = anchor``, as a CRF's unary term does: ``p ← N(λ · p⁰ · max_c(p⁰) + Σ_s a_s ·
  p_s)`` (docs/conventions.md, "Propagation"); without it (the paper's text, the default) ``p`` is updated in both
  terms. Give the anchor explicitly so that a sweep continued from an intermediate ``probs`` keeps ``p⁰``.

  Args:
    probs: class probabilities ``[B, H, W, C]`` at full resolution (softmax of upsampled logits), float32 or
      bfloat16 (the result has the same dtype; arithmetic is float32). Each pixel's classes are renormalised to
      sum to 1 first (a softmax's do already, up to rounding), which Eq. 6's output does at every iteration; the
      normaliser relies on it, so a pixel of all zeros, which is no distribution, would be counted in its
      neighbours' normalisers as if it summed to 1.
    affinity_map: ``[B, H, W, 8·|R|]`` in [0, 1]: ``steep_sigmoid`` of the predicted affinity logits (Eq. 7)
      or the oracle :func:`gt_affinity`. Channel ``c`` weighs the neighbour at offset
      ``neighbor_offsets(rates)[c]``; neighbours outside the image contribute nothing. Affinities stay fixed.
    rates: explicit rate pairs (hashable; static under jit).
    lam: λ, the weight of the pixel's own prediction (6 in the paper).
    iterations: number of refinements (``lax.fori_loop``); 0 returns ``probs`` unchanged.
    anchor: ``p⁰`` of the anchored reading, the shape of ``probs``; None: the paper's reading.
  """
  rates = affinity.explicit_rates(rates)
  probs = jnp.asarray(probs)
  affinity_map = jnp.asarray(affinity_map)
  if probs.ndim != 4:
    raise ValueError(f"propagate: probs must be [B, H, W, C], got shape {probs.shape}")
  want = (*probs.shape[:3], affinity.DIRECTIONS_PER_RATE * len(rates))
  if affinity_map.shape != want:
    raise ValueError(f"propagate: affinity has shape {affinity_map.shape}, expected {want} for rates {rates}")
  if iterations < 0:
    raise ValueError(f"propagate: iterations must be >= 0, got {iterations}")
  if anchor is not None and jnp.shape(anchor) != probs.shape:
    raise ValueError(f"propagate: anchor has shape {jnp.shape(anchor)}, expected that of probs {probs.shape}")
  if iterations == 0:
    return probs
  return _propagate(probs, affinity_map, rates, jnp.float32(lam), jnp.int32(iterations), anchor)


def sweep(
    probs: jax.Array,
    affinity_map: jax.Array,
    rates: Sequence,
    counts: Sequence[int],
    lam: float = 6.0,
    anchor: jax.Array | None = None,
) -> dict[int, jax.Array]:
  """The propagation sweep of Tables 3–4: ``{n: probs after n iterations}`` for every count of ``counts`` (sorted),
  each count continuing from the previous one, so the whole sweep costs ``max(counts)`` iterations
  (:func:`propagate`'s arguments otherwise)."""
  out, p, done = {}, probs, 0
  for n in sorted(counts):
    p = propagate(p, affinity_map, rates, lam=lam, iterations=n - done, anchor=anchor)
    done = n
    out[n] = p
  return out
