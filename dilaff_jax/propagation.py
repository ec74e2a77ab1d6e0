"""Affinity propagation (paper §3.3, Eq. 6–7): refine class probabilities with the predicted dilated affinity."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

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


def _neighbour_sum(p: jax.Array, a: jax.Array, offsets: tuple[tuple[int, int], ...]) -> jax.Array:
  """``Σ_s a_s · p_s`` with ``p_s = p[i+s, j+t]`` and zero outside the image (zero padding + static slices)."""
  _, h, w, _ = p.shape
  ph = max(abs(s) for s, _ in offsets)
  pw = max(abs(t) for _, t in offsets)
  pp = jnp.pad(p, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  acc = None
  for c, (s, t) in enumerate(offsets):
    shifted = jax.lax.slice_in_dim(jax.lax.slice_in_dim(pp, ph + s, ph + s + h, axis=1), pw + t, pw + t + w, axis=2)
    term = a[..., c:c + 1] * shifted
    acc = term if acc is None else acc + term
  return acc


@functools.partial(jax.jit, static_argnames=("rates", "iterations"))
def _propagate(probs, aff, rates, lam, iterations):
  offsets = affinity.neighbor_offsets(rates)
  out_dtype = probs.dtype
  a = aff.astype(jnp.float32)

  def body(_, p):
    pf = p.astype(jnp.float32)
    un = lam * pf * jnp.max(pf, axis=-1, keepdims=True) + _neighbour_sum(pf, a, offsets)
    norm = jnp.maximum(jnp.sum(un, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return (un / norm).astype(out_dtype)

  return jax.lax.fori_loop(0, iterations, body, probs)


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
  return _propagate(probs, affinity_map, rates, jnp.float32(lam), int(iterations))
