"""Neighbour-category statistics of a label set (§3.2, Fig. 3): ``freq(n_k, r)`` and ``π_r``.

``freq(n_k, r)`` is the share of the pixels with at least one valid neighbour at rate ``r`` whose neighbour
category is ``k`` (counted with the rule ``partial_neighbors``, see :func:`affinity.neighbor_categories`); ``π_r``
the share of valid signals at rate ``r`` that are positive. Both come from integer counts
accumulated one label map at a time (memory independent of the dataset size), so partial results merge exactly.

Command line (writes the JSON that training loads, and a Fig. 3-style PNG)::

  python -m dilaff_jax.stats --dataset=synthetic_shapes/default --split=train \
      --rates=8,12x24,16 --output=stats.json --plot=fig3.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

from dilaff_jax import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from dilaff_jax import affinity, cli, config_checks, errors, multihost  # noqa: E402
from dilaff_jax.conventions import IGNORE_LABEL  # noqa: E402

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
          f"reads {FORMAT_VERSION}); recompute the statistics with `python -m dilaff_jax.stats`, or "
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
    """Writes JSON atomically (temporary file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=1)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "AffinityStats":
    try:
      with open(path) as f:
        data = json.load(f)
    except FileNotFoundError:
      raise errors.MissingFileError(
          f"affinity statistics file {path!r} does not exist; create it with "
          "`python -m dilaff_jax.stats` or let training compute it"
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


def plot_category_shares(stats: AffinityStats, path: str, title: str = "") -> None:
  """Fig. 3-style PNG: share (%) of n_0..n_8 among labelled pixels against the rate."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x = np.arange(len(stats.rates))
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  cmap = plt.get_cmap("viridis")
  for k in range(affinity.NUM_CATEGORIES):
    ax.plot(x, 100 * stats.freq[:, k], marker="o", color=cmap(k / 8), label=f"$n_{k}$")
  ax.set_xticks(x, [affinity.rate_label(r) for r in stats.rates])
  ax.set_xlabel("rate r")
  ax.set_ylabel("share of labelled pixels (%)")
  ax.set_title(title or f"Neighbour categories against rate ({stats.source or 'labels'})")
  ax.grid(alpha=0.3)
  ax.legend(ncol=3, fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def tfds_label_maps(name: str, split: str, data_dir: str | None = None, max_images: int = 0):
  """``(iterator of [H, W] uint8 label maps, count)`` from a prepared TFDS dataset with a ``label`` feature."""
  import tensorflow_datasets as tfds
  from dilaff_jax import datasets  # registers the project's builders

  datasets.dataset_class_names(name)  # an unknown name lists this project's datasets
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise errors.MissingFileError(
        f"dataset {name!r} is not prepared in data_dir={builder.data_dir!r}; prepare it "
        "first (python -m dilaff_jax.datasets.prepare, see README, 'Data')"
    )
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise errors.UserError(f"split {split!r} of {name}: {e} (splits: {', '.join(builder.info.splits)})") from None
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if max_images:
    ds = ds.take(max_images)
    total = min(total, max_images)
  ds = ds.map(lambda ex: ex["label"][..., 0])
  return ds.as_numpy_iterator(), total


def _parse_rates(text: str, flag: str) -> affinity.Rates:
  try:
    return affinity.parse_rates(text)
  except ValueError as e:
    raise StatsError(f"{flag}={text}: {e}") from None


# ----------------------------------------------------------------------------------------------- for training


def load_or_compute(config, workdir: str, rates: affinity.Rates) -> AffinityStats:
  """``freq(n_k, r)`` and ``π_r`` for ``rates``: from ``affinity.stats_path`` if set, else from
  ``<workdir>/affinity_stats.json``, computing and writing that file from the training labels when missing.
  Statistics that leave ``affinity.scheme``'s weights undefined (a rate too large for the images) raise a
  :class:`StatsError` here, before anything is compiled."""
  path = config.affinity.stats_path or os.path.join(workdir, "affinity_stats.json")
  rule = config.affinity.partial_neighbors
  multihost.barrier("before affinity statistics")  # every process sees the same file state below
  compute = not os.path.exists(path) and not config.affinity.stats_path  # the same on every process
  if compute and jax.process_index() > 0:  # process 0 computes and writes the file; the others wait for it
    multihost.barrier("affinity statistics written")
  if not compute or jax.process_index() > 0:
    try:
      s = AffinityStats.load(path).select(rates)
    except (ValueError, KeyError) as e:
      raise config_checks.ConfigError(
          f"config.affinity.stats_path = {path!r}: {e}; recompute with " "`python -m dilaff_jax.stats`"
      ) from None
    if s.partial_neighbors != rule:
      raise config_checks.ConfigError(
          f"config.affinity.partial_neighbors = {rule!r}, but the statistics in {path!r} were counted with "
          f"{s.partial_neighbors!r}: recompute them with `python -m dilaff_jax.stats --partial_neighbors={rule}` "
          "(or delete the workdir's file to let training recompute it)"
      )
    logging.info("Affinity statistics from %s (%s)", path, s.source)
    check_weights_defined(s, config.affinity.scheme)
    return s
  from dilaff_jax import datasets  # TensorFlow Datasets: only when the statistics are computed here

  d = config.dataset
  name, data_dir = datasets.location(
      d.name, data_dir=d.get("data_dir"), manual_dir=d.get("manual_dir"), num_classes=d.num_classes
  )
  maps, total = tfds_label_maps(name, d.train_split, data_dir, config.affinity.stats_max_images)
  logging.info("Computing affinity statistics over %d training label maps (once; saved to %s)", total, path)
  s = compute_usable_stats(
      maps,
      rates,
      d.ignore_label,
      f"{d.name}:{d.train_split}",
      scheme=config.affinity.scheme,
      log_every=max(total // 10, 1),
      total=total,
      partial_neighbors=rule,
  )
  s.save(path)
  multihost.barrier("affinity statistics written")
  return s


def main(argv=None) -> int:
  """Command line entry; returns the exit status (2 for a bad flag or dataset, with one ``error:`` line)."""
  try:
    _main(argv)
  except errors.UserError as e:
    if cli.wants_traceback():
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR
  return 0


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("dataset", None, "TFDS name, e.g. synthetic_shapes/default or voc2012_aug", flag_values=fv)
  flags.DEFINE_string("split", "train", "split to count", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir", flag_values=fv)
  flags.DEFINE_string("rates", "8,12x24,16", "paper shorthand, e.g. '8,12x24,16' (12x24 adds 24x12)", flag_values=fv)
  flags.DEFINE_string("plot_rates", "2,4,8,16,32,64", "rates for the Fig. 3 PNG", flag_values=fv)
  flags.DEFINE_integer("ignore_label", IGNORE_LABEL, "label of void pixels", flag_values=fv)
  flags.DEFINE_enum(
      "partial_neighbors",
      "rescale",
      affinity.PARTIAL_NEIGHBORS,
      "n_k rule for pixels with invalid neighbours (must match affinity.partial_neighbors)",
      flag_values=fv,
  )
  flags.DEFINE_integer("max_images", 0, "0 = the whole split", flag_values=fv)
  flags.DEFINE_string("output", None, "JSON file for the configured rates", flag_values=fv)
  flags.DEFINE_string("plot", "", "PNG path for the Fig. 3-style plot (optional)", flag_values=fv)


def _main(argv) -> None:
  args = cli.parse_flags(
      _define_flags,
      sys.argv[1:] if argv is None else list(argv),
      "dilaff_jax.stats",
      __doc__,
      required=("dataset", "output"),
  )
  if args is None:  # --help
    return
  rates = _parse_rates(args.rates, "--rates")
  plot_rates = _parse_rates(args.plot_rates, "--plot_rates") if args.plot else ()
  if args.max_images < 0:
    raise errors.UserError(f"--max_images={args.max_images}: expected 0 (the whole split) or a positive count")
  if not 0 <= args.ignore_label <= 255:
    raise errors.UserError(f"--ignore_label={args.ignore_label}: expected a value in [0, 255]")
  all_rates = tuple(dict.fromkeys(rates + plot_rates))
  maps, total = tfds_label_maps(args.dataset, args.split, args.data_dir, args.max_images)
  source = f"{args.dataset}:{args.split}"
  stats = compute_usable_stats(
      maps, all_rates, args.ignore_label, source, log_every=100, total=total, partial_neighbors=args.partial_neighbors
  )
  stats.select(rates).save(args.output)
  print(f"[stats] wrote {args.output}")
  for r, f, pi in zip(rates, stats.select(rates).freq, stats.select(rates).pos_freq):
    shares = " ".join(f"{100 * v:5.1f}" for v in f)
    print(f"  rate {affinity.rate_label(r):>6}: pi={pi:.3f}  n0..n8 (%): {shares}")
  if args.plot:
    plot_category_shares(stats.select(plot_rates), args.plot, f"Neighbour categories, {source}")
    print(f"[stats] wrote {args.plot}")


if __name__ == "__main__":
  sys.exit(main())
