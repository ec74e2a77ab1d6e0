"""What the three segmentation builders share: the feature layout, mask encoding and input checks.

Every builder stores examples as ``{"image": uint8 [H, W, 3], "label": uint8 [H, W, 1], "image_id": text}``.
``label`` holds the class index per pixel and ``IGNORE_LABEL`` (255) for void pixels (VOC's object-boundary band,
Cityscapes' unused classes). Masks are stored as single-channel ("L") PNGs so that decoding them with
``tf.io.decode_png(..., channels=1)`` returns the indices themselves. Class names, the number of classes and the
ignore label are stored in the dataset's metadata (``builder.info.metadata``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import zipfile
import zlib
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from dilaff_jax import errors
from dilaff_jax.method import conventions

IGNORE_LABEL = conventions.IGNORE_LABEL


class DataError(errors.UserError, ValueError):
  """A dataset file holds something unusable (a damaged archive, a bad label value, an image and label of different
  sizes); the message names the file and the values."""


# What tarfile, gzip, zipfile and zlib raise on a truncated, empty or corrupted archive.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError)


@contextlib.contextmanager
def damaged_archive(filename: str, path: str, source: str) -> Iterator[None]:
  """Turns a read error of the archive ``path`` (truncated, empty, corrupted) into a :class:`DataError` naming it
  and saying to download it again from ``source``."""
  try:
    yield
  except ARCHIVE_ERRORS as error:
    raise DataError(
        f"The archive {filename} ({path}) is damaged or incomplete ({type(error).__name__}: {error}); "
        f"download it again from {source} and replace it."
    ) from error


def segmentation_features(image_format: str) -> tfds.features.FeaturesDict:
  """The shared feature layout; ``image_format`` is how images are stored ("jpeg" or "png")."""
  return tfds.features.FeaturesDict(
      {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
          "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "image_id": tfds.features.Text(),
      }
  )


def class_metadata(class_names: Sequence[str]) -> tfds.core.MetadataDict:
  """Metadata saved with the prepared dataset: ``class_names``, ``num_classes`` and ``ignore_label``."""
  return tfds.core.MetadataDict(class_names=list(class_names), num_classes=len(class_names), ignore_label=IGNORE_LABEL)


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The class names stored with a prepared dataset (index = class id)."""
  metadata = builder.info.metadata
  if metadata is None or "class_names" not in metadata:
    raise ValueError(f"Dataset {builder.info.full_name} stores no class names in its metadata.")
  return list(metadata["class_names"])


def encode_label_png(label: np.ndarray) -> bytes:
  """Encodes a [H, W] uint8 class-index map as a single-channel ("L") PNG."""
  if label.ndim != 2 or label.dtype != np.uint8:
    raise ValueError(f"Expected a [H, W] uint8 label map, got {label.dtype} {label.shape}.")
  buffer = io.BytesIO()
  Image.fromarray(label, mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


def encode_rgb_png(image: np.ndarray) -> bytes:
  """Encodes a [H, W, 3] uint8 image as an RGB PNG."""
  buffer = io.BytesIO()
  Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
  return buffer.getvalue()


def read_index_png(data: bytes, name: str) -> np.ndarray:
  """Class indices of a palette ("P") or greyscale ("L") PNG mask, read with Pillow.

  Pillow keeps palette indices (``tf.io.decode_png(channels=1)`` would return brightness instead).
  ``name`` names the file in error messages.
  """
  try:
    with Image.open(io.BytesIO(data)) as mask:
      mode = mask.mode
      indices = np.asarray(mask)
  except Exception as error:  # Pillow raises several types for corrupt files.
    raise DataError(f"Cannot read the label mask {name}: {error}") from error
  if mode not in ("P", "L"):
    raise DataError(
        f"The label mask {name} has Pillow mode {mode!r}; expected a palette ('P') or greyscale ('L') PNG of "
        "class indices."
    )
  return indices.astype(np.uint8)


def image_size(data: bytes, name: str) -> tuple[int, int]:
  """(height, width) of an encoded image after fully decoding it; names ``name`` if it cannot be read."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      width, height = image.size
  except Exception as error:  # Pillow raises several types for corrupt files.
    raise DataError(f"Cannot read the image {name}: {error}") from error
  return height, width


def check_same_size(image_hw: tuple[int, int], label: np.ndarray, image_name: str, label_name: str) -> None:
  """Raises if an image and its label map differ in size."""
  if tuple(label.shape[:2]) != tuple(image_hw):
    raise DataError(
        f"The image {image_name} is {image_hw[0]}x{image_hw[1]} but its label {label_name} is "
        f"{label.shape[0]}x{label.shape[1]}."
    )


def require_archive(manual_dir: os.PathLike | str, filename: str, source: str) -> str:
  """Path of ``manual_dir/filename``; a missing file raises naming the file, the directory and where to get it."""
  path = os.path.join(os.fspath(manual_dir), filename)
  if not os.path.isfile(path):
    raise errors.MissingFileError(
        f"Missing archive {filename!r}: expected it at {path} (the TFDS manual_dir is {manual_dir}). "
        f"Get it from {source} and place it there unchanged."
    )
  return path


def manual_dir_of(dl_manager: tfds.download.DownloadManager) -> str:
  """The manual directory without TFDS's own check (which would hide which archive is missing)."""
  manual_dir = getattr(dl_manager, "_manual_dir", None)
  if manual_dir is None:
    return os.fspath(dl_manager.manual_dir)  # TFDS raises its own message naming the instructions.
  return os.fspath(manual_dir)
