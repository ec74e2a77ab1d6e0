"""Writes an example of a user's own data folder: rendered scenes in the layout ``dilaff_jax.datasets.image_folder``
reads, to try "Train on your own data" end to end without a dataset to download.

  python docs/own_data/make_example_folder.py --output my_data --count 48

  my_data/images/scene_NNN.jpg   RGB JPEG (quality 92); two of them (scene_001, scene_002) are PNGs, to use both
  my_data/masks/scene_NNN.png    palette PNG whose indices are the classes (VOC style), 255 = void
  my_data/classes.txt            the 6 class names of the embedded ``synthetic_shapes`` scenes, one a line

No ``splits/`` folder: preparing sends 1 image in 10 to ``val`` by a hash of its name. The scenes are those of the
project's numpy renderer (``dilaff_jax/datasets/shapes_render.py``), 100-130 px a side, 1-4 objects each; scene ``i``
depends only on ``(seed, i)``, so a larger ``--count`` keeps the first scenes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dilaff_jax.engine import visualize  # noqa: E402  (the repository root is put on the path above)
from dilaff_jax.datasets import shapes_render  # noqa: E402

MIN_SIZE, MAX_SIZE = 100, 130  # side lengths (px), the size configs/image_folder.py:small is made for
MAX_OBJECTS = 4
JPEG_QUALITY = 92
PNG_IMAGES = (1, 2)  # scene indices written as PNG instead of JPEG


def write_scene(folder: str, index: int, seed: int) -> str:
  """Renders scene ``index`` and writes its image and palette mask under ``folder``; returns the image's file name."""
  rng = np.random.default_rng((seed, index))
  height, width = (int(v) for v in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
  image, label = shapes_render.render_scene(rng, height=height, width=width, max_objects=MAX_OBJECTS)
  name = f"scene_{index:03d}"
  if index in PNG_IMAGES:
    image_file = name + ".png"
    Image.fromarray(image, "RGB").save(os.path.join(folder, "images", image_file))
  else:
    image_file = name + ".jpg"
    Image.fromarray(image, "RGB").save(os.path.join(folder, "images", image_file), quality=JPEG_QUALITY)
  mask = Image.fromarray(label, "P")
  mask.putpalette(visualize.voc_palette(256).reshape(-1).tolist())
  mask.save(os.path.join(folder, "masks", name + ".png"))
  return image_file


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", required=True, help="folder to write (created; existing scenes are overwritten)")
  parser.add_argument("--count", type=int, default=48, help="number of scenes")
  parser.add_argument("--seed", type=int, default=0, help="seed of the scenes")
  args = parser.parse_args(argv)
  if args.count < 1:
    parser.error(f"--count={args.count}: give at least 1 scene")
  os.makedirs(os.path.join(args.output, "images"), exist_ok=True)
  os.makedirs(os.path.join(args.output, "masks"), exist_ok=True)
  with open(os.path.join(args.output, "classes.txt"), "w") as f:
    f.write("\n".join(shapes_render.CLASS_NAMES) + "\n")
  for index in range(args.count):
    write_scene(args.output, index, args.seed)
  print(f"{args.count} scenes ({len(shapes_render.CLASS_NAMES)} classes) written to {args.output}")


if __name__ == "__main__":
  main()
