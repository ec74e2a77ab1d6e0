"""Affinity propagation (paper §3.3, Eq. 6–7): refine class probabilities with the predicted dilated affinity."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax import affinity


def steep_sigmoid(logits: jax.Array, mu: float = 7.0) -> jax.Array:
  """Eq. 7: ``g(x) = μ^x / (1 + μ^x) = σ(x · ln μ)``, a steeper sigmoid for μ > e (μ = 7 in the paper)."""
  if mu <= 1.0:
    raise ValueError(f"steep_sigmoid: mu must be > 1, got {mu}")
  return jax.nn.sigmoid(jnp.asarray(logits) * math.log(mu))


def gt_affinity(labels: jax.Array, rates: Sequence, ignore_label: int = 255) -> jax.Array:
  """The ground-truth oracle of Tables 3–4: ``a = target · valid`` as float32 ``[B, H, W, 8·|R|]``."""
  targets, valid = affinity.affinity_targets(labels, rates, ignore_label)
  return targets * valid


_TINY = float(np.finfo(np.float32).tiny)


def _live_offsets(offsets, h: int, w: int) -> tuple[tuple[int, int, int], ...]:
  """``(channel, s, t)`` of the directions that can reach inside an ``h x w`` image (the others are always 0)."""
  return tuple((c, s, t) for c, (s, t) in enumerate(offsets) if abs(s) < h and abs(t) < w)


def _masked_affinity(aff: jax.Array, live) -> jax.Array:
  """Affinities as float32 ``[B, H, D, W]`` (one plane per live direction), zero where the neighbour is outside.

  Folding "outside the image contributes nothing" into the weights lets :func:`_neighbour_sum` read shifted
  neighbours as flat offsets that may wrap into the next row: whatever finite value it reads there is weighed 0
  (with non-finite probabilities, 0 · inf = nan could then leak in from the far side of the image).
  """
  _, h, w, _ = aff.shape
  rows = jnp.arange(h)[:, None, None] + np.array([s for _, s, _ in live], np.int32)[:, None]
  cols = jnp.arange(w)[None, None, :] + np.array([t for _, _, t in live], np.int32)[:, None]
  inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # [H, D, W], from iotas (no big constant)
  channels = [c for c, _, _ in live]
  if channels == list(range(aff.shape[-1])):
    a = jnp.transpose(aff, (0, 1, 3, 2))
  else:
    a = jnp.stack([aff[..., c] for c in channels], axis=2)
  return jnp.where(inside, a.astype(jnp.float32), 0.0)


def _class_stats(pp: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``max_c p`` and ``Σ_c p`` over the class axis (2) of ``[B, H', C, W]``, in float32, in one pass.

  One variadic reduce: XLA:CPU hands a plain large ``reduce`` to YNNPACK, whose fusions cannot read strided
  slices and would then materialise every shifted copy of ``p`` (the cause of the old ~50 ms per iteration).
  """
  pf = pp.astype(jnp.float32)
  both = lambda x, y: (jnp.maximum(x[0], y[0]), x[1] + y[1])
  mx, sm = jax.lax.reduce((pf, pf), (np.float32(-np.inf), np.float32(0)), both, (2,))
  return mx[:, :, None, :], sm[:, :, None, :]


def _neighbour_sum(x: jax.Array, am: jax.Array, live, pad: int, h: int) -> jax.Array:
  """``Σ_s a_s · x_s`` over the live directions, for the ``h`` image rows of ``x`` ``[B, h + 2·pad, K, W]``.

  ``x`` holds ``pad`` zero rows above and below the image; a neighbour ``(i+s, j+t)`` is read as a static slice
  of the flattened ``(row, K, W)`` axes at offset ``(s·K·W + t)``, which wraps across rows when ``j+t`` leaves the
  image; ``am`` (:func:`_masked_affinity`) is zero exactly there, so the sum equals the zero-padded one.
  """
  b, hp, k, w = x.shape
  flat = x.reshape(b, hp * k * w)
  acc = None
  for d, (_, s, t) in enumerate(live):
    o = ((pad + s) * k) * w + t
    term = am[:, :, d:d + 1] * jax.lax.slice_in_dim(flat, o, o + h * k * w, axis=1).reshape(b, h, k, w)
    acc = term if acc is None else acc + term
  return acc


@functools.partial(jax.jit, static_argnames=("rates",))
def _propagate(probs, aff, rates, lam, iterations):
  """Eq. 6 on the layout ``[B, H + 2·pad, C, W]`` (rows padded with zeros), which XLA:CPU vectorises along W.

  Per iteration: one reduce for ``max_c p`` and ``Σ_c p``; the normaliser ``Σ_c(λ·p·max p + Σ_s a_s·p_s) =
  λ·max p·Σ_c p + Σ_s a_s·(Σ_c p)_s`` from those per-pixel sums (1/C of the work, no reduce over the result);
  then one fused loop for the neighbour sum, the self term and the normalisation, written back row-padded.
  The state keeps the input dtype between iterations (as ``p`` itself would); arithmetic is float32.
  ``iterations`` is traced: one compilation serves every count, and a count of 1 is not unrolled (unrolled,
  XLA fuses the once-per-call layout changes into the 32-term loop and recomputes them per class: ~80 ms).
  """
  _, h, w, _ = probs.shape
  live = _live_offsets(affinity.neighbor_offsets(rates), h, w)
  pad = max([abs(s) for _, s, _ in live], default=0) + 1  # +1 row: flat reads at t < 0 on the first row
  am = _masked_affinity(aff, live) if live else None
  rows = ((0, 0), (pad, pad), (0, 0), (0, 0))

  def body(_, pp):
    mx, sm = _class_stats(pp)
    m = mx[:, pad:pad + h]
    q = pp[:, pad:pad + h].astype(jnp.float32)
    norm = lam * m * sm[:, pad:pad + h]
    un = lam * q * m
    if live:
      norm = norm + _neighbour_sum(sm, am, live, pad, h)
      un = un + _neighbour_sum(pp.astype(jnp.float32), am, live, pad, h)
    out = un * (1.0 / jnp.maximum(norm, _TINY))
    return jnp.pad(out.astype(pp.dtype), rows)

  pp = jnp.pad(jnp.transpose(probs, (0, 1, 3, 2)), rows)
  pp = jax.lax.fori_loop(0, iterations, body, pp)
  return jnp.transpose(pp[:, pad:pad + h], (0, 1, 3, 2))


def propagate(probs: jax.Array, affinity_map: jax.Array, rates: Sequence, lam: float = 6.0,
              iterations: int = 10) -> jax.Array:
  """Eq. 6 applied ``iterations`` times: ``p ← N(λ · p · max_c(p) + Σ_{s ∈ S_{i,j}} a_s · p_s)``.

  Args:
    probs: class probabilities ``[B, H, W, C]`` at full resolution (softmax of upsampled logits), float32 or
      bfloat16 (the result has the same dtype; arithmetic is float32).
    affinity_map: ``[B, H, W, 8·|R|]`` in [0, 1]: ``steep_sigmoid`` of the predicted affinity logits (Eq. 7)
      or the oracle :func:`gt_affinity`. Channel ``c`` weighs the neighbour at offset
      ``neighbor_offsets(rates)[c]``; neighbours outside the image contribute nothing. Affinities stay fixed.
    rates: explicit rate pairs (hashable; static under jit).
    lam: λ, the weight of the pixel's own prediction (6 in the paper).
    iterations: number of refinements (``lax.fori_loop``); 0 returns ``probs`` unchanged.
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
  if iterations == 0:
    return probs
  return _propagate(probs, affinity_map, rates, jnp.float32(lam), jnp.int32(iterations))
