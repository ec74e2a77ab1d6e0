"""Segmentation datasets as TFDS builders; importing this package registers them with TFDS.

- ``synthetic_shapes`` (configs ``default``, ``tiny``): the embedded default, generated locally.
- ``voc2012_aug``: PASCAL VOC 2012 + SBD, splits ``train_aug`` / ``val``, from manual archives.
- ``cityscapes19``: Cityscapes fine labels as 19 train ids, splits ``train`` / ``validation``, from manual archives.
- ``image_folder``: a user's folder of images and masks (``manual_dir``), splits ``train`` / ``val``; each folder has
  its own prepared copy (see :func:`location`).

All share the features ``{"image": uint8 [H,W,3], "label": uint8 [H,W,1] (255 = void), "image_id": text}`` and
store ``class_names`` / ``num_classes`` / ``ignore_label`` in ``builder.info.metadata``.
"""

from __future__ import annotations

import contextlib
import errno
import os

import tensorflow_datasets as tfds

from dilaff_jax import errors
from dilaff_jax.process import files
from dilaff_jax.datasets import cityscapes, class_pixels, image_folder, shapes_render, voc2012_aug
from dilaff_jax.datasets.cityscapes import Cityscapes19
from dilaff_jax.datasets.common import IGNORE_LABEL, DataError, class_names
from dilaff_jax.datasets.image_folder import ImageFolder
from dilaff_jax.datasets.synthetic_shapes import SyntheticShapes
from dilaff_jax.datasets.voc2012_aug import Voc2012Aug

__all__ = [
    "Cityscapes19",
    "DataError",
    "IGNORE_LABEL",
    "ImageFolder",
    "SyntheticShapes",
    "Voc2012Aug",
    "class_names",
    "class_pixels",
    "dataset_class_names",
    "get_builder",
    "is_image_folder",
    "known_names",
    "location",
    "resolve_num_classes",
    "split_warnings",
]

# builder name -> (its class names, its config names)
_DATASETS = {
    builder.name: (names, tuple(c.name for c in builder.BUILDER_CONFIGS or ()))
    for builder, names in (
        (SyntheticShapes, shapes_render.CLASS_NAMES),
        (Voc2012Aug, voc2012_aug.CLASS_NAMES),
        (Cityscapes19, cityscapes.CLASS_NAMES),
    )
}


def known_names() -> list[str]:
  """The dataset names this project provides (``dataset.name`` values), e.g. ``synthetic_shapes/tiny``."""
  return [
      f"{name}/{c}" if len(configs) > 1 else name
      for name, (_, configs) in _DATASETS.items()
      for c in (configs if len(configs) > 1 else ("",))
  ] + [image_folder.NAME]


def dataset_class_names(name: str) -> tuple[str, ...]:
  """The class names of the dataset ``name`` (``builder[/config][:version]``) without preparing it; a name that is
  not one of :func:`known_names` raises :class:`errors.UserError` listing them. None for ``image_folder``, whose
  classes come from the user's folder (:func:`resolve_num_classes`)."""
  if is_image_folder(name):
    return None
  builder, _, config = name.partition(":")[0].partition("/")
  if builder not in _DATASETS or (config and config not in _DATASETS[builder][1]):
    raise errors.UserError(f"dataset {name!r} is not one of this project's datasets ({', '.join(known_names())})")
  return tuple(_DATASETS[builder][0])


def is_image_folder(name: str) -> bool:
  return name.split("/")[0].split(":")[0] == image_folder.NAME


def resolve_num_classes(dataset_cfg) -> None:
  """Sets ``dataset_cfg.num_classes`` from the folder's ``classes.txt`` when it is 0 for ``image_folder`` (the
  config's way of saying "as many as the folder names"); checks the two agree when both are given."""
  if is_image_folder(dataset_cfg.name):
    names = image_folder.read_class_names(
        image_folder.require_folder(dataset_cfg.get("manual_dir")), dataset_cfg.num_classes
    )
    dataset_cfg.num_classes = len(names)


def location(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    num_classes: int = 0,
    foreground_255: bool = False,
) -> tuple[str, str | None]:
  """``(name, data_dir)`` where ``tfds.builder`` finds the prepared dataset: unchanged, except for
  ``image_folder``, whose copy of the folder ``manual_dir`` lives in a data_dir of its own (keyed by the folder's
  path and contents; ``num_classes`` names the classes when the folder has no ``classes.txt``; ``foreground_255``
  maps its masks' 255 to class 1). ``foreground_255`` for another dataset is a :class:`errors.UserError`."""
  if is_image_folder(name):
    return name, image_folder.prepared_data_dir(manual_dir, data_dir, num_classes, foreground_255)
  if foreground_255:
    raise errors.UserError(
        f"foreground_255 (dataset.foreground_255) maps the 255 of an image folder's 0/255 masks to class 1; "
        f"{name} is not an image folder: drop it"
    )
  return name, os.fspath(data_dir) if data_dir is not None else None


def get_builder(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    prepare: bool = True,
    num_classes: int = 0,
    foreground_255: bool = False,
) -> tfds.core.DatasetBuilder:
  """The TFDS builder ``name`` (e.g. ``"synthetic_shapes/tiny"``), prepared in ``data_dir`` if ``prepare``.

  Preparing is a no-op once the dataset exists. ``manual_dir`` is where ``voc2012_aug`` and ``cityscapes19`` look
  for their archives (TFDS's default: ``<data_dir>/downloads/manual``) and the folder of ``image_folder``, which
  takes ``num_classes`` when the folder has no ``classes.txt`` and ``foreground_255`` (see :func:`location`).
  Preparing also writes the pixels per class and split beside the copy (:mod:`class_pixels`). Processes of one
  machine that prepare the same dataset at once take turns (a lock file beside it); in a multi-host job prepare
  once, before the hosts start reading.
  """
  dataset_class_names(name)  # an unknown name is named here, not by TFDS's list of every dataset it has
  name, data_dir = location(
      name, data_dir=data_dir, manual_dir=manual_dir, num_classes=num_classes, foreground_255=foreground_255
  )
  kwargs = {"num_classes": num_classes, "foreground_255": foreground_255} if is_image_folder(name) else {}
  builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  if not prepare:
    return builder
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
  # Processes that prepare the same dataset at once (a study's --jobs, two trainings) take turns: the second would
  # otherwise fail to rename its finished copy onto the first's. It then finds the dataset prepared.
  version_dir = os.fspath(builder.data_dir)
  lock = os.path.join(os.path.dirname(version_dir), f".{os.path.basename(version_dir)}.prepare.lock")
  with files.taking_turns(lock) if "://" not in version_dir else contextlib.nullcontext():
    builder = tfds.builder(name, data_dir=data_dir, **kwargs)  # again: its info as the turn before left it
    try:
      builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # noqa: BLE001  (a full disk reaches us wrapped in TFDS's or TensorFlow's errors)
      cause = _disk_error(e)
      if cause is None:
        raise
      raise errors.UserError(
          f"preparing {name} in {builder.data_dir} failed: {cause} ({files.free_space(os.fspath(builder.data_dir))}); "
          "free disk space (or give --data_dir / dataset.data_dir on another disk) and rerun: TFDS keeps unfinished "
          "files under an 'incomplete' name, so nothing half-written is read as the dataset"
      ) from e
    class_pixels.load_or_count(builder)
  return builder


def split_warnings(builder: tfds.core.DatasetBuilder, eval_split: str | None = None) -> list[str]:
  """The warnings of a prepared dataset's pixel counts (:func:`class_pixels.warnings`) for ``eval_split``, or for
  every split an evaluation may use."""
  return class_pixels.warnings(class_pixels.load_or_count(builder), None if eval_split is None else [eval_split])


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _disk_error(error: BaseException) -> str | None:
  """``"[Errno N] text"`` of the full disk, quota, read-only filesystem or permission error anywhere in
  ``error``'s chain (TFDS wraps it, e.g. "Failed to finalize writing of split"), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
      return f"[Errno {error.errno}] {error.strerror}"
    if "No space left on device" in str(error):
      return f"[Errno {errno.ENOSPC}] No space left on device"
    error = error.__cause__ or error.__context__
  return None


def config_class_names(dataset_cfg) -> list[str]:
  """The class names of a run's ``config.dataset`` (an image folder's ``classes.txt``, or the prepared dataset's
  metadata). Raises :class:`errors.UserError`, ``ValueError`` or ``OSError`` when the dataset is not at hand."""
  d = dataset_cfg
  if is_image_folder(d.name):
    return image_folder.read_class_names(image_folder.require_folder(d.get("manual_dir")), d.num_classes)
  builder = get_builder(
      d.name, data_dir=d.get("data_dir"), manual_dir=d.get("manual_dir"), prepare=False, num_classes=d.num_classes
  )
  if not builder.is_prepared():
    raise errors.MissingFileError(f"dataset {d.name!r} is not prepared in data_dir={builder.data_dir!r}")
  return class_names(builder)
