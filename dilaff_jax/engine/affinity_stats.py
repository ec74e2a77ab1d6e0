"""The n_k statistics a training needs: read from a prepared dataset's labels, or loaded from (and written to) the
workdir's ``affinity_stats.json``."""

from __future__ import annotations

import os

import jax

from absl import logging

from dilaff_jax import errors
from dilaff_jax.engine import config_checks
from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.method.neighbour_stats import AffinityStats, check_weights_defined, compute_usable_stats
from dilaff_jax.process import multihost


def tfds_label_maps(name: str, split: str, data_dir: str | None = None, max_images: int = 0):
  """``(iterator of [H, W] uint8 label maps, count)`` from a prepared TFDS dataset with a ``label`` feature."""
  import tensorflow_datasets as tfds
  from dilaff_jax import datasets  # registers the project's builders
  from dilaff_jax.datasets import tfdata

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
  ds = tfdata.without_autotune(ds.map(lambda ex: ex["label"][..., 0]))
  return ds.as_numpy_iterator(), total


def load_or_compute(spec: RunSpec, workdir: str) -> AffinityStats:
  """``freq(n_k, r)`` and ``π_r`` for ``spec.rates``: from ``affinity.stats_path`` if set, else from
  ``<workdir>/affinity_stats.json``, computing and writing that file from the training labels when missing.
  Statistics that leave ``affinity.scheme``'s weights undefined (a rate too large for the images) raise a
  :class:`StatsError` here, before anything is compiled."""
  config, rates = spec.config, spec.rates
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
          f"config.affinity.stats_path = {path!r}: {e}; recompute with " "`python -m dilaff_jax.research.stats`"
      ) from None
    if s.partial_neighbors != rule:
      raise config_checks.ConfigError(
          f"config.affinity.partial_neighbors = {rule!r}, but the statistics in {path!r} were counted with "
          f"{s.partial_neighbors!r}: recompute them with `python -m dilaff_jax.research.stats --partial_neighbors={rule}` "
          "(or delete the workdir's file to let training recompute it)"
      )
    logging.info("Affinity statistics from %s (%s)", path, s.source)
    check_weights_defined(s, config.affinity.scheme)
    return s
  from dilaff_jax import datasets  # TensorFlow Datasets: only when the statistics are computed here

  d = config.dataset
  name, data_dir = datasets.location(
      d.name,
      data_dir=d.get("data_dir"),
      manual_dir=d.get("manual_dir"),
      num_classes=d.num_classes,
      foreground_255=bool(d.get("foreground_255", False)),
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
