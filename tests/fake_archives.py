"""Tiny fake dataset archives in exactly the real on-disk layout, for preparing the real builders offline.

- ``VOCtrainval_11-May-2012.tar``: ``VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette
  PNG, VOC colour map), SegmentationObject/, Annotations/<id>.xml, ImageSets/Segmentation/{train,val,
  trainval}.txt}`` with directory entries, uncompressed.
- ``benchmark.tgz``: ``benchmark_RELEASE/dataset/{cls/<id>.mat (struct GTcls with Boundaries (cell of sparse),
  Segmentation (uint8), CategoriesPresent), img/<id>.jpg, train.txt, val.txt}``, gzip-compressed tar.
- ``SegmentationClassAug.zip``: ``SegmentationClassAug/<id>.png`` (greyscale class indices) plus the
  ``__MACOSX/`` resource-fork entries of the widely shared copy.
- ``leftImg8bit_trainvaltest.zip`` / ``gtFine_trainvaltest.zip``: ``leftImg8bit/<split>/<city>/<city>_<seq>_
  <frame>_leftImg8bit.png`` and ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds,color}
  .png`` + ``_polygons.json``, with the top-level ``README`` and ``license.txt``.

Every writer returns the arrays it wrote so tests can compare the prepared dataset with them. Faults are injected
with :func:`truncate` (a partial download), :func:`overwrite_header` (garbage bytes over a tar member's header) and
the writers' ``label_pngs`` (a mask file's bytes replaced, e.g. an RGB PNG or a value no class has).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image
import scipy.io
import scipy.sparse

VOC_ROOT = "VOCdevkit/VOC2012"
SBD_ROOT = "benchmark_RELEASE/dataset"


def voc_palette() -> np.ndarray:
  """The PASCAL VOC colour map [256, 3] (class k's colour from the bits of k, as in the VOC devkit)."""
  palette = np.zeros((256, 3), dtype=np.uint8)
  for k in range(256):
    c, r, g, b = k, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[k] = (r, g, b)
  return palette


def palette_png(indices: np.ndarray) -> bytes:
  """A palette ("P") PNG whose pixel values are ``indices``, with the VOC colour map."""
  image = Image.fromarray(indices.astype(np.uint8), mode="P")
  image.putpalette(voc_palette().ravel().tolist())
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def grey_png(values: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(values.astype(np.uint8), mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


def rgb_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
  return buffer.getvalue()


def jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def random_mask(
    rng: np.random.Generator, height: int, width: int, classes: list[int], void: int | None = 255
) -> np.ndarray:
  """Blocks of the given classes plus (optionally) a void band between them."""
  mask = np.full((height, width), classes[0], dtype=np.uint8)
  for cls in classes[1:]:
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + height // 2, left : left + width // 2] = cls
  if void is not None:
    edge = np.zeros_like(mask, dtype=bool)
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    mask[edge] = void
  return mask


def sbd_mat(segmentation: np.ndarray) -> bytes:
  """An SBD ``cls/<id>.mat``: struct ``GTcls`` with ``Boundaries`` (cell of 20 sparse), ``Segmentation``,
  ``CategoriesPresent``, as MATLAB 5 bytes."""
  boundaries = np.empty((20, 1), dtype=object)
  for k in range(20):
    boundaries[k, 0] = scipy.sparse.csc_matrix((segmentation == k + 1).astype(np.float64))
  present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8)
  gtcls = {
      "Boundaries": boundaries,
      "Segmentation": segmentation.astype(np.uint8),
      "CategoriesPresent": present.reshape(-1, 1),
  }
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {"GTcls": gtcls}, do_compression=True)
  return buffer.getvalue()


def _add_dirs(tar: tarfile.TarFile, paths: list[str]) -> None:
  for path in paths:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, path: str, data: bytes) -> None:
  info = tarfile.TarInfo(path)
  info.size = len(data)
  info.mode = 0o644
  tar.addfile(info, io.BytesIO(data))


def _lines(ids: list[str]) -> bytes:
  return "".join(f"{i}\n" for i in ids).encode()


@dataclasses.dataclass
class FakeVoc:
  """What the fake VOC + SBD archives hold: split lists, images and masks by image id."""

  voc_train: list[str]
  voc_val: list[str]
  sbd_train: list[str]
  sbd_val: list[str]
  jpegs: dict[str, bytes]  # JPEGImages/<id>.jpg
  images: dict[str, np.ndarray]  # the JPEGs decoded by Pillow
  voc_masks: dict[str, np.ndarray]  # palette indices of SegmentationClass/<id>.png
  sbd_masks: dict[str, np.ndarray]  # GTcls.Segmentation of cls/<id>.mat (and the aug PNGs)


def make_fake_voc(
    rng: np.random.Generator,
    *,
    voc_train: list[str],
    voc_val: list[str],
    sbd_train: list[str],
    sbd_val: list[str],
    unlisted: list[str] = (),
    sizes: tuple[int, int] = (20, 40),
) -> FakeVoc:
  """Random images and masks for the given split lists (ids in ``unlisted`` get an image only)."""
  voc_ids = sorted(set(voc_train) | set(voc_val))
  sbd_ids = sorted(set(sbd_train) | set(sbd_val))
  jpegs, images, voc_masks, sbd_masks = {}, {}, {}, {}
  for image_id in sorted(set(voc_ids) | set(sbd_ids) | set(unlisted)):
    height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    jpegs[image_id] = jpeg(pixels)
    images[image_id] = np.asarray(Image.open(io.BytesIO(jpegs[image_id])).convert("RGB"))
    classes = [0, *rng.choice(np.arange(1, 21), size=2, replace=False).tolist()]
    if image_id in voc_ids:
      voc_masks[image_id] = random_mask(rng, height, width, classes, void=255)
    if image_id in sbd_ids:
      sbd_masks[image_id] = random_mask(rng, height, width, classes[::-1], void=None)
  return FakeVoc(list(voc_train), list(voc_val), list(sbd_train), list(sbd_val), jpegs, images, voc_masks, sbd_masks)


def overwrite_header(path: str | os.PathLike, member: str, seed: int = 0) -> None:
  """Replaces the 512-byte header of ``member`` of the tar ``path`` with random bytes (a corrupt member, as a bad
  disk or copy leaves it): readers that stop at the first invalid header see none of the members from there on."""
  with tarfile.open(path) as tar:
    offset = tar.getmember(member).offset
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(np.random.default_rng(seed).integers(0, 256, size=512, dtype=np.uint8).tobytes())


def truncate(path: str | os.PathLike, fraction: float = 0.5) -> None:
  """Cuts the file to ``fraction`` of its bytes, as an interrupted download leaves it (0: an empty file)."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * fraction))


def write_voc_tar(path: str | os.PathLike, fake: FakeVoc, label_pngs: dict[str, bytes] | None = None) -> None:
  """``VOCtrainval_11-May-2012.tar`` with every image in ``fake`` and VOC masks for the VOC split lists, its members
  in the real archive's order (Annotations, ImageSets, JPEGImages, SegmentationClass, SegmentationObject);
  ``label_pngs`` replaces the ``SegmentationClass/<id>.png`` bytes of the given ids."""
  with tarfile.open(path, "w") as tar:
    _add_dirs(
        tar,
        ["VOCdevkit", VOC_ROOT]
        + [
            f"{VOC_ROOT}/{d}"
            for d in (
                "Annotations",
                "ImageSets",
                "ImageSets/Segmentation",
                "JPEGImages",
                "SegmentationClass",
                "SegmentationObject",
            )
        ],
    )
    for image_id in fake.jpegs:
      _add_file(tar, f"{VOC_ROOT}/Annotations/{image_id}.xml", f"<annotation>{image_id}</annotation>".encode())
    lists = {"train": fake.voc_train, "val": fake.voc_val, "trainval": fake.voc_train + fake.voc_val}
    for name, ids in lists.items():
      _add_file(tar, f"{VOC_ROOT}/ImageSets/Segmentation/{name}.txt", _lines(ids))
    for image_id, data in fake.jpegs.items():
      _add_file(tar, f"{VOC_ROOT}/JPEGImages/{image_id}.jpg", data)
    for image_id, mask in fake.voc_masks.items():
      png = (label_pngs or {}).get(image_id) or palette_png(mask)
      _add_file(tar, f"{VOC_ROOT}/SegmentationClass/{image_id}.png", png)
    for image_id, mask in fake.voc_masks.items():
      _add_file(tar, f"{VOC_ROOT}/SegmentationObject/{image_id}.png", palette_png(np.minimum(mask, 1)))


def write_sbd_tgz(path: str | os.PathLike, fake: FakeVoc) -> None:
  """SBD's ``benchmark.tgz`` with ``cls/<id>.mat`` for every SBD id, images, and the split lists."""
  with tarfile.open(path, "w:gz") as tar:
    _add_dirs(tar, ["benchmark_RELEASE", SBD_ROOT] + [f"{SBD_ROOT}/{d}" for d in ("cls", "img", "inst")])
    for image_id, mask in fake.sbd_masks.items():
      _add_file(tar, f"{SBD_ROOT}/cls/{image_id}.mat", sbd_mat(mask))
      _add_file(tar, f"{SBD_ROOT}/img/{image_id}.jpg", fake.jpegs[image_id])
    _add_file(tar, f"{SBD_ROOT}/train.txt", _lines(fake.sbd_train))
    _add_file(tar, f"{SBD_ROOT}/val.txt", _lines(fake.sbd_val))


def write_aug_zip(path: str | os.PathLike, fake: FakeVoc, label_pngs: dict[str, bytes] | None = None) -> None:
  """``SegmentationClassAug.zip``: greyscale masks for every VOC and SBD id (VOC's own mask where there is one);
  ``label_pngs`` replaces the bytes of the given ids' masks."""
  masks = {**fake.sbd_masks, **fake.voc_masks}
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("SegmentationClassAug/", b"")
    for image_id, mask in sorted(masks.items()):
      archive.writestr(f"SegmentationClassAug/{image_id}.png", (label_pngs or {}).get(image_id) or grey_png(mask))
      archive.writestr(f"__MACOSX/SegmentationClassAug/._{image_id}.png", b"\x00\x05\x16\x07junk")


CITYSCAPES_SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class FakeCityscapes:
  """Images and label-id maps of the fake Cityscapes archives: ``{split: {image_id: array}}``."""

  images: dict[str, dict[str, np.ndarray]]
  label_ids: dict[str, dict[str, np.ndarray]]


def write_cityscapes_zips(
    manual_dir: str | os.PathLike,
    rng: np.random.Generator,
    counts: dict[str, dict[str, int]],
    size: tuple[int, int] = (16, 32),
) -> FakeCityscapes:
  """``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` with ``counts[split][city]`` frames."""
  images: dict[str, dict[str, np.ndarray]] = {s: {} for s in counts}
  label_ids: dict[str, dict[str, np.ndarray]] = {s: {} for s in counts}
  left_path = os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip")
  fine_path = os.path.join(manual_dir, "gtFine_trainvaltest.zip")
  with zipfile.ZipFile(left_path, "w") as left, zipfile.ZipFile(fine_path, "w") as fine:
    for archive in (left, fine):
      archive.writestr("README", b"The Cityscapes Dataset.\n")
      archive.writestr("license.txt", b"Cityscapes license.\n")
    for split, cities in counts.items():
      for city, count in cities.items():
        for frame in range(count):
          image_id = f"{city}_{frame:06d}_{(19 + frame * 7):06d}"
          pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
          ids = rng.integers(0, 34, size=size, dtype=np.uint8)
          images[split][image_id], label_ids[split][image_id] = pixels, ids
          left.writestr(f"leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png", rgb_png(pixels))
          stem = f"gtFine/{split}/{city}/{image_id}_gtFine"
          fine.writestr(f"{stem}_labelIds.png", grey_png(ids))
          fine.writestr(f"{stem}_instanceIds.png", grey_png(ids))
          fine.writestr(f"{stem}_color.png", rgb_png(np.stack([ids] * 3, axis=-1)))
          fine.writestr(f"{stem}_polygons.json", json.dumps({"imgHeight": size[0], "imgWidth": size[1]}))
  return FakeCityscapes(images, label_ids)
