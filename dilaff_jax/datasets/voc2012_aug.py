"""TFDS builder ``voc2012_aug``: PASCAL VOC 2012 segmentation with the SBD extra annotations ("VOC aug").

The paper trains on the 10,582-image ``train_aug`` set and evaluates on VOC 2012 ``val`` (1,449 images). Both come
from archives the user places in TFDS's ``manual_dir`` (default ``<data_dir>/downloads/manual``):

- ``VOCtrainval_11-May-2012.tar``: all JPEG images, VOC's palette masks (classes 0-20, 255 = void band) and the
  split lists ``ImageSets/Segmentation/{train,val}.txt``;
- and one source of the extra masks: SBD's ``benchmark.tgz`` (``benchmark_RELEASE/dataset/cls/<id>.mat`` with the
  mask in ``GTcls.Segmentation``, split lists ``train.txt``/``val.txt``), or the widely used
  ``SegmentationClassAug.zip`` (``SegmentationClassAug/<id>.png``, greyscale class indices). If both are present,
  ``benchmark.tgz`` is used.

Splits: ``train_aug`` = (SBD train + SBD val + VOC train) minus VOC val, each image once; with
``SegmentationClassAug.zip`` the SBD part is every mask in the zip. ``val`` = VOC val. An image with a VOC mask uses
it (it has the void band); the others use the SBD mask. Archives are read in place, never extracted.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tarfile
import zipfile
from typing import Callable, ContextManager, Iterable, Iterator, Mapping

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from dilaff_jax import errors
from dilaff_jax.datasets import common

CLASS_NAMES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
AUG_ARCHIVE = "SegmentationClassAug.zip"

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = (
    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz "
    "(Semantic Boundaries Dataset, Hariharan et al. 2011)"
)
AUG_URL = (
    "the README of github.com/DrSleep/tensorflow-deeplab-resnet (link 'SegmentationClassAug.zip', "
    "the masks of DeepLab's train_aug set)"
)

MaskLookup = Callable[[str], tuple[np.ndarray, str]]  # image id -> (mask [H, W], name for messages)

VOC_ROOT = "VOCdevkit/VOC2012"
SBD_ROOT = "benchmark_RELEASE/dataset"
AUG_ROOT = "SegmentationClassAug"


def train_aug_ids(voc_train: Iterable[str], voc_val: Iterable[str], extra: Iterable[str]) -> list[str]:
  """The ``train_aug`` image ids: ``(extra ∪ VOC train) − VOC val``, sorted, each once."""
  return sorted((set(extra) | set(voc_train)) - set(voc_val))


def _split_list(data: bytes) -> list[str]:
  return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def _member_name(name: str) -> str:
  return name[2:] if name.startswith("./") else name


def _check_label_values(label: np.ndarray, name: str) -> np.ndarray:
  bad = np.setdiff1d(np.unique(label), np.r_[np.arange(len(CLASS_NAMES)), common.IGNORE_LABEL])
  if bad.size:
    raise common.DataError(
        f"The mask {name} holds values {bad.tolist()} outside the VOC classes 0-{len(CLASS_NAMES) - 1} and "
        f"{common.IGNORE_LABEL} (void)."
    )
  return label


def check_tar_end(tar: tarfile.TarFile, path: str, filename: str, source: str) -> None:
  """Raises :class:`common.DataError` naming the archive unless ``tar``'s listing (``getmembers``) ended at its
  end-of-archive marker (zero blocks to the end of the file). ``tarfile`` stops listing silently at the first
  invalid header (garbage bytes over a member, a cut at a member boundary): every later member would look absent,
  and its absence would be blamed on another archive."""
  offset = tar.offset
  with open(path, "rb") as f:
    f.seek(offset)
    rest = f.read(tarfile.BLOCKSIZE)
    intact = bool(rest)
    while rest and intact:
      intact = not rest.strip(b"\0")
      rest = f.read(1 << 20)
  if not intact:
    last = _member_name(tar.members[-1].name) if tar.members else None
    raise common.DataError(
        f"The archive {filename} ({path}) is damaged: no valid tar header at byte {offset}"
        + (f" (after {last})" if last else "")
        + f", so none of its members from there on can be read; download it again from {source} and replace it."
    )


class VocTar:
  """Random access to ``VOCtrainval_11-May-2012.tar`` (uncompressed, so members are read by seeking)."""

  def __init__(self, path: str):
    self.path = path
    with common.damaged_archive(VOC_ARCHIVE, path, VOC_URL):
      self._tar = tarfile.open(path, mode="r:")
      self._members = {_member_name(m.name): m for m in self._tar.getmembers() if m.isfile()}
    check_tar_end(self._tar, path, VOC_ARCHIVE, VOC_URL)
    self.train = _split_list(self.read(f"{VOC_ROOT}/ImageSets/Segmentation/train.txt"))
    self.val = _split_list(self.read(f"{VOC_ROOT}/ImageSets/Segmentation/val.txt"))

  def read(self, name: str) -> bytes:
    member = self._members.get(name)
    if member is None:
      raise errors.MissingFileError(
          f"{VOC_ARCHIVE} ({self.path}) has no member {name!r}: it is incomplete or "
          f"another archive; download it again from {VOC_URL}."
      )
    with common.damaged_archive(VOC_ARCHIVE, self.path, VOC_URL):
      return self._tar.extractfile(member).read()

  def has_mask(self, image_id: str) -> bool:
    return f"{VOC_ROOT}/SegmentationClass/{image_id}.png" in self._members

  def mask(self, image_id: str) -> np.ndarray:
    name = f"{VOC_ROOT}/SegmentationClass/{image_id}.png"
    return read_mask_png(self.read(name), f"{VOC_ARCHIVE}:{name}")

  def jpeg(self, image_id: str) -> bytes:
    return self.read(f"{VOC_ROOT}/JPEGImages/{image_id}.jpg")

  def close(self) -> None:
    self._tar.close()

  def __enter__(self) -> "VocTar":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_mask_png(data: bytes, name: str) -> np.ndarray:
  """Class indices of a VOC palette PNG (or greyscale aug PNG), checked to be VOC classes or 255."""
  return _check_label_values(common.read_index_png(data, name), name)


def read_sbd_mat(data: bytes, name: str) -> np.ndarray:
  """The class mask ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file, as uint8 [H, W]."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(data))
    segmentation = mat["GTcls"][0, 0]["Segmentation"]
  except Exception as error:  # loadmat raises several types; a missing field is a KeyError/ValueError.
    raise common.DataError(f"Cannot read GTcls.Segmentation from {name}: {error}") from error
  segmentation = np.asarray(segmentation)
  if segmentation.ndim != 2:
    raise common.DataError(f"GTcls.Segmentation in {name} has shape {segmentation.shape}; expected [H, W].")
  return _check_label_values(segmentation.astype(np.uint8), name)


def read_sbd(path: str) -> tuple[list[str], dict[str, bytes]]:
  """Streams ``benchmark.tgz`` once: SBD train + val ids and every ``cls`` mask, re-encoded as "L" PNG bytes."""
  lists: dict[str, list[str]] = {}
  masks: dict[str, bytes] = {}
  cls_dir = f"{SBD_ROOT}/cls/"
  with common.damaged_archive(SBD_ARCHIVE, path, SBD_URL), tarfile.open(path, mode="r|gz") as tar:
    for member in tar:
      name = _member_name(member.name)
      if not member.isfile():
        continue
      if name in (f"{SBD_ROOT}/train.txt", f"{SBD_ROOT}/val.txt"):
        lists[os.path.basename(name)] = _split_list(tar.extractfile(member).read())
      elif name.startswith(cls_dir) and name.endswith(".mat"):
        image_id = name[len(cls_dir) : -len(".mat")]
        mask = read_sbd_mat(tar.extractfile(member).read(), f"{SBD_ARCHIVE}:{name}")
        masks[image_id] = common.encode_label_png(mask)
  for list_name in ("train.txt", "val.txt"):
    if list_name not in lists:
      raise errors.MissingFileError(
          f"{SBD_ARCHIVE} ({path}) has no member {SBD_ROOT}/{list_name}: it is "
          f"incomplete or another archive; download it again from {SBD_URL}."
      )
  ids = lists["train.txt"] + lists["val.txt"]
  missing = sorted(set(ids) - set(masks))
  if missing:
    raise errors.MissingFileError(
        f"{SBD_ARCHIVE} ({path}) lists {len(missing)} images without a {cls_dir}<id>.mat mask, e.g. " f"{missing[:3]}."
    )
  return ids, masks


def aug_zip_members(path: str) -> dict[str, str]:
  """``image id -> member name`` of every mask ``SegmentationClassAug/<id>.png`` in the zip."""
  members = {}
  with common.damaged_archive(AUG_ARCHIVE, path, AUG_URL), zipfile.ZipFile(path) as archive:
    for name in archive.namelist():
      parts = name.split("/")
      if len(parts) == 2 and parts[0] == AUG_ROOT and parts[1].endswith(".png"):
        members[parts[1][: -len(".png")]] = name
  if not members:
    raise errors.MissingFileError(
        f"{AUG_ARCHIVE} ({path}) holds no {AUG_ROOT}/<id>.png masks: it is incomplete "
        f"or another archive; download it again from {AUG_URL}."
    )
  return members


class Voc2012Aug(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 + SBD segmentation: ``train_aug`` (10,582) and ``val`` (1,449); 21 classes, 255 void."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Place these archives, unchanged, in the manual_dir (default <data_dir>/downloads/manual):
    {VOC_ARCHIVE}  from {VOC_URL}
  and either
    {SBD_ARCHIVE}  from {SBD_URL}
  or
    {AUG_ARCHIVE}  from {AUG_URL}
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="PASCAL VOC 2012 segmentation with the SBD extra masks (train_aug / val).",
        features=common.segmentation_features("jpeg"),
        metadata=common.class_metadata(CLASS_NAMES),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_of(dl_manager)
    voc_path = common.require_archive(manual_dir, VOC_ARCHIVE, VOC_URL)
    sbd_path = os.path.join(manual_dir, SBD_ARCHIVE)
    aug_path = os.path.join(manual_dir, AUG_ARCHIVE)
    if not (os.path.isfile(sbd_path) or os.path.isfile(aug_path)):
      raise errors.MissingFileError(
          f"Missing the SBD masks: expected {SBD_ARCHIVE!r} at {sbd_path} (from {SBD_URL}) or {AUG_ARCHIVE!r} at "
          f"{aug_path} (from {AUG_URL}); the TFDS manual_dir is {manual_dir}."
      )
    with VocTar(voc_path) as voc:
      voc_train, voc_val = voc.train, voc.val
    if os.path.isfile(sbd_path):
      extra_ids, sbd_masks = read_sbd(sbd_path)
      extra_masks = functools.partial(_sbd_lookup, sbd_masks)
    else:
      members = aug_zip_members(aug_path)
      extra_ids = list(members)
      extra_masks = functools.partial(_aug_lookup, aug_path, members)
    return {
        "train_aug": self._generate_examples(
            voc_path=voc_path, image_ids=train_aug_ids(voc_train, voc_val, extra_ids), extra_masks=extra_masks
        ),
        "val": self._generate_examples(voc_path=voc_path, image_ids=sorted(set(voc_val)), extra_masks=extra_masks),
    }

  def _generate_examples(
      self, voc_path: str, image_ids: list[str], extra_masks: Callable[[], ContextManager[MaskLookup]]
  ):
    with VocTar(voc_path) as voc, extra_masks() as extra_mask:
      for image_id in image_ids:
        if voc.has_mask(image_id):
          label, label_name = voc.mask(image_id), f"{VOC_ARCHIVE}:{VOC_ROOT}/SegmentationClass/{image_id}.png"
        else:
          label, label_name = extra_mask(image_id)
        image_name = f"{VOC_ARCHIVE}:{VOC_ROOT}/JPEGImages/{image_id}.jpg"
        jpeg = voc.jpeg(image_id)
        common.check_same_size(common.image_size(jpeg, image_name), label, image_name, label_name)
        yield image_id, {"image": jpeg, "label": common.encode_label_png(label), "image_id": image_id}


@contextlib.contextmanager
def _sbd_lookup(masks: Mapping[str, bytes]) -> Iterator[MaskLookup]:
  def lookup(image_id: str) -> tuple[np.ndarray, str]:
    name = f"{SBD_ARCHIVE}:{SBD_ROOT}/cls/{image_id}.mat"
    if image_id not in masks:
      raise errors.MissingFileError(f"No mask {name} for image {image_id}.")
    return common.read_index_png(masks[image_id], name), name

  yield lookup


@contextlib.contextmanager
def _aug_lookup(path: str, members: Mapping[str, str]) -> Iterator[MaskLookup]:
  with common.damaged_archive(AUG_ARCHIVE, path, AUG_URL):
    archive = zipfile.ZipFile(path)

  def lookup(image_id: str) -> tuple[np.ndarray, str]:
    if image_id not in members:
      raise errors.MissingFileError(f"No mask {AUG_ROOT}/{image_id}.png in {AUG_ARCHIVE} ({path}).")
    name = f"{AUG_ARCHIVE}:{members[image_id]}"
    with common.damaged_archive(AUG_ARCHIVE, path, AUG_URL):
      data = archive.read(members[image_id])
    return read_mask_png(data, name), name

  with archive:
    yield lookup
