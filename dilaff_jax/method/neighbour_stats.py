"""Neighbour-category statistics of a label set (§3.2, Fig. 3): ``freq(n_k, r)`` and ``π_r``.

``freq(n_k, r)`` is the share of the pixels with at least one valid neighbour at rate ``r`` whose neighbour
category is ``k`` (counted with the rule ``partial_neighbors``, see :func:`affinity.neighbor_categories`); ``π_r``
the share of valid signals at rate ``r`` that are positive. Both come from integer counts
accumulated one label map at a time (memory independent of the dataset size), so partial results merge exactly.
:class:`AffinityStats` also reads and writes its JSON file (the one file format of this folder).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax import errors
from dilaff_jax.method import affinity
from dilaff_jax.method.conventions import IGNORE_LABEL
from dilaff_jax.process import files

FORMAT_VERSION = 2  # 2: records the n_k rule (partial_neighbors); version 1 files were counted with "count" and
# put pixels without valid neighbours into n_0


class StatsError(errors.UserError, ValueError):
  """Statistics that cannot serve the requested rates or scheme (a file for other rates, images too small for a
  rate, a bad ``--rates``); the message names the rate and what to do."""


@dataclasses.dataclass(frozen=True)
class StatsCounts:
  """Raw integer counts behind :class:`AffinityStats` (exactly mergeable)."""

  category: np.ndarray  # int64 [|R|, 9]: centre pixels per n_k
  positive: np.ndarray  # int64 [|R|]: valid positive signals
  valid: np.ndarray  # int64 [|R|]: valid signals
  images: int = 0

  def __add__(self, other: "StatsCounts") -> "StatsCounts":
    return StatsCounts(
        self.category + other.category,
        self.positive + other.positive,
        self.valid + other.valid,
        self.images + other.images,
    )

  @classmethod
  def zeros(cls, num_rates: int) -> "StatsCounts":
    return cls(
        np.zeros((num_rates, affinity.NUM_CATEGORIES), np.int64),
        np.zeros(num_rates, np.int64),
        np.zeros(num_rates, np.int64),
        0,
    )


@dataclasses.dataclass(frozen=True)
class AffinityStats:
  """``freq(n_k, r)`` (``freq [|R|, 9]``, rows sum to 1) and ``π_r`` (``pos_freq [|R|]``) for explicit rates,
  with the n_k rule they were counted with (``partial_neighbors``)."""

  rates: affinity.Rates
  freq: np.ndarray
  pos_freq: np.ndarray
  counts: StatsCounts | None = None
  source: str = ""
  partial_neighbors: str = "rescale"

  def __post_init__(self):
    rates = affinity.explicit_rates(self.rates)
    freq = np.asarray(self.freq, np.float64)
    pos = np.asarray(self.pos_freq, np.float64)
    if freq.shape != (len(rates), affinity.NUM_CATEGORIES):
      raise ValueError(f"AffinityStats: freq has shape {freq.shape}, expected ({len(rates)}, 9) for rates {rates}")
    if pos.shape != (len(rates),):
      raise ValueError(f"AffinityStats: pos_freq has shape {pos.shape}, expected ({len(rates)},)")
    if not (
        np.all(np.isfinite(freq)) and np.all(freq >= 0) and np.all(np.isfinite(pos)) and np.all((pos >= 0) & (pos <= 1))
    ):
      raise ValueError("AffinityStats: freq and pos_freq must be finite shares in [0, 1]")
    if self.partial_neighbors not in affinity.PARTIAL_NEIGHBORS:
      raise ValueError(
          f"AffinityStats: partial_neighbors={self.partial_neighbors!r}, expected one of "
          f"{affinity.PARTIAL_NEIGHBORS}"
      )
    object.__setattr__(self, "rates", rates)
    object.__setattr__(self, "freq", freq)
    object.__setattr__(self, "pos_freq", pos)

  @classmethod
  def from_counts(
      cls, rates: Sequence, counts: StatsCounts, source: str = "", partial_neighbors: str = "rescale"
  ) -> "AffinityStats":
    rates = affinity.explicit_rates(rates)
    pixels = counts.category.sum(axis=1, keepdims=True)
    if np.any(pixels == 0) or np.any(counts.valid == 0):
      empty = [affinity.rate_label(r) for r, p, v in zip(rates, pixels[:, 0], counts.valid) if p == 0 or v == 0]
      raise StatsError(
          f"AffinityStats: no labelled pixel has a valid neighbour at rate(s) {', '.join(empty)} in "
          f"{counts.images} label map(s): cannot compute shares (the label maps are too small for these "
          "rates, or all void?)"
      )
    return cls(rates, counts.category / pixels, counts.positive / counts.valid, counts, source, partial_neighbors)

  def select(self, rates: Sequence) -> "AffinityStats":
    """The statistics of a subset of the rates (in the given order)."""
    rates = affinity.explicit_rates(rates)
    missing = [r for r in rates if r not in self.rates]
    if missing:
      raise ValueError(f"AffinityStats: rates {missing} are not in the statistics ({list(self.rates)})")
    idx = [self.rates.index(r) for r in rates]
    counts = None
    if self.counts is not None:
      c = self.counts
      counts = StatsCounts(c.category[idx], c.positive[idx], c.valid[idx], c.images)
    return AffinityStats(rates, self.freq[idx], self.pos_freq[idx], counts, self.source, self.partial_neighbors)

  def to_json(self) -> dict:
    out = {
        "format_version": FORMAT_VERSION,
        "source": self.source,
        "partial_neighbors": self.partial_neighbors,
        "rates": [list(r) for r in self.rates],
        "freq": self.freq.tolist(),
        "pos_freq": self.pos_freq.tolist(),
    }
    if self.counts is not None:
      out["counts"] = {
          "category": self.counts.category.tolist(),
          "positive": self.counts.positive.tolist(),
          "valid": self.counts.valid.tolist(),
          "images": self.counts.images,
      }
    return out

  @classmethod
  def from_json(cls, data: dict) -> "AffinityStats":
    if data.get("format_version") != FORMAT_VERSION:
      raise ValueError(
          f"AffinityStats: unsupported format_version {data.get('format_version')!r} (this version "
          f"reads {FORMAT_VERSION}); recompute the statistics with `python -m dilaff_jax.research.stats`, or "
          "delete the file to let training recompute it"
      )
    counts = None
    if "counts" in data:
      c = data["counts"]
      counts = StatsCounts(
          np.asarray(c["category"], np.int64),
          np.asarray(c["positive"], np.int64),
          np.asarray(c["valid"], np.int64),
          int(c["images"]),
      )
    return cls(
        tuple(tuple(r) for r in data["rates"]),
        np.asarray(data["freq"]),
        np.asarray(data["pos_freq"]),
        counts,
        data.get("source", ""),
        data["partial_neighbors"],
    )

  def save(self, path: str) -> None:
    """Writes JSON atomically (temporary file + rename); a full disk is one named error."""
    files.write_atomic(path, json.dumps(self.to_json(), indent=1))

  @classmethod
  def load(cls, path: str) -> "AffinityStats":
    try:
      with open(path) as f:
        data = json.load(f)
    except FileNotFoundError:
      raise errors.MissingFileError(
          f"affinity statistics file {path!r} does not exist; create it with "
          "`python -m dilaff_jax.research.stats` or let training compute it"
      ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise StatsError(f"affinity statistics file {path!r} is not valid JSON: {e}") from None
    return cls.from_json(data)


def check_weights_defined(stats: AffinityStats, scheme: str, largest: tuple[int, int] | None = None) -> None:
  """Raises :class:`StatsError` (before any jit) when ``scheme``'s per-category weights of Eq. 5 are undefined:
  ``neighbor``/``sqrt`` divide by ``freq(n_8, r)``, which is 0 when no labelled pixel has all 8 neighbours at rate
  ``r`` in its own class, as in label maps not larger than ``2·r + 1`` pixels. ``largest``: the largest label map
  ``(height, width)`` the statistics were computed from, when known, for the message."""
  if scheme not in ("neighbor", "sqrt"):
    return
  for rate, f in zip(stats.rates, stats.freq):
    if f[8] <= 0:
      r1, r2 = rate
      seen = f", the largest label map is {largest[0]}x{largest[1]}" if largest else ""
      raise StatsError(
          f"freq(n_8, r) is 0 at rate {affinity.rate_label(rate)} in the statistics of {stats.source or 'the labels'}"
          f": the {scheme!r} weights (Eq. 5) are undefined. A pixel has 8 neighbours at this rate only in label maps "
          f"larger than {2 * r1 + 1}x{2 * r2 + 1} pixels{seen}: use smaller rates, larger images, or "
          "affinity.scheme='none'/'signal'"
      )


def compute_usable_stats(
    label_maps: Iterable[np.ndarray],
    rates: Sequence,
    ignore_label: int = IGNORE_LABEL,
    source: str = "",
    scheme: str = "none",
    **kwargs,
) -> AffinityStats:
  """:func:`compute_stats` (``kwargs`` passed on), then :func:`check_weights_defined` for ``scheme``; a rate too
  large for the label maps raises :class:`StatsError` naming the rate and the largest label map, before any jit
  of the training step."""
  largest = [0, 0]

  def tracked() -> Iterator[np.ndarray]:
    for label in label_maps:
      largest[:] = max(largest[0], int(np.shape(label)[0])), max(largest[1], int(np.shape(label)[1]))
      yield label

  try:
    stats = compute_stats(tracked(), rates, ignore_label, source, **kwargs)
  except StatsError as e:
    raise StatsError(f"{e}; the largest label map is {largest[0]}x{largest[1]}") from None
  check_weights_defined(stats, scheme, tuple(largest))
  return stats


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _map_counts(labels: jax.Array, rates: affinity.Rates, ignore_label: int, partial_neighbors: str):
  targets, valid = affinity.affinity_targets(labels[None], rates, ignore_label)
  k = affinity.neighbor_categories(targets, valid, len(rates), partial_neighbors)[0]  # [H, W, R]; -1: none
  onehot = jax.nn.one_hot(k, affinity.NUM_CATEGORIES, dtype=jnp.int32)  # all zero where k = -1 (void included)
  nr = len(rates)
  category = onehot.sum((0, 1))
  positive = targets[0].reshape(*labels.shape, nr, 8).sum((0, 1, 3)).astype(jnp.int32)
  nvalid = valid[0].reshape(*labels.shape, nr, 8).sum((0, 1, 3), dtype=jnp.int32)
  return category, positive, nvalid


def _pad_to_multiple(label: np.ndarray, multiple: int, ignore_label: int) -> np.ndarray:
  """Pads with the ignore label: padded pixels are not counted and make no neighbour valid, so counts
  are unchanged while the number of distinct shapes (and compilations) stays small."""
  h, w = label.shape
  ph, pw = -h % multiple, -w % multiple
  if ph or pw:
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_label)
  return label


def map_counts(
    label: np.ndarray,
    rates: Sequence,
    ignore_label: int = IGNORE_LABEL,
    pad_multiple: int = 32,
    partial_neighbors: str = "rescale",
) -> StatsCounts:
  """Counts of one ``[H, W]`` label map (jit'd; shapes padded to ``pad_multiple`` to bound recompiles)."""
  label = np.asarray(label)
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  if label.ndim != 2:
    raise ValueError(f"map_counts: a label map must be [H, W] (or [H, W, 1]), got shape {label.shape}")
  if pad_multiple > 1:
    label = _pad_to_multiple(label, pad_multiple, ignore_label)
  cat, pos, val = jax.device_get(
      _map_counts(jnp.asarray(label, jnp.int32), affinity.explicit_rates(rates), int(ignore_label), partial_neighbors)
  )
  return StatsCounts(cat.astype(np.int64), pos.astype(np.int64), val.astype(np.int64), 1)


def compute_stats(
    label_maps: Iterable[np.ndarray],
    rates: Sequence,
    ignore_label: int = IGNORE_LABEL,
    source: str = "",
    log_every: int = 0,
    total: int | None = None,
    pad_multiple: int = 32,
    partial_neighbors: str = "rescale",
) -> AffinityStats:
  """Streams over label maps (any sizes) and returns their :class:`AffinityStats`.

  Memory does not grow with the number of maps. With ``log_every > 0`` prints progress (and an ETA when
  ``total`` is known).
  """
  rates = affinity.explicit_rates(rates)
  counts = StatsCounts.zeros(len(rates))
  start = time.time()
  for i, label in enumerate(label_maps, 1):
    counts = counts + map_counts(label, rates, ignore_label, pad_multiple, partial_neighbors)
    if log_every and i % log_every == 0:
      rate = i / max(time.time() - start, 1e-9)
      eta = f", ETA {(total - i) / rate:.0f}s" if total else ""
      print(f"[stats] {i}{'/' + str(total) if total else ''} label maps, {rate:.1f}/s{eta}", flush=True)
  if counts.images == 0:
    raise ValueError("compute_stats: no label maps were given")
  return AffinityStats.from_counts(rates, counts, source, partial_neighbors)


def weight_table(stats: AffinityStats, scheme: str, max_weight: float | None = None) -> str:
  """The reweighting factors of Eq. 5 per rate, as text for the start-up log: ``w_r(n_0..n_8)`` for the
  ``neighbor``/``sqrt``/``none`` schemes, the (negative, positive) weights for ``signal``."""
  lines = [
      f"affinity weights ({scheme}, n_k rule {stats.partial_neighbors!r}"
      + (f", capped at {max_weight:g}" if max_weight is not None else ", no cap")
      + "):"
  ]
  if scheme == "signal":
    w = affinity.signal_weights(stats.pos_freq, max_weight)
    lines += [
        f"  rate {affinity.rate_label(r):>6}: negative {row[0]:.4g}, positive {row[1]:.4g}"
        for r, row in zip(stats.rates, w)
    ]
  else:
    w = affinity.neighbor_weights(stats.freq, scheme, max_weight)
    lines.append(f"  {'rate':>11}  " + " ".join(f"{'n' + str(k):>8}" for k in range(affinity.NUM_CATEGORIES)))
    lines += [
        f"  rate {affinity.rate_label(r):>6}: " + " ".join(f"{v:8.3g}" for v in row) for r, row in zip(stats.rates, w)
    ]
  return "\n".join(lines)
