"""Segmentation datasets as TFDS builders; importing this package registers them with TFDS.

- ``synthetic_shapes`` (configs ``default``, ``tiny``): the embedded default, generated locally.
- ``voc2012_aug``: PASCAL VOC 2012 + SBD, splits ``train_aug`` / ``val``, from manual archives.
- ``cityscapes19``: Cityscapes fine labels as 19 train ids, splits ``train`` / ``validation``, from manual archives.

All share the features ``{"image": uint8 [H,W,3], "label": uint8 [H,W,1] (255 = void), "image_id": text}`` and
store ``class_names`` / ``num_classes`` / ``ignore_label`` in ``builder.info.metadata``.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from dilaff_jax import errors
from dilaff_jax.datasets import cityscapes, shapes_render, voc2012_aug
from dilaff_jax.datasets.cityscapes import Cityscapes19
from dilaff_jax.datasets.common import IGNORE_LABEL, DataError, class_names
from dilaff_jax.datasets.synthetic_shapes import SyntheticShapes
from dilaff_jax.datasets.voc2012_aug import Voc2012Aug

__all__ = ["Cityscapes19", "DataError", "IGNORE_LABEL", "SyntheticShapes", "Voc2012Aug", "class_names",
           "dataset_class_names", "get_builder", "known_names"]

# builder name -> (its class names, its config names)
_DATASETS = {
    builder.name: (names, tuple(c.name for c in builder.BUILDER_CONFIGS or ()))
    for builder, names in ((SyntheticShapes, shapes_render.CLASS_NAMES), (Voc2012Aug, voc2012_aug.CLASS_NAMES),
                           (Cityscapes19, cityscapes.CLASS_NAMES))
}


def known_names() -> list[str]:
  """The dataset names this project provides (``dataset.name`` values), e.g. ``synthetic_shapes/tiny``."""
  return [f"{name}/{c}" if len(configs) > 1 else name for name, (_, configs) in _DATASETS.items()
          for c in (configs if len(configs) > 1 else ("",))]


def dataset_class_names(name: str) -> tuple[str, ...]:
  """The class names of the dataset ``name`` (``builder[/config][:version]``) without preparing it; a name that is
  not one of :func:`known_names` raises :class:`errors.UserError` listing them."""
  builder, _, config = name.partition(":")[0].partition("/")
  if builder not in _DATASETS or (config and config not in _DATASETS[builder][1]):
    raise errors.UserError(f"dataset {name!r} is not one of this project's datasets ({', '.join(known_names())})")
  return tuple(_DATASETS[builder][0])


def get_builder(name: str, *, data_dir: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The TFDS builder ``name`` (e.g. ``"synthetic_shapes/tiny"``), prepared in ``data_dir`` if ``prepare``.

  Preparing is a no-op once the dataset exists. ``manual_dir`` is where ``voc2012_aug`` and ``cityscapes19`` look
  for their archives (TFDS's default: ``<data_dir>/downloads/manual``). In a multi-host job prepare once, before
  the hosts start reading.
  """
  dataset_class_names(name)  # an unknown name is named here, not by TFDS's list of every dataset it has
  builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir is not None else None)
  if prepare:
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
    builder.download_and_prepare(download_config=download_config)
  return builder
