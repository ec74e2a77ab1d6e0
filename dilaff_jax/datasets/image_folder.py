"""TFDS builder ``image_folder``: a user's own images and masks, from a folder given as ``manual_dir``.

Layout of the folder ``DIR``::

  DIR/images/NAME.{jpg,jpeg,png}   RGB, greyscale or RGBA (alpha composited over white), EXIF orientation applied
  DIR/masks/NAME.png               class indices: a greyscale ("L") PNG, or a palette ("P") PNG whose indices are
                                   the classes (VOC style); 255 = void (not scored, no affinity signal)
  DIR/splits/train.txt, val.txt    optional: names without extension, one a line
  DIR/splits/unlabeled.txt         optional: images without masks, kept as a split ``unlabeled`` (labels all void)
  DIR/classes.txt                  optional: one class name a line (index = line number - 1)

Without ``train.txt`` / ``val.txt`` every labelled image goes to ``train`` or ``val`` by a hash of its name (1 in 10
to ``val``): an image keeps its split when others are added. Every mask is checked before anything is written:
values ``0..num_classes-1`` or 255, size equal to its image's; a mistake raises :class:`errors.UserError` naming the
file and the values. So do masks that are all 0/255 while the classes name a foreground (255 is void:
:class:`BinaryMaskError`; ``foreground_255`` maps 255 to class 1 for such two-class folders) and a class with no
pixel in the training masks (:class:`EmptyClassError`). Class names (``classes.txt``, else ``class_0, class_1,
...``) go into the dataset metadata.

Two folders never share a prepared copy and a changed folder is prepared again: :func:`prepared_data_dir` puts the
copy in a TFDS ``data_dir`` of its own, named by a fingerprint of the folder's absolute path and of the name, size and
modification time of every file in it (and ``num_classes`` when there is no ``classes.txt``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from dilaff_jax import errors
from dilaff_jax.datasets import common

NAME = "image_folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "unlabeled")
VAL_SHARE = 10  # 1 in VAL_SHARE labelled images goes to ``val`` when the folder has no split lists
MAX_LISTED = 5  # names shown in an error before "(+N more)"
_FINGERPRINT_VERSION = "1"


class FolderError(errors.UserError, ValueError):
  """A mistake in a user's image folder; the message names the file (or files) and what is wrong."""


class BinaryMaskError(FolderError):
  """Every mask holds only 0 and 255 while the classes name a foreground: 255 is void, so the foreground would get
  no training pixel. The fix: masks with 1 for the foreground, or ``foreground_255``."""


class EmptyClassError(FolderError):
  """A class has no pixel in the training masks: the model could never learn to predict it."""


@dataclasses.dataclass(frozen=True)
class Example:
  name: str
  image: str  # path
  mask: str | None  # path; None for the ``unlabeled`` split


def _names(names) -> str:
  names = sorted(names)
  shown = ", ".join(repr(n) if n != n.strip() else n for n in names[:MAX_LISTED])  # a leading space shows
  return shown + (f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def require_folder(folder: str | os.PathLike | None) -> str:
  if not folder:
    raise FolderError(
        "config.dataset.manual_dir is not set: give --config.dataset.manual_dir=DIR, a folder with "
        "images/ and masks/"
    )
  folder = os.path.abspath(os.fspath(folder))
  for sub in ("images", "masks"):
    if not os.path.isdir(os.path.join(folder, sub)):
      raise FolderError(
          f"{folder} has no {sub}/ folder: an image folder holds images/NAME.jpg|png and "
          "masks/NAME.png (see dilaff_jax/datasets/image_folder.py)"
      )
  return folder


def read_class_names(folder: str, num_classes: int = 0) -> list[str]:
  """Class names from ``folder/classes.txt``, else ``class_0 .. class_{num_classes-1}``; checked against
  ``num_classes`` when both are given (0 = take the count from ``classes.txt``)."""
  path = os.path.join(folder, "classes.txt")
  if not os.path.isfile(path):
    if num_classes <= 0:
      raise FolderError(
          f"{folder} has no classes.txt: write one class name a line there, or give " "--config.dataset.num_classes=N"
      )
    return [f"class_{i}" for i in range(num_classes)]
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f.read().splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  if not lines:
    raise FolderError(f"{path} is empty: write one class name a line (the first is class 0)")
  empty = [i + 1 for i, line in enumerate(lines) if not line]
  if empty:
    raise FolderError(f"{path}: line {empty[0]} is empty; every line up to the last names a class")
  duplicates = sorted({n for n in lines if lines.count(n) > 1})
  if duplicates:
    raise FolderError(f"{path} names {duplicates} more than once")
  if len(lines) > common.IGNORE_LABEL:
    raise FolderError(f"{path} lists {len(lines)} classes; at most {common.IGNORE_LABEL} (255 is void)")
  if num_classes > 0 and num_classes != len(lines):
    raise FolderError(
        f"{path} lists {len(lines)} classes but config.dataset.num_classes = {num_classes}: "
        f"set --config.dataset.num_classes={len(lines)} (or 0 to take it from classes.txt)"
    )
  return lines


def _files(folder: str, sub: str, extensions: tuple[str, ...]) -> dict[str, str]:
  """``name -> path`` of the files of ``folder/sub`` with these extensions (any case); two files sharing a name
  are an error."""
  out: dict[str, str] = {}
  directory = os.path.join(folder, sub)
  for entry in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(entry)
    if ext.lower() not in extensions or not os.path.isfile(os.path.join(directory, entry)):
      continue
    if stem in out:
      raise FolderError(
          f"{directory} holds two files named {stem!r} ({os.path.basename(out[stem])}, {entry}): " "keep one"
      )
    out[stem] = os.path.join(directory, entry)
  return out


def _split_list(folder: str, split: str) -> list[str] | None:
  path = os.path.join(folder, "splits", f"{split}.txt")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f.read().splitlines() if line.strip()]
  names = [os.path.splitext(n)[0] if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS else n for n in names]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise FolderError(f"{path} lists {_names(repeated)} more than once")
  return names


def in_val(name: str) -> bool:
  """The deterministic 90/10 split of a folder without split lists: a hash of the name alone."""
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % VAL_SHARE == 0


def scan(folder: str | os.PathLike | None) -> dict[str, list[Example]]:
  """The examples of each split (``train``, ``val``, and ``unlabeled`` when listed), from the file names only.

  Raises :class:`FolderError` for images without masks (unless listed in ``splits/unlabeled.txt``), masks without
  images, names in the split lists that have no image, and a name in two splits.
  """
  folder = require_folder(folder)
  images = _files(folder, "images", IMAGE_EXTENSIONS)
  masks = _files(folder, "masks", (".png",))
  if not images:
    raise FolderError(f"{os.path.join(folder, 'images')} holds no image (.jpg, .jpeg or .png)")
  orphans = set(masks) - set(images)
  if orphans:
    raise FolderError(
        f"{len(orphans)} mask(s) in {os.path.join(folder, 'masks')} have no image "
        f"images/NAME.jpg|png: {_names(orphans)}"
    )
  lists = {split: _split_list(folder, split) for split in SPLITS}
  # split files are read line by line with surrounding spaces stripped, so a file name that starts or ends with a
  # space is matched by its stripped form (when no other image has that form)
  stripped: dict[str, list[str]] = {}
  for n in images:
    stripped.setdefault(n.strip(), []).append(n)
  for split, names in lists.items():
    if names is not None:
      lists[split] = [stripped[n][0] if n not in images and len(stripped.get(n, ())) == 1 else n for n in names]
  unlabeled = lists["unlabeled"] or []
  if (lists["train"] is None) != (lists["val"] is None):
    given, missing = ("train", "val") if lists["train"] is not None else ("val", "train")
    raise FolderError(
        f"{os.path.join(folder, 'splits')} has {given}.txt but no {missing}.txt: give both, or "
        "neither for the 90/10 split by name"
    )
  if lists["train"] is None:
    labelled = sorted(n for n in images if n not in set(unlabeled))
    val = [n for n in labelled if in_val(n)]
    if not val and len(labelled) > 1:  # tiny folders: still one image to evaluate on
      val = [min(labelled, key=lambda n: hashlib.sha256(n.encode("utf-8")).digest())]
    lists["val"] = val
    lists["train"] = [n for n in labelled if n not in set(val)]
  seen: dict[str, str] = {}
  for split in SPLITS:
    for n in lists[split] or []:
      if n in seen:
        raise FolderError(f"{n!r} is listed in both splits/{seen[n]}.txt and splits/{split}.txt: keep it in one")
      seen[n] = split
  for split in SPLITS:
    missing = [n for n in lists[split] or [] if n not in images]
    if missing:
      raise FolderError(
          f"{os.path.join(folder, 'splits', split + '.txt')} lists {len(missing)} name(s) with no "
          f"image in images/: {_names(missing)}"
      )
  no_mask = [n for split in ("train", "val") for n in lists[split] if n not in masks]
  if no_mask:
    raise FolderError(
        f"{len(no_mask)} image(s) have no mask {os.path.join(folder, 'masks', 'NAME.png')}: "
        f"{_names(no_mask)}; add the masks, or list these names in splits/unlabeled.txt to keep them "
        "for prediction only"
    )
  with_mask = [n for n in unlabeled if n in masks]
  if with_mask:
    raise FolderError(
        f"splits/unlabeled.txt lists images that have masks: {_names(with_mask)}; remove them from "
        "the list (or the masks)"
    )
  if not lists["train"]:
    raise FolderError(f"{folder} has no labelled image for the train split")
  out = {split: [Example(n, images[n], masks.get(n)) for n in lists[split]] for split in ("train", "val")}
  if unlabeled:
    out["unlabeled"] = [Example(n, images[n], None) for n in unlabeled]
  return out


def read_rgb(path: str) -> np.ndarray:
  """An image file as RGB uint8 ``[H, W, 3]``, upright: greyscale replicated, alpha composited over white."""
  try:
    with Image.open(path) as img:
      img = ImageOps.exif_transpose(img)
      if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16-bit greyscale
        grey = np.asarray(img, np.float32)
        if not np.isfinite(grey).all():
          raise ValueError(
              f"a floating-point image with {int(np.sum(~np.isfinite(grey)))} NaN or infinite pixels; save it as "
              "an 8-bit RGB or greyscale image (PNG or JPEG)"
          )
        grey = grey * (255.0 / 65535.0) if grey.max(initial=0) > 255 else grey
        return np.repeat(np.clip(grey + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
      if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
      return np.asarray(img.convert("RGB"), np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise FolderError(f"cannot read the image {path}: {e}") from None


def _upright_size(path: str) -> tuple[int, int]:
  """(height, width) of an image once its EXIF orientation is applied, from the header."""
  try:
    with Image.open(path) as img:
      width, height = img.size
      if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
        width, height = height, width
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise FolderError(f"cannot read the image {path}: {e}") from None
  return height, width


def read_mask(
    path: str,
    num_classes: int,
    image_hw: tuple[int, int] | None = None,
    image_path: str = "",
    foreground_255: bool = False,
) -> np.ndarray:
  """The class indices ``[H, W]`` uint8 of a mask, checked: a greyscale or palette PNG (indices kept), values
  ``< num_classes`` or 255, and the size of its image when ``image_hw`` is given. With ``foreground_255`` (a
  two-class folder of 0/255 masks) 255 becomes class 1."""
  try:
    with open(path, "rb") as f:
      label = common.read_index_png(f.read(), path)
  except ValueError as e:  # Pillow's mode or decoding: RGB masks are refused here
    message = str(e)
    if "Pillow mode 'RGB" in message or "Pillow mode 'LA'" in message:
      message += " Save the mask as class indices (a palette or greyscale PNG), not colours."
    elif "Pillow mode 'I" in message or "Pillow mode 'F'" in message:
      message += " It holds 16-bit or 32-bit values: save the class indices as an 8-bit greyscale or palette PNG."
    raise FolderError(message) from None
  values, counts = np.unique(label, return_counts=True)
  bad = (values >= num_classes) & (values != common.IGNORE_LABEL)
  if bad.any():
    listed = ", ".join(f"{v} ({c} px)" for v, c in zip(values[bad][:8].tolist(), counts[bad][:8].tolist()))
    raise FolderError(
        f"the mask {path} holds values {listed} outside the classes 0-{num_classes - 1} and 255 "
        f"(void): fix the mask, or the class list (classes.txt / --config.dataset.num_classes)"
    )
  if image_hw is not None and tuple(label.shape) != tuple(image_hw):
    raise FolderError(
        f"the mask {path} is {label.shape[0]}x{label.shape[1]} but its image {image_path} is "
        f"{image_hw[0]}x{image_hw[1]}: a mask must have its image's size"
    )
  return _map_255(label) if foreground_255 else label


def _map_255(label: np.ndarray) -> np.ndarray:
  """``foreground_255``: the void value 255 of a two-class 0/255 mask becomes class 1."""
  return np.where(label == common.IGNORE_LABEL, np.uint8(1), label)


def check_examples(splits: dict[str, list[Example]], class_names: list[str], foreground_255: bool = False) -> None:
  """Reads every mask and image header once and raises on the first bad mask (values, size) or image, then on
  mistakes of the masks as a whole (:func:`check_class_pixels`)."""
  raw = np.zeros(256, np.int64)  # pixels per value of every mask, as stored
  train = np.zeros(256, np.int64)  # of the train split's masks, after the foreground_255 mapping
  for split, examples in splits.items():
    for ex in examples:
      hw = _upright_size(ex.image)
      if ex.mask is not None:
        label = read_mask(ex.mask, len(class_names), hw, ex.image)
        raw += np.bincount(label.reshape(-1), minlength=256)
        if split == "train":
          train += np.bincount((_map_255(label) if foreground_255 else label).reshape(-1), minlength=256)
  check_class_pixels(raw, train, class_names, splits, foreground_255)


def check_class_pixels(
    raw: np.ndarray,
    train: np.ndarray,
    class_names: list[str],
    splits: dict[str, list[Example]],
    foreground_255: bool,
) -> None:
  """The masks' mistakes that no single mask shows, from pixel counts per value (``raw``: every mask as stored;
  ``train``: the train split's, after any mapping): 0/255 masks for a foreground class (:class:`BinaryMaskError`),
  ``foreground_255`` where it does not apply, and a class without training pixels (:class:`EmptyClassError`)."""
  ign = common.IGNORE_LABEL
  values = set(np.flatnonzero(raw).tolist())
  masks = os.path.dirname(splits["train"][0].mask) if splits.get("train") else "masks/"
  if foreground_255:
    if len(class_names) != 2:
      raise FolderError(
          f"foreground_255 maps the masks' 255 to class 1, for two classes (background, foreground), but the folder "
          f"has {len(class_names)}: drop the flag and write the class indices 0-{len(class_names) - 1} in the masks"
      )
    if 1 in values:
      raise FolderError(
          f"foreground_255 would turn the 255 (void) pixels of {masks} into class 1, but the masks already hold "
          "class 1: drop the flag (255 then stays void)"
      )
  elif len(class_names) >= 2 and values == {0, ign}:
    raise BinaryMaskError(
        f"every mask in {masks} holds only the values 0 and 255, but the classes are {', '.join(class_names)}: 255 "
        f"is void (never trained on, never scored), so {class_names[1]!r} (1) gets no pixel. Map 255 -> 1 in the "
        "masks (0/1 masks), or let preparing do it: --foreground_255 for dilaff_jax.datasets.prepare, "
        "--config.dataset.foreground_255=True for training"
    )
  empty = [f"{name!r} ({k})" for k, name in enumerate(class_names) if train[k] == 0]
  if empty:
    raise EmptyClassError(
        f"class(es) {', '.join(empty)} have no pixel in the {len(splits.get('train', ()))} training masks: the model "
        "cannot learn them. Add training images whose masks show them (or move some from splits/val.txt to "
        "splits/train.txt), or remove the class from classes.txt and renumber the masks"
    )


def fingerprint(folder: str | os.PathLike, num_classes: int = 0, foreground_255: bool = False) -> str:
  """A hex digest of the folder's absolute path and of every file's relative path, size and modification time
  (images/, masks/, splits/, classes.txt); ``num_classes`` counts when there is no ``classes.txt``, and
  ``foreground_255`` when set."""
  folder = os.path.abspath(os.fspath(folder))
  h = hashlib.sha256(f"{_FINGERPRINT_VERSION}\0{folder}\0".encode("utf-8"))
  if foreground_255:  # only when set: the copies prepared before the flag existed keep their fingerprint
    h.update(b"foreground_255\0")
  has_classes = os.path.isfile(os.path.join(folder, "classes.txt"))
  h.update(f"classes.txt\0{has_classes}\0{0 if has_classes else num_classes}\0".encode("utf-8"))
  for sub in ("images", "masks", "splits", "classes.txt"):
    path = os.path.join(folder, sub)
    paths = [path] if os.path.isfile(path) else []
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        paths.extend(os.path.join(root, name) for name in sorted(files))
    for p in paths:
      stat = os.stat(p)
      h.update(f"{os.path.relpath(p, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode("utf-8"))
  return h.hexdigest()


def prepared_data_dir(
    folder: str | os.PathLike | None,
    data_dir: str | os.PathLike | None,
    num_classes: int = 0,
    foreground_255: bool = False,
) -> str:
  """The TFDS ``data_dir`` of this folder's prepared copy: ``<data_dir>/image_folder_prepared/<name>-<fingerprint>``
  (``data_dir`` defaults to TFDS's, ``~/tensorflow_datasets``)."""
  folder = require_folder(folder)
  root = os.fspath(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  label = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder.rstrip(os.sep))) or "folder"
  return os.path.join(root, f"{NAME}_prepared", f"{label}-{fingerprint(folder, num_classes, foreground_255)[:16]}")


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A user's folder of images and masks (see the module docstring): splits ``train``, ``val`` (``unlabeled``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Give the folder as manual_dir: DIR/images/NAME.{jpg,jpeg,png}, DIR/masks/NAME.png (class indices, 255 = void),
  optional DIR/splits/{train,val,unlabeled}.txt and DIR/classes.txt.
  """

  def __init__(self, *, num_classes: int = 0, foreground_255: bool = False, **kwargs):
    self._num_classes = int(num_classes)  # used without classes.txt; 0 = classes.txt must exist
    self._foreground_255 = bool(foreground_255)  # 0/255 masks of two classes: 255 is class 1, not void
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="A user's images and class-index masks, prepared from a folder (manual_dir).",
        features=common.segmentation_features("png"),
        metadata=tfds.core.MetadataDict(),  # class names are known once the folder is read
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folder = require_folder(common.manual_dir_of(dl_manager))
    names = read_class_names(folder, self._num_classes)
    splits = scan(folder)
    check_examples(splits, names, self._foreground_255)
    self.info.metadata.update(common.class_metadata(names))
    self.info.metadata["source_folder"] = folder
    self.info.metadata["foreground_255"] = self._foreground_255
    return {
        split: self._generate_examples(examples=examples, num_classes=len(names)) for split, examples in splits.items()
    }

  def _generate_examples(self, examples: list[Example], num_classes: int):
    for ex in examples:
      image = read_rgb(ex.image)
      if ex.mask is None:
        label = np.full(image.shape[:2], common.IGNORE_LABEL, np.uint8)
      else:
        label = read_mask(ex.mask, num_classes, image.shape[:2], ex.image, self._foreground_255)
      yield ex.name, {
          "image": common.encode_rgb_png(image),
          "label": common.encode_label_png(label),
          "image_id": ex.name,
      }
