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

from dilaff_jax.datasets.cityscapes import Cityscapes19
from dilaff_jax.datasets.common import IGNORE_LABEL, class_names
from dilaff_jax.datasets.synthetic_shapes import SyntheticShapes
from dilaff_jax.datasets.voc2012_aug import Voc2012Aug

__all__ = ["Cityscapes19", "IGNORE_LABEL", "SyntheticShapes", "Voc2012Aug", "class_names", "get_builder"]


def get_builder(name: str, *, data_dir: str | os.PathLike | None = None,
                manual_dir: str | os.PathLike | None = None, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The TFDS builder ``name`` (e.g. ``"synthetic_shapes/tiny"``), prepared in ``data_dir`` if ``prepare``.

  Preparing is a no-op once the dataset exists. ``manual_dir`` is where ``voc2012_aug`` and ``cityscapes19`` look
  for their archives (TFDS's default: ``<data_dir>/downloads/manual``). In a multi-host job prepare once, before
  the hosts start reading.
  """
  builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir is not None else None)
  if prepare:
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
    builder.download_and_prepare(download_config=download_config)
  return builder
