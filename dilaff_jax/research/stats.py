"""The n_k statistics of a dataset's labels from the command line (§3.2, Fig. 3): writes the JSON that training
loads, and a Fig. 3-style PNG::

  python -m dilaff_jax.research.stats --dataset=synthetic_shapes/default --split=train \\
      --rates=8,12x24,16 --output=stats.json --plot=fig3.png
"""

from __future__ import annotations

import os
import sys

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from dilaff_jax import errors  # noqa: E402
from dilaff_jax.engine import visualize  # noqa: E402
from dilaff_jax.engine.affinity_stats import tfds_label_maps  # noqa: E402
from dilaff_jax.method import affinity  # noqa: E402
from dilaff_jax.method.conventions import IGNORE_LABEL  # noqa: E402
from dilaff_jax.method.neighbour_stats import AffinityStats, StatsError, compute_usable_stats  # noqa: E402
from dilaff_jax.process import cli  # noqa: E402


def plot_category_shares(stats: AffinityStats, path: str, title: str = "") -> None:
  """Fig. 3-style PNG: share (%) of n_0..n_8 among labelled pixels against the rate."""
  plt = visualize.pyplot()

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


def _parse_rates(text: str, flag: str) -> affinity.Rates:
  try:
    return affinity.parse_rates(text)
  except ValueError as e:
    raise StatsError(f"{flag}={text}: {e}") from None


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
      "dilaff_jax.research.stats",
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
