"""Pixels per class and split of a prepared dataset, saved beside it as ``class_pixels.json``, and the warnings
they call for: an evaluation split of fewer than ``MIN_EVAL_IMAGES`` images, a class without a pixel in one.

The file is counted once from the prepared copy (every label of every split; images are not decoded) and read back
afterwards; a data_dir that cannot be written gets the counts without the file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from dilaff_jax.datasets import common, tfdata
from dilaff_jax.method import conventions
from dilaff_jax.process import files

FILENAME = "class_pixels.json"
TRAINING_SPLITS = ("train", "train_aug")  # the builders' training splits; every other labelled one is evaluated
UNLABELED_SPLITS = ("unlabeled",)  # image_folder's images without masks: all void, never scored


def count_split(builder: tfds.core.DatasetBuilder, split: str, num_classes: int) -> dict:
  """``{"images": N, "pixels": [per class], "void_pixels": N}`` of one prepared split; any other value is
  :class:`common.DataError` (the builders refuse them while preparing, so it means a damaged copy)."""
  totals = np.zeros(256, np.int64)
  images = 0
  dataset = tfdata.without_autotune(builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()}))
  for example in dataset.as_numpy_iterator():
    totals += np.bincount(example["label"].reshape(-1), minlength=256)
    images += 1
  other = [v for v in np.flatnonzero(totals) if v >= num_classes and v != common.IGNORE_LABEL]
  if other:
    raise common.DataError(
        f"the prepared split {split!r} of {builder.info.full_name} ({builder.data_dir}) holds label values "
        f"{[int(v) for v in other]} outside the {num_classes} classes and 255: delete that folder and prepare again"
    )
  return {
      "images": images,
      "pixels": [int(v) for v in totals[:num_classes]],
      "void_pixels": int(totals[common.IGNORE_LABEL]),
  }


def load_or_count(builder: tfds.core.DatasetBuilder) -> dict:
  """``{"class_names": [...], "splits": {split: count_split(...)}}`` of a prepared builder: read from
  ``<data_dir>/class_pixels.json``, else counted and written there (atomically)."""
  path = os.path.join(os.fspath(builder.data_dir), FILENAME)
  names = common.class_names(builder)
  try:
    with open(path) as f:
      saved = json.load(f)
    if (
        isinstance(saved, dict)
        and saved.get("class_names") == names
        and set(saved.get("splits") or ()) == set(builder.info.splits)
    ):
      return saved
  except (OSError, ValueError):
    pass  # absent or unreadable: counted again below
  counts = {
      "class_names": names,
      "splits": {split: count_split(builder, split, len(names)) for split in sorted(builder.info.splits)},
  }
  try:
    files.write_atomic(path, json.dumps(counts, indent=1))
  except files.WriteError as e:
    print(f"note: the pixel counts are not saved ({e})", flush=True)
  return counts


def evaluated_splits(counts: dict) -> list[str]:
  """The splits an evaluation may use: every split but the training and the unlabelled ones."""
  return [s for s in counts["splits"] if s not in TRAINING_SPLITS + UNLABELED_SPLITS]


def warnings(counts: dict, eval_splits: Sequence[str] | None = None) -> list[str]:
  """One line per problem of the evaluation splits (default :func:`evaluated_splits`): fewer than
  ``MIN_EVAL_IMAGES`` images, or a class with no pixel (its IoU is then undefined and results leave it out)."""
  out = []
  names = counts["class_names"]
  for split in evaluated_splits(counts) if eval_splits is None else eval_splits:
    c = counts["splits"].get(split)
    if c is None:
      continue
    if c["images"] < conventions.MIN_EVAL_IMAGES:
      out.append(
          f"the {split} split has {c['images']} image(s), fewer than {conventions.MIN_EVAL_IMAGES}: one image can "
          "move its scores by several points; put more images in it"
      )
    missing = [n for n, p in zip(names, c["pixels"]) if p == 0]
    if missing:
      out.append(
          f"class(es) {', '.join(missing)} have no pixel in the {split} split: their IoU is undefined there, so an "
          "evaluation on it scores the other classes only (results.md lists them as absent); put images that show "
          "them in it"
      )
  return out


def table(counts: dict) -> str:
  """The counts as a text table: one row per class (and void), one column per split."""
  splits = list(counts["splits"])
  rows = [["class", *splits]]
  rows += [["images", *(str(counts["splits"][s]["images"]) for s in splits)]]
  for k, name in enumerate(counts["class_names"]):
    rows.append([name, *(str(counts["splits"][s]["pixels"][k]) for s in splits)])
  rows.append(["void (255)", *(str(counts["splits"][s]["void_pixels"]) for s in splits)])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join(
      "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows
  )
