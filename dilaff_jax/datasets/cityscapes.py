"""TFDS builder ``cityscapes19``: Cityscapes fine annotations mapped to the 19 evaluation classes ("train ids").

A subclass of TFDS's own Cityscapes builder (its ``semantic_segmentation`` config: the same manual archives
``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` and the same image-id rule), changed in three ways:
the zips are read in place rather than extracted (11 GB), the ``*_gtFine_labelIds.png`` ids are mapped to the 19
train ids with 255 for every other id, and the features follow the project's layout (``image``, ``label``,
``image_id``). Splits: ``train`` (2,975) and ``validation`` (500); the test split has no public labels.

TFDS checks files it *downloads* against recorded checksums; this builder only opens the manual archives, so no
checksum applies to them.
"""

from __future__ import annotations

import functools
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.cityscapes import cityscapes_dataset_builder as tfds_cityscapes

from dilaff_jax import errors
from dilaff_jax.datasets import common

CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/ (free registration required)"
IMAGES_ARCHIVE = "leftImg8bit_trainvaltest.zip"
LABELS_ARCHIVE = "gtFine_trainvaltest.zip"

# (label id, train id) of the 19 evaluated classes, from cityscapesScripts' labels.py; every other id -> 255.
_TRAIN_IDS = (
    (7, 0),
    (8, 1),
    (11, 2),
    (12, 3),
    (13, 4),
    (17, 5),
    (19, 6),
    (20, 7),
    (21, 8),
    (22, 9),
    (23, 10),
    (24, 11),
    (25, 12),
    (26, 13),
    (27, 14),
    (28, 15),
    (31, 16),
    (32, 17),
    (33, 18),
)

CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

_SPLITS = {"train": "train", "validation": "val"}


def label_id_to_train_id() -> np.ndarray:
  """Lookup table [256] uint8: Cityscapes label id -> train id (0-18), 255 for ids not evaluated."""
  table = np.full(256, common.IGNORE_LABEL, dtype=np.uint8)
  for label_id, train_id in _TRAIN_IDS:
    table[label_id] = train_id
  return table


def image_members(names: list[str], split_dir: str) -> dict[str, str]:
  """``image id -> member`` for every ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``."""
  members = {}
  prefix = f"leftImg8bit/{split_dir}/"
  for name in names:
    parts = name.split("/")
    if name.startswith(prefix) and len(parts) == 4:
      match = tfds_cityscapes.LEFT_IMAGE_FILE_RE.fullmatch(parts[3])
      if match:
        members["{}_{}_{}".format(*match.groups())] = name
  return members


class Cityscapes19(tfds_cityscapes.Builder):
  """Cityscapes fine annotations with the 19 train ids (255 = void): ``train`` and ``validation``."""

  name = "cityscapes19"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds_cityscapes.CityscapesConfig(
          name="semantic_segmentation",
          description="Fine labels mapped to the 19 train ids.",
          right_images=False,
          segmentation_labels=True,
          disparity_maps=False,
          train_extra_split=False,
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Place {IMAGES_ARCHIVE} and {LABELS_ARCHIVE}, unchanged, in the manual_dir (default
  <data_dir>/downloads/manual). Get them from {CITYSCAPES_URL}.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Cityscapes fine semantic segmentation, 19 evaluated classes (train ids), 255 = void.",
        features=common.segmentation_features("png"),
        metadata=common.class_metadata(CLASS_NAMES),
        homepage="https://www.cityscapes-dataset.com",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_of(dl_manager)
    images = common.require_archive(manual_dir, IMAGES_ARCHIVE, CITYSCAPES_URL)
    labels = common.require_archive(manual_dir, LABELS_ARCHIVE, CITYSCAPES_URL)
    return {
        split: self._generate_examples(images_zip=images, labels_zip=labels, split_dir=split_dir)
        for split, split_dir in _SPLITS.items()
    }

  def _generate_examples(self, images_zip: str, labels_zip: str, split_dir: str):
    table = label_id_to_train_id()
    images_damaged = functools.partial(common.damaged_archive, IMAGES_ARCHIVE, images_zip, CITYSCAPES_URL)
    labels_damaged = functools.partial(common.damaged_archive, LABELS_ARCHIVE, labels_zip, CITYSCAPES_URL)
    with images_damaged():
      images = zipfile.ZipFile(images_zip)
    with labels_damaged():
      labels = zipfile.ZipFile(labels_zip)
    with images, labels:
      label_names = set(labels.namelist())
      members = image_members(images.namelist(), split_dir)
      if not members:
        raise errors.MissingFileError(
            f"{IMAGES_ARCHIVE} ({images_zip}) has no leftImg8bit/{split_dir}/<city>/*_leftImg8bit.png images."
        )
      for image_id, image_member in sorted(members.items()):
        city = image_member.split("/")[2]
        label_member = f"gtFine/{split_dir}/{city}/{image_id}_gtFine_labelIds.png"
        if label_member not in label_names:
          raise errors.MissingFileError(
              f"{LABELS_ARCHIVE} ({labels_zip}) has no {label_member} for the image {image_member}."
          )
        label_name = f"{LABELS_ARCHIVE}:{label_member}"
        with labels_damaged():
          label_png = labels.read(label_member)
        label = table[common.read_index_png(label_png, label_name)]
        image_name = f"{IMAGES_ARCHIVE}:{image_member}"
        with images_damaged():
          image = images.read(image_member)
        common.check_same_size(common.image_size(image, image_name), label, image_name, label_name)
        yield image_id, {"image": image, "label": common.encode_label_png(label), "image_id": image_id}
