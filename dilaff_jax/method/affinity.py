"""Dilated affinity (paper §3.1–3.2): targets (Eq. 1–3), neighbour categories n_k, weighted focal loss (Eq. 4–5).

Conventions (``docs/conventions.md`` states each with the reason where the paper is open):

* A rate is a pair ``(r1, r2)``: ``r1`` moves along rows (height), ``r2`` along columns (width).
  The paper's shorthand (a scalar ``8`` for ``(8, 8)``, a pair ``(12, 24)`` for both ``(12, 24)`` and
  ``(24, 12)``) is expanded once by :func:`expand_rates`; every other function takes *explicit* pairs
  (a bare scalar ``s`` is accepted there too and means ``(s, s)``).
* Per rate, the 8 directions of ``S_r(i, j)`` (Eq. 3) in row-major order over ``s in (-r1, 0, r1)``,
  ``t in (-r2, 0, r2)`` with the centre skipped. Channel ``c = rate_index * 8 + direction_index``;
  arrays are channels-last ``[B, H, W, 8·|R|]``; channel ``c`` at ``(i, j)`` concerns ``x[i, j]`` and
  ``x[i + s, j + t]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.method import fusion
from dilaff_jax.method.conventions import IGNORE_LABEL

if TYPE_CHECKING:  # pragma: no cover
  from dilaff_jax.method.neighbour_stats import AffinityStats

RateSpec = Union[int, Sequence[int]]
Rates = tuple[tuple[int, int], ...]

DIRECTIONS_PER_RATE = 8
NUM_CATEGORIES = 9  # n_0 .. n_8
SCHEMES = ("none", "signal", "neighbor", "sqrt")
PARTIAL_NEIGHBORS = ("rescale", "count")  # how pixels with invalid neighbours get their n_k (see neighbor_categories)


def _as_pair(rate: RateSpec, where: str) -> tuple[int, int]:
  """One rate as an explicit ``(r1, r2)`` pair of positive ints, or a ValueError naming it."""
  if isinstance(rate, (int, np.integer)) and not isinstance(rate, bool):
    pair = (int(rate), int(rate))
  elif (
      isinstance(rate, Sequence)
      and not isinstance(rate, str)
      and len(rate) == 2
      and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in rate)
  ):
    pair = (int(rate[0]), int(rate[1]))
  else:
    raise ValueError(f"{where}: rate {rate!r} is neither a positive int nor a pair of positive ints")
  if pair[0] < 1 or pair[1] < 1:
    raise ValueError(f"{where}: rate {rate!r} must be positive")
  return pair


def _offsets_of(pair: tuple[int, int]) -> list[tuple[int, int]]:
  r1, r2 = pair
  return [(s, t) for s in (-r1, 0, r1) for t in (-r2, 0, r2) if s or t]


def _check_unique(pairs: Sequence[tuple[int, int]], where: str) -> Rates:
  """``pairs`` as a tuple when no rate repeats and no two rates share a neighbour offset (e.g. ``(8, 8)`` and
  ``(8, 16)`` both reach ``(±8, 0)``: Eq. 6 and the loss would count that neighbour twice); else a ValueError."""
  seen = set()
  owner = {}
  for p in pairs:
    if p in seen:
      raise ValueError(f"{where}: rate {p} appears twice in {list(pairs)}")
    seen.add(p)
    for q in sorted({owner[o] for o in _offsets_of(p) if o in owner}):
      shared = sorted(set(_offsets_of(p)) & set(_offsets_of(q)))
      raise ValueError(
          f"{where}: rates {q} and {p} share the neighbour offsets {', '.join(map(str, shared))}, so Eq. 6 and the "
          "affinity loss would count those neighbours twice; drop one of the two rates or change it"
      )
    owner.update({o: p for o in _offsets_of(p)})
  if not pairs:
    raise ValueError(f"{where}: the set of rates R is empty")
  return tuple(pairs)


def expand_rates(rates: Sequence[RateSpec]) -> Rates:
  """Expands the paper's shorthand for R (§4.2) into explicit ``(r1, r2)`` pairs.

  ``8`` means ``(8, 8)``; ``(12, 24)`` means ``(12, 24)`` followed by ``(24, 12)``; a square pair once.
  Order is kept: ``expand_rates([8, (12, 24), 16]) == ((8, 8), (12, 24), (24, 12), (16, 16))``.
  """
  if isinstance(rates, (int, np.integer)):
    rates = [rates]
  out = []
  for r in rates:
    a, b = _as_pair(r, "expand_rates")
    out.append((a, b))
    if a != b:
      out.append((b, a))
  return _check_unique(out, "expand_rates")


def explicit_rates(rates: Sequence[RateSpec]) -> Rates:
  """Validates explicit rate pairs (no expansion); a bare scalar ``s`` means ``(s, s)``."""
  if isinstance(rates, (int, np.integer)):
    rates = [rates]
  return _check_unique([_as_pair(r, "rates") for r in rates], "rates")


def neighbor_offsets(rates: Sequence[RateSpec]) -> tuple[tuple[int, int], ...]:
  """The ``(s, t)`` offsets of ``S_r(i, j)`` (Eq. 3) for every rate: 8 per rate, in the order of docs/conventions.md."""
  offsets = []
  for r1, r2 in explicit_rates(rates):
    for s in (-r1, 0, r1):
      for t in (-r2, 0, r2):
        if s or t:
          offsets.append((s, t))
  return tuple(offsets)


def neighbour_inside(size: tuple[int, int], offsets, heights=None, widths=None, xp=jnp):
  """Bool ``[H, W, K]`` (``[B, H, W, K]`` with per-example ``heights`` and ``widths``): the neighbour
  ``(i + s, j + t)`` of each of the ``K`` ``offsets`` lies inside the image, i.e. inside ``size`` or, when given,
  inside the example's real (unpadded) ``heights[b] x widths[b]``. ``xp``: ``jnp``, or ``np`` for a constant."""
  h, w = size
  s = xp.asarray([o[0] for o in offsets], xp.int32)
  t = xp.asarray([o[1] for o in offsets], xp.int32)
  rows = xp.arange(h)[:, None, None] + s
  cols = xp.arange(w)[None, :, None] + t
  if heights is None:
    return (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
  hb = xp.asarray(heights)[:, None, None, None]
  wb = xp.asarray(widths)[:, None, None, None]
  return (rows >= 0)[None] & (rows[None] < hb) & (cols >= 0)[None] & (cols[None] < wb)


def affinity_targets(
    labels: jax.Array, rates: Sequence[RateSpec], ignore_label: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
  """Dilated-affinity ground truth (Eq. 1) for every pixel and direction.

  Args:
    labels: int ``[B, H, W]`` class map.
    rates: explicit rate pairs.
    ignore_label: void label; any pair touching it is invalid.

  Returns:
    ``(targets, valid)``, both ``[B, H, W, 8·|R|]``: ``targets`` float32, 1 where the pair's labels are equal
    and the pair is valid, else 0; ``valid`` bool, true where the neighbour ``(i+s, j+t)`` lies inside the image
    and neither label is ``ignore_label``. Built with ``jnp.roll``; the border mask makes wrapped-around
    neighbours invalid (rates larger than the image give no valid pair).
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"affinity_targets: labels must be [B, H, W], got shape {labels.shape}")
  offsets = neighbor_offsets(rates)
  inside = neighbour_inside(labels.shape[1:], offsets)
  centre_ok = labels != ignore_label
  targets, valid = [], []
  for k, (s, t) in enumerate(offsets):
    nb = jnp.roll(labels, shift=(-s, -t), axis=(1, 2))  # nb[i, j] = labels[i + s, j + t] (wrapped)
    v = inside[None, :, :, k] & centre_ok & (nb != ignore_label)
    valid.append(v)
    targets.append(v & (nb == labels))
  valid = jnp.stack(valid, axis=-1)
  targets = jnp.stack(targets, axis=-1).astype(jnp.float32)
  return targets, valid


def neighbor_categories(
    targets: jax.Array, valid: jax.Array, num_rates: int, partial_neighbors: str = "rescale"
) -> jax.Array:
  """The category ``k`` of ``n_k`` (§3.2) per pixel and rate: how many of its 8 neighbours share its label.

  With ``v`` valid neighbours at a rate (inside the image, not void) of which ``q`` are positive:

  * ``"rescale"`` (default): ``k = round(8·q / v)`` (half to even). A neighbour outside the image or on void is
    unknown, not negative: the border band of a uniform region stays in n_8 instead of looking like a boundary.
  * ``"count"``: ``k = q``: unknown neighbours count as negatives (the literal reading of §3.2).

  Under both rules a pixel with ``v = 0`` at a rate (including every void pixel) has no category at that rate:
  it is marked ``-1`` and counts in neither the statistics nor the loss of that rate (it has no valid signal).
  Returns int32 ``[B, H, W, |R|]`` with values in ``-1..8``.
  """
  if partial_neighbors not in PARTIAL_NEIGHBORS:
    raise ValueError(
        f"neighbor_categories: partial_neighbors={partial_neighbors!r}; expected one of " f"{PARTIAL_NEIGHBORS}"
    )
  b, h, w, c = valid.shape
  if c != DIRECTIONS_PER_RATE * num_rates:
    raise ValueError(
        f"neighbor_categories: {c} channels but num_rates={num_rates} needs " f"{DIRECTIONS_PER_RATE * num_rates}"
    )
  shape5 = (b, h, w, num_rates, DIRECTIONS_PER_RATE)
  q = ((targets > 0.5) & valid).reshape(shape5).sum(-1, dtype=jnp.int32)
  v = valid.reshape(shape5).sum(-1, dtype=jnp.int32)
  return category_of_counts(q, v, partial_neighbors)


def category_of_counts(q: jax.Array, v: jax.Array, partial_neighbors: str) -> jax.Array:
  """The n_k category from ``q`` positive of ``v`` valid neighbours at a rate (:func:`neighbor_categories`'
  rules); ``-1`` where ``v = 0``."""
  if partial_neighbors == "rescale":
    k = jnp.round(DIRECTIONS_PER_RATE * q / jnp.maximum(v, 1)).astype(jnp.int32)
  else:
    k = q
  return jnp.where(v > 0, k, -1)


def focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 2.0) -> jax.Array:
  """Elementwise focal loss ``FL(p_t) = -(1 - p_t)^γ log p_t`` (Eq. 4) from logits.

  With ``z = logit`` for positive targets and ``-logit`` for negative ones, ``log p_t = log σ(z)`` and
  ``(1 - p_t)^γ = exp(γ · log σ(-z))``: finite values and gradients for logits of any magnitude.
  ``gamma = 0`` is plain binary cross-entropy.

  The gradient is written out (``dFL/dz = -(1 - p_t)^γ · (γ · p_t · (-log p_t) + 1 - p_t)``) and computed from the
  logits alone, so the backward pass keeps only the logits and the target signs: one elementwise pass instead of
  the several full-resolution intermediates automatic differentiation keeps (the affinity loss runs at the label
  resolution, 8·|R| channels).

  Equal to optax's ``sigmoid_focal_loss`` up to rounding (values and gradients, tested); written out because a
  training with optax's form differs in the last bits after a few steps.
  """
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bfloat16 -> float32, float64 kept
  return _focal(logits, jnp.asarray(targets) > 0.5, float(gamma))


def _focal_of_z(z: jax.Array, gamma: float) -> jax.Array:
  nll = -jax.nn.log_sigmoid(z)
  if gamma == 0:
    return nll
  return jnp.exp(gamma * jax.nn.log_sigmoid(-z)) * nll


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _focal(logits: jax.Array, positive: jax.Array, gamma: float) -> jax.Array:
  return _focal_of_z(jnp.where(positive, logits, -logits), gamma)


def _focal_fwd(logits, positive, gamma):
  return _focal(logits, positive, gamma), (logits, positive)


def _focal_bwd(gamma, residuals, g):
  logits, positive = residuals
  z = jnp.where(positive, logits, -logits)
  q = jax.nn.sigmoid(-z)  # 1 - p_t
  if gamma == 0:
    dz = -q
  else:
    dz = -jnp.exp(gamma * jax.nn.log_sigmoid(-z)) * (gamma * jax.nn.sigmoid(z) * -jax.nn.log_sigmoid(z) + q)
  return jnp.where(positive, dz, -dz) * g, None


_focal.defvjp(_focal_fwd, _focal_bwd)


def _cap(w: np.ndarray, max_weight: float | None) -> np.ndarray:
  return (w if max_weight is None else np.minimum(w, max_weight)).astype(np.float32)


def neighbor_weights(freq: np.ndarray, scheme: str, max_weight: float | None = None) -> np.ndarray:
  """Per-rate weights ``w_r(k)`` of the categories n_0..n_8 (Eq. 5, Table 1), shape ``[|R|, 9]``.

  ``neighbor``: ``freq(n_8, r) / freq(n_k, r)``; ``sqrt``: its square root (the paper's best); ``none``: 1.
  A category never seen in the statistics (``freq = 0``, weight undefined) gets the largest weight of the categories
  seen at that rate. ``max_weight`` (default: none) is an opt-in cap on every weight.
  """
  freq = np.asarray(freq, np.float64)
  if freq.ndim != 2 or freq.shape[1] != NUM_CATEGORIES:
    raise ValueError(f"neighbor_weights: freq must be [|R|, 9], got {freq.shape}")
  if scheme == "none":
    return np.ones_like(freq, np.float32)
  if scheme not in ("neighbor", "sqrt"):
    raise ValueError(
        f"neighbor_weights: scheme {scheme!r} has no per-category weights " f"(expected 'none', 'neighbor' or 'sqrt')"
    )
  if np.any(freq[:, 8] <= 0):
    bad = [i for i in range(freq.shape[0]) if freq[i, 8] <= 0]
    raise ValueError(
        f"neighbor_weights: freq(n_8, r) is 0 for rate index {bad}: the weights "
        "freq(n_8)/freq(n_k) are undefined (statistics from too small images for this rate?)"
    )
  seen = freq > 0
  w = np.where(seen, freq[:, 8:9] / np.where(seen, freq, 1.0), 0.0)
  w = np.where(seen, w, w.max(axis=1, keepdims=True))
  if scheme == "sqrt":
    w = np.sqrt(w)
  return _cap(w, max_weight)


def signal_weights(pos_freq: np.ndarray, max_weight: float | None = None) -> np.ndarray:
  """``signal`` scheme (Table 1): inverse frequency of the signal's own value, positives weigh 1.

  Returns ``[|R|, 2]`` with columns (negative, positive): ``(π_r / (1 - π_r), 1)``. A rate without negative signals
  (``π_r = 1``) gets negative weight 1 (there is nothing to weigh). ``max_weight`` is an opt-in cap.
  """
  pi = np.asarray(pos_freq, np.float64)
  neg = np.where(pi < 1.0, pi / np.where(pi < 1.0, 1.0 - pi, 1.0), 1.0)
  return _cap(np.stack([neg, np.ones_like(pi)], axis=-1), max_weight)


def direction_bits(
    labels: jax.Array, rates: Sequence[RateSpec], ignore_label: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
  """:func:`affinity_targets` packed one byte per pixel and rate: ``(positive, valid)``, uint8 ``[B, H, W, |R|]``,
  bit ``d`` of byte ``r`` holding channel ``8·r + d``.

  The neighbour of direction ``(s, t)`` is a static slice of the labels padded with ``ignore_label``: a neighbour
  outside the image reads void, so it is invalid exactly as under the roll and border mask. One pass over the
  labels per direction, and a ``[B, H, W, |R|]`` result a 32nd of the unpacked targets' size.
  """
  labels = jnp.asarray(labels)
  b, h, w = labels.shape
  offsets = neighbor_offsets(rates)
  pad = max(max(abs(s), abs(t)) for s, t in offsets)
  padded = jnp.pad(labels, ((0, 0), (pad, pad), (pad, pad)), constant_values=ignore_label)
  centre_ok = labels != ignore_label
  positive, valid = [], []
  for r in range(len(offsets) // DIRECTIONS_PER_RATE):
    pos_bits = val_bits = jnp.zeros((b, h, w), jnp.uint8)
    for d in range(DIRECTIONS_PER_RATE):
      s, t = offsets[DIRECTIONS_PER_RATE * r + d]
      nb = padded[:, pad + s : pad + s + h, pad + t : pad + t + w]
      v = centre_ok & (nb != ignore_label)
      val_bits = val_bits | (v.astype(jnp.uint8) << d)
      pos_bits = pos_bits | ((v & (nb == labels)).astype(jnp.uint8) << d)
    positive.append(pos_bits)
    valid.append(val_bits)
  return jnp.stack(positive, -1), jnp.stack(valid, -1)


def unpack_bits(bits: jax.Array) -> jax.Array:
  """Bool ``[B, H, W, 8·|R|]`` from :func:`direction_bits`' ``[B, H, W, |R|]`` bytes (channel ``8·r + d`` = bit ``d``
  of byte ``r``)."""
  d = jnp.arange(DIRECTIONS_PER_RATE, dtype=jnp.uint8)
  return (((bits[..., None] >> d) & 1) == 1).reshape(*bits.shape[:-1], bits.shape[-1] * DIRECTIONS_PER_RATE)


def _pixel_weights(positive, valid, stats, scheme: str, max_weight):
  """``(w_pos, w_neg)`` float32, broadcastable to ``[B, H, W, |R|]``: the weight of a positive and of a negative
  pair of each pixel and rate (Eq. 5, Table 1)."""
  num_rates = positive.shape[-1]
  if scheme == "none":
    one = jnp.ones((num_rates,), jnp.float32)
    return one, one
  if scheme == "signal":
    sw = signal_weights(stats.pos_freq, max_weight)  # [R, 2]: (negative, positive)
    return jnp.asarray(sw[:, 1]), jnp.asarray(sw[:, 0])
  table = neighbor_weights(stats.freq, scheme, max_weight)  # [R, 9]
  q = jax.lax.population_count(positive).astype(jnp.int32)
  v = jax.lax.population_count(valid).astype(jnp.int32)
  k = category_of_counts(q, v, stats.partial_neighbors)  # -1 (no valid pair) matches no category: weight 0
  w = sum(jnp.where(k == j, table[:, j], np.float32(0)) for j in range(NUM_CATEGORIES))
  return w, w


def _weighted_focal(logits, positive, valid, w_pos, w_neg, gamma: float):
  """Per channel: the weighted focal loss, its gradient with respect to the logits, and 1 where the logit's sign
  is right (all 0 on invalid pairs). One exp and one log1p per element: with ``z = ±logit`` (+ for a positive
  target), ``e = exp(-|z|)``, ``p_t = σ(z)`` and ``1 - p_t`` are ``1/(1+e)`` and ``e/(1+e)`` (in either order by
  the sign of ``z``), ``-log p_t = max(-z, 0) + log1p(e)``, ``FL = (1 - p_t)^γ · (-log p_t)`` (Eq. 4) and
  ``dFL/dz = -(1 - p_t)^γ · (γ · p_t · (-log p_t) + 1 - p_t)``: finite for logits of any magnitude."""
  pos = unpack_bits(positive)
  val = unpack_bits(valid)
  num_rates = positive.shape[-1]
  w = jnp.where(
      pos.reshape(*pos.shape[:-1], num_rates, DIRECTIONS_PER_RATE),
      jnp.asarray(w_pos)[..., None],
      jnp.asarray(w_neg)[..., None],
  ).reshape(pos.shape)
  z = jnp.where(pos, logits, -logits)
  e = jnp.exp(-jnp.abs(z))
  r = 1.0 / (1.0 + e)
  nonneg = z >= 0
  p_t = jnp.where(nonneg, r, e * r)
  q_t = jnp.where(nonneg, e * r, r)
  nll = jnp.maximum(-z, 0.0) + jnp.log1p(e)
  if gamma == 0:
    mod = jnp.ones_like(q_t)
  elif float(gamma).is_integer():
    mod = jax.lax.integer_pow(q_t, int(gamma))
  else:
    mod = jnp.exp(-gamma * (jnp.maximum(z, 0.0) + jnp.log1p(e)))  # (1 - p_t)^γ = exp(γ · log σ(-z))
  dz = -mod * (gamma * p_t * nll + q_t)
  correct = jnp.where(pos, z > 0, z >= 0)  # σ(logit) > 0.5 equals the target
  return (
      jnp.where(val, w * mod * nll, 0.0),
      jnp.where(val, w * jnp.where(pos, dz, -dz), 0.0),
      (val & correct).astype(jnp.int8),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _loss_terms(logits, positive, valid, w_pos, w_neg, gamma, upsample):
  return _loss_terms_fwd(logits, positive, valid, w_pos, w_neg, gamma, upsample)[0]


def _loss_terms_fwd(logits, positive, valid, w_pos, w_neg, gamma, upsample):
  """Loss and accuracy sums and the gradient with respect to ``logits``, one image at a time: the image's logits
  upsampled (``upsample``; None: already at the label size), its loss terms (:func:`_weighted_focal`), and the
  gradient pulled back through the upsampling. Only that low-resolution gradient is kept for the backward pass:
  the full-resolution buffers (logits, loss, gradient) exist for one image at a time."""
  size = positive.shape[1:3]
  weights = (w_pos, w_neg)  # for their shapes in the backward pass
  w_pos = jnp.broadcast_to(jnp.asarray(w_pos, jnp.float32), positive.shape)
  w_neg = jnp.broadcast_to(jnp.asarray(w_neg, jnp.float32), positive.shape)

  def one_image(args):
    x, *label_terms = (a[None] for a in args)
    z, pull_back = jax.vjp((lambda t: t) if upsample is None else (lambda t: upsample(t, size)), x)
    fl, dz, correct = fusion.computed_once(lambda *a: _weighted_focal(*a, gamma), z, *label_terms)
    (grad,) = pull_back(dz.astype(z.dtype))
    return jnp.sum(fl), jnp.sum(correct, dtype=jnp.int32), grad[0]

  totals, corrects, grads = jax.lax.map(one_image, (logits, positive, valid, w_pos, w_neg))
  return (jnp.sum(totals), jnp.sum(corrects)), (grads, *weights)


def _loss_terms_bwd(gamma, upsample, residuals, g):
  grads, w_pos, w_neg = residuals  # the weights come from the labels: no gradient flows to them
  return (grads * g[0]).astype(grads.dtype), None, None, jnp.zeros_like(w_pos), jnp.zeros_like(w_neg)


_loss_terms.defvjp(_loss_terms_fwd, _loss_terms_bwd)


def affinity_loss_terms(
    logits: jax.Array,
    labels: jax.Array,
    rates: Sequence[RateSpec],
    stats: "AffinityStats",
    scheme: str = "sqrt",
    gamma: float = 2.0,
    ignore_label: int = IGNORE_LABEL,
    max_weight: float | None = None,
    upsample: Callable[[jax.Array, tuple[int, int]], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(Σ_pixels Σ_r w_r(k) Σ_{c valid} FL, N, correct, valid)``: the numerator and denominator of
  :func:`affinity_loss` and the affinity accuracy's counts of :func:`affinity_accuracy_total`, in one pass.

  ``logits`` are at the label resolution, or, with ``upsample`` (a linear map ``(x, size) -> x at size``, e.g.
  DeepLab's bilinear upsampling of the stride-4 logits), at the network's resolution and upsampled here.

  The targets are packed one byte per pixel and rate (:func:`direction_bits`); the focal loss, its gradient and
  the accuracy come from one exp and one log1p per element, computed in the forward pass one image at a time
  (:func:`_loss_terms_fwd`): the backward pass keeps only the gradient at the logits' own resolution. Equal to
  the unpacked form (targets, categories, weight lookup, focal loss) up to float32 rounding of the sums (tested
  against brute-force loops and automatic differentiation).
  """
  rates = explicit_rates(rates)
  if tuple(map(tuple, stats.rates)) != rates:
    raise ValueError(
        f"affinity_loss: rates {list(rates)} differ from the statistics' rates {list(stats.rates)}"
        " (recompute the statistics for these rates)"
    )
  if scheme not in SCHEMES:
    raise ValueError(f"affinity_loss: unknown weighting scheme {scheme!r}; expected one of {SCHEMES}")
  num_rates = len(rates)
  same_size = logits.shape[:-1] == labels.shape or (upsample is not None and logits.shape[0] == labels.shape[0])
  if logits.shape[-1] != DIRECTIONS_PER_RATE * num_rates or not same_size:
    raise ValueError(
        f"affinity_loss: logits {logits.shape} do not match labels {labels.shape} and "
        f"{num_rates} rates (expected [..., {DIRECTIONS_PER_RATE * num_rates}])"
    )
  logits = jnp.asarray(logits)
  if upsample is None:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

  def label_side(labels):
    positive, valid = direction_bits(labels, rates, ignore_label)
    w_pos, w_neg = _pixel_weights(positive, valid, stats, scheme, max_weight)
    n_valid = jnp.sum(jax.lax.population_count(valid), dtype=jnp.int32)
    return positive, valid, w_pos, w_neg, n_valid, jnp.sum(labels != ignore_label)

  positive, valid, w_pos, w_neg, n_valid, n = fusion.computed_once(label_side, jnp.asarray(labels))
  gamma = 0.0 if scheme == "none" else float(gamma)
  total, correct = _loss_terms(logits, positive, valid, w_pos, w_neg, gamma, upsample)
  return total, n, correct, n_valid


def affinity_loss_sum(
    logits: jax.Array,
    labels: jax.Array,
    rates: Sequence[RateSpec],
    stats: "AffinityStats",
    scheme: str = "sqrt",
    gamma: float = 2.0,
    ignore_label: int = IGNORE_LABEL,
    max_weight: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Numerator and denominator of :func:`affinity_loss`: ``(Σ_pixels Σ_r w_r(k) Σ_c valid·FL, N)``
  (:func:`affinity_loss_terms` without the accuracy).

  Data-parallel training sums both over devices before dividing, so the loss of a sharded batch equals the
  loss of the whole batch.
  """
  total, n, _, _ = affinity_loss_terms(logits, labels, rates, stats, scheme, gamma, ignore_label, max_weight)
  return total, n


def affinity_loss(
    logits: jax.Array,
    labels: jax.Array,
    rates: Sequence[RateSpec],
    stats: "AffinityStats",
    scheme: str = "sqrt",
    gamma: float = 2.0,
    ignore_label: int = IGNORE_LABEL,
    max_weight: float | None = None,
) -> jax.Array:
  """The affinity loss ``L_aff`` (Eq. 5 without β), a scalar.

  ``L_aff = (1/N) Σ_pixels Σ_r w_r(k) Σ_{c in rate r, valid} FL``, with ``N`` the number of non-ignored centre
  pixels in the batch and ``k`` the pixel's n_k category for rate ``r``. The caller multiplies by β.

  Args:
    logits: ``[B, H, W, 8·|R|]`` affinity logits at the label resolution (upsample first).
    labels: int ``[B, H, W]``.
    rates: explicit rate pairs; must equal ``stats.rates``.
    stats: :class:`dilaff_jax.stats.AffinityStats` holding ``freq(n_k, r)`` and ``π_r``.
    scheme: ``none`` (equal weights and plain cross-entropy: γ is forced to 0, Table 1's baseline),
      ``signal`` (negatives weigh ``π_r/(1-π_r)``, positives 1), ``neighbor`` (``freq(n_8,r)/freq(n_k,r)``)
      or ``sqrt`` (its square root, the default).
    gamma: focal-loss focusing parameter γ for the schemes other than ``none``.
    ignore_label: void label.
    max_weight: opt-in cap on every weight (``None``: no cap; unseen categories get the rate's largest weight).
  """
  total, n = affinity_loss_sum(logits, labels, rates, stats, scheme, gamma, ignore_label, max_weight)
  return total / jnp.maximum(n, 1).astype(total.dtype)


def prior_bias(pos_freq: Sequence[float], eps: float = 1e-4) -> np.ndarray:
  """Initial bias of the affinity layer (§4.1, the focal-loss prior init): ``σ(b_r) = π_r``.

  ``b_r = log(π_r / (1 - π_r))``, repeated over the 8 channels of each rate: a float32 vector of length
  ``8·|R|``. The paper prints ``-log(π_r / (1 - π_r))``, which would give ``σ(b_r) = 1 - π_r``: a sign slip
  (docs/conventions.md). ``π_r`` is clipped to ``[eps, 1 - eps]`` to keep the bias finite.
  """
  pi = np.clip(np.asarray(pos_freq, np.float64), eps, 1.0 - eps)
  if pi.ndim != 1 or pi.size == 0:
    raise ValueError(f"prior_bias: pos_freq must be a non-empty vector, got shape {pi.shape}")
  b = np.log(pi / (1.0 - pi))
  return np.repeat(b, DIRECTIONS_PER_RATE).astype(np.float32)


def affinity_accuracy_counts(
    logits: jax.Array,
    labels: jax.Array,
    rates: Sequence[RateSpec],
    ignore_label: int = IGNORE_LABEL,
    partial_neighbors: str = "rescale",
) -> tuple[jax.Array, jax.Array]:
  """Correct and total valid signals per rate and neighbour category (Fig. 4).

  A signal is correct when ``σ(logit) > 0.5`` equals its target. Returns two int32 arrays ``[|R|, 9]``:
  correct signals and valid signals, grouped by the centre pixel's n_k category for that rate
  (:func:`neighbor_categories` with ``partial_neighbors``).
  """
  rates = explicit_rates(rates)
  num_rates = len(rates)
  targets, valid = affinity_targets(labels, rates, ignore_label)
  k = neighbor_categories(targets, valid, num_rates, partial_neighbors)  # [B,H,W,R], -1: no valid neighbour
  b, h, w, _ = targets.shape
  shape5 = (b, h, w, num_rates, DIRECTIONS_PER_RATE)
  correct = ((logits > 0) == (targets > 0.5)) & valid
  correct = correct.reshape(shape5).sum(-1, dtype=jnp.int32)
  total = valid.reshape(shape5).sum(-1, dtype=jnp.int32)
  onehot = jax.nn.one_hot(k, NUM_CATEGORIES, dtype=jnp.int32)  # [B,H,W,R,9]; all zero for k = -1
  return (jnp.einsum("bhwr,bhwrk->rk", correct, onehot), jnp.einsum("bhwr,bhwrk->rk", total, onehot))


def affinity_accuracy_total(
    logits: jax.Array, labels: jax.Array, rates: Sequence[RateSpec], ignore_label: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
  """Correct and total valid signals over all rates and categories: the sums of :func:`affinity_accuracy_counts`
  (int32 scalars), without grouping by n_k. The training step logs only this total, so it skips the categories."""
  targets, valid = affinity_targets(labels, explicit_rates(rates), ignore_label)
  correct = ((logits > 0) == (targets > 0.5)) & valid
  return correct.sum(dtype=jnp.int32), valid.sum(dtype=jnp.int32)


def rate_label(rate: tuple[int, int]) -> str:
  """``8`` for (8, 8), ``12x24`` for (12, 24): names for tables and plots."""
  return str(rate[0]) if rate[0] == rate[1] else f"{rate[0]}x{rate[1]}"


def parse_rates(text: str) -> Rates:
  """Parses ``"8,12x24,16"`` (shorthand, as in the paper) into explicit pairs via :func:`expand_rates`."""
  specs: list[RateSpec] = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    try:
      if "x" in part:
        a, b = part.split("x")
        specs.append((int(a), int(b)))
      else:
        specs.append(int(part))
    except ValueError:
      raise ValueError(f"cannot parse rate {part!r} in {text!r} (use e.g. '8,12x24,16')") from None
  return expand_rates(specs)
