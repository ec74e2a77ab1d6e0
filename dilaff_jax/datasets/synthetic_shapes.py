"""TFDS builder ``synthetic_shapes``: the embedded default dataset, generated locally without any download.

Scenes come from :mod:`dilaff_jax.datasets.shapes_render` (textured, overlapping objects of 5 classes on a textured
background, an ignore band along boundaries). Every scene is rendered from its own seed ``(config seed, split,
index)``, so preparing the dataset twice writes the same bytes. Configs:

- ``default``: 1000 train / 300 tune / 1000 test scenes, 176-256 px a side, for the CPU demonstration job. Its
  geometry is the paper's (VOC at crop 513) at half scale: rates, objects, crop and void band stand to each other as
  they do there (``docs/geometry.md``).
- ``tiny``: 24 train / 4 tune / 8 test scenes, 48-64 px a side, for tests (prepares in a few seconds).

Splits: ``train`` to train on, ``tune`` to choose loss weights and propagation settings on, ``test`` for the numbers
that are reported. No scene is in two splits (each split renders from its own seeds).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from dilaff_jax.datasets import common
from dilaff_jax.datasets import shapes_render

CLASS_NAMES = shapes_render.CLASS_NAMES

_SPLITS = ("train", "test", "tune")  # the index seeds the scenes: test renders as 1.0.0's validation did


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  """Size of a ``synthetic_shapes`` variant: scene counts, side-length range (px), objects per scene, texture scale
  (periods in px are multiplied by it), void band half-width (px), seed."""

  num_train: int = 0
  num_tune: int = 0
  num_test: int = 0
  min_size: int = 0
  max_size: int = 0
  max_objects: int = 4
  texture_scale: float = 1.0
  band_width: int = 1
  seed: int = 0


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """Textured overlapping shapes: 6 classes (background + 5), 255 along object boundaries."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "2.0.0": "train / tune / test splits; default at the paper's geometry halved (176-256 px, textures x2).",
  }
  BUILDER_CONFIGS = [
      SyntheticShapesConfig(
          name="default",
          description="1000 train / 300 tune / 1000 test scenes of 176-256 px.",
          num_train=1000,
          num_tune=300,
          num_test=1000,
          min_size=176,
          max_size=256,
          texture_scale=2.0,
          seed=0,
      ),
      SyntheticShapesConfig(
          name="tiny",
          description="24 train / 4 tune / 8 test scenes of 48-64 px, for tests.",
          num_train=24,
          num_tune=4,
          num_test=8,
          min_size=48,
          max_size=64,
          seed=1,
      ),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Synthetic scenes of overlapping textured shapes. A class is identified by the distribution of its "
            "texture and colour, which overlap between classes; pixels along boundaries are void (255)."
        ),
        features=common.segmentation_features("png"),
        metadata=common.class_metadata(CLASS_NAMES),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    counts = {"train": config.num_train, "tune": config.num_tune, "test": config.num_test}
    return {split: self._generate_examples(split=split, count=counts[split]) for split in _SPLITS}

  def _generate_examples(self, split: str, count: int):
    config = self.builder_config
    split_index = _SPLITS.index(split)
    for index in range(count):
      image, label = render(config, split_index, index)
      image_id = f"{split}_{index:05d}"
      yield image_id, {
          "image": common.encode_rgb_png(image),
          "label": common.encode_label_png(label),
          "image_id": image_id,
      }


def render(config: SyntheticShapesConfig, split_index: int, index: int) -> tuple[np.ndarray, np.ndarray]:
  """Scene ``index`` of split ``split_index`` (0 = train, 1 = test, 2 = tune): ``(image [H,W,3], label [H,W])``."""
  rng = np.random.default_rng((config.seed, split_index, index))
  height, width = (int(v) for v in rng.integers(config.min_size, config.max_size + 1, size=2))
  return shapes_render.render_scene(
      rng,
      height=height,
      width=width,
      max_objects=config.max_objects,
      band_width=config.band_width,
      texture_scale=config.texture_scale,
  )
