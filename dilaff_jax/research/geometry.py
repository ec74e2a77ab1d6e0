"""The geometry that decides how far a dilated-affinity pair reaches, measured on ``synthetic_shapes`` scenes and
set beside the paper's (PASCAL VOC at crop 513): rates against object size, image side, crop and the decoder's
stride-4 grid, and the void band against the smallest rate.

  python -m dilaff_jax.research.geometry            # the Markdown table of docs/geometry.md (renders 300 scenes)

Object size is the square root of the mean area of the visible objects (8-connected components of one non-background
class, void excluded, of at least 20 px); the image side is the geometric mean ``sqrt(H·W)``; the void band is its
width across a boundary (2 x the builder's ``band_width``). The paper's figures are constants below, with where they
come from.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from scipy import ndimage

from dilaff_jax import errors
from dilaff_jax.datasets import synthetic_shapes
from dilaff_jax.process import cli

MIN_OBJECT_PX = 20  # smaller components are slivers left between occluding objects, not objects
DECODER_STRIDE = 4  # DeepLabv3+'s decoder (and the affinity head) work at 1/4 of the input


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the ratios are made of, in pixels of the label map."""

  name: str
  smallest_rate: float
  largest_rate: float
  object_size: float  # sqrt of the mean visible object area
  image_side: float  # geometric mean of H and W
  crop: float
  band: float  # void band width across a boundary

  def ratios(self) -> dict[str, float]:
    return {
        "smallest rate / object size": self.smallest_rate / self.object_size,
        "largest rate / object size": self.largest_rate / self.object_size,
        "smallest rate / image side": self.smallest_rate / self.image_side,
        "largest rate / image side": self.largest_rate / self.image_side,
        "largest rate / crop": self.largest_rate / self.crop,
        f"smallest rate in stride-{DECODER_STRIDE} cells": self.smallest_rate / DECODER_STRIDE,
        f"largest rate in stride-{DECODER_STRIDE} cells": self.largest_rate / DECODER_STRIDE,
        "void band / smallest rate": self.band / self.smallest_rate,
    }


# PASCAL VOC 2012 at the paper's settings. Rates: R = {8, (12, 24), 16}. Images: most are 500 x 375 (longest side
# 500), sqrt(500 * 375) = 433. Objects: about 73% of VOC's labelled pixels are background and a segmentation image
# holds about 2.4 objects (6,929 in 2,913 images), so the mean object area is about 0.27 * 187,500 / 2.4 = 21,100 px,
# i.e. an object size of about 145 px (an estimate from those published totals; VOC itself is not read here). The
# void band along object outlines is about 5 px wide.
PAPER = Geometry("paper (VOC, crop 513)", 8, 24, 145.0, 433.0, 513, 5.0)


def object_sizes(label: np.ndarray, background: int = 0, ignore_label: int = 255) -> list[int]:
  """Areas (px) of the visible objects of one label map: 8-connected components of each class other than
  ``background`` and ``ignore_label``, of at least ``MIN_OBJECT_PX`` pixels."""
  areas = []
  for c in np.unique(label):
    if c in (background, ignore_label):
      continue
    components, n = ndimage.label(label == c, structure=np.ones((3, 3), bool))
    sizes = np.bincount(components.ravel())[1:]
    areas.extend(int(a) for a in sizes[sizes >= MIN_OBJECT_PX])
  return areas


def measure(
    scene_config: synthetic_shapes.SyntheticShapesConfig,
    name: str,
    rate_extent: tuple[float, float],
    crop: int,
    scenes: int,
) -> Geometry:
  """The geometry of ``scenes`` training scenes of ``scene_config`` whose rate set spans ``rate_extent``
  (its smallest and largest rate)."""
  config = scene_config
  areas, sides = [], []
  for index in range(scenes):
    _, label = synthetic_shapes.render(config, 0, index)
    areas.extend(object_sizes(label))
    sides.append(np.sqrt(label.shape[0] * label.shape[1]))
  return Geometry(
      name,
      rate_extent[0],
      rate_extent[1],
      float(np.sqrt(np.mean(areas))),
      float(np.mean(sides)),
      crop,
      2.0 * config.band_width,
  )


def table(geometries: list[Geometry]) -> str:
  """A Markdown table: the inputs, then each ratio with its factor against the first geometry's."""
  first = geometries[0]
  head = "| | " + " | ".join(g.name for g in geometries) + " |"
  lines = [head, "|---" * (len(geometries) + 1) + "|"]
  for label, attr in (
      ("rates (smallest, largest), px", None),
      ("object size, px", "object_size"),
      ("image side, px", "image_side"),
      ("crop, px", "crop"),
      ("void band, px", "band"),
  ):
    if attr is None:
      cells = [f"{g.smallest_rate:g}, {g.largest_rate:g}" for g in geometries]
    else:
      cells = [f"{getattr(g, attr):.0f}" for g in geometries]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  for key, ref in first.ratios().items():
    cells = [f"{ref:.3f}"] + [f"{g.ratios()[key]:.3f} ({g.ratios()[key] / ref:.2f}x)" for g in geometries[1:]]
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """Prints the table; it takes no flags (``--help`` prints this module's doc, anything else is one error line)."""
  try:
    if cli.parse_flags(lambda fv: None, argv, "dilaff_jax.research.geometry", __doc__) is None:
      return 0
  except errors.UserError as e:
    cli.exit_with_error(e)
  configs = {c.name: c for c in synthetic_shapes.SyntheticShapes.BUILDER_CONFIGS}
  old = dataclasses.replace(configs["default"], min_size=96, max_size=128, texture_scale=1.0)  # before 2026-12-05
  rows = [
      PAPER,
      measure(old, "old demo (96-128 px, crop 97)", (4, 12), 97, 300),
      measure(configs["default"], "demo (176-256 px, crop 257)", (4, 12), 257, 300),
  ]
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
