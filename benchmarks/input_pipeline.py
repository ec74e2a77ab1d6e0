"""Training input throughput at the VOC crop (513): is the input pipeline ever the bottleneck?

Writes a fake ``voc2012_aug`` in the real archive layout (VOC-sized JPEGs: synthetic_shapes scenes upscaled to
about 500 x 375), prepares it, and times the training pipeline (decode, scale 0.5-2.0, pad, crop 513, flip,
normalise, batch) on this machine. Prints a Markdown table of examples per second per batch size.

  python benchmarks/input_pipeline.py [--num_images 96] [--batch_sizes 1,4,8] [--steps 15]

The last column is the model's training-step rate at the same batch size: fill in ``model_steps_per_second``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # fake_archives: the archive writers the tests use
sys.path.insert(0, REPO)

import fake_archives  # noqa: E402
from dilaff_jax import datasets  # noqa: E402
from dilaff_jax.datasets import input_pipeline  # noqa: E402
from dilaff_jax.datasets import shapes_render  # noqa: E402


def model_steps_per_second(batch_size: int, crop_size: int) -> float | None:
  """HOOK (lead): the model's training steps per second at this batch and crop on this machine, or None.

  The table prints it next to the input rate (as examples/s = steps/s * batch) so the README can say whether the
  input pipeline limits training.

  Measured here with ``benchmarks/train_step.py``: the paper's ResNet-101 DeepLabv3+ with the affinity head, one
  real ``train_step`` under ``jax.pmap`` on 1 device, best of 2 timed steps (it compiles the model once per batch
  size, ~1-2 min each on CPU).
  """
  from benchmarks import train_step  # local: only this column needs the model (and its compile time)

  return train_step.model_steps_per_second(batch_size, crop_size)


def voc_sized_fake(rng: np.random.Generator, num_images: int) -> fake_archives.FakeVoc:
  """A fake VOC + SBD whose images are synthetic scenes upscaled 4x to VOC's ~500 x 375, stored as JPEG."""
  ids = [f"2008_{i:06d}" for i in range(num_images)]
  jpegs, images, voc_masks, sbd_masks = {}, {}, {}, {}
  for image_id in ids:
    height, width = (94, 125) if rng.uniform() < 0.7 else (125, 94)
    image, label = shapes_render.render_scene(rng, height=height, width=width, max_objects=4)
    image = np.kron(image, np.ones((4, 4, 1), np.uint8))
    label = np.kron(label, np.ones((4, 4), np.uint8))
    label[label == 255] = 0
    label = np.where(label > 0, label + 5, 0).astype(np.uint8)  # VOC class ids 6-10
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    jpegs[image_id], images[image_id] = buffer.getvalue(), image
    voc_masks[image_id] = shapes_render.boundary_band(label, 2)
    sbd_masks[image_id] = label
  half = num_images // 2
  return fake_archives.FakeVoc(
      voc_train=ids[:half],
      voc_val=ids[-8:],
      sbd_train=ids[half:],
      sbd_val=[],
      jpegs=jpegs,
      images=images,
      voc_masks=voc_masks,
      sbd_masks=sbd_masks,
  )


def prepare(workdir: str, num_images: int):
  manual = os.path.join(workdir, "manual")
  os.makedirs(manual, exist_ok=True)
  fake = voc_sized_fake(np.random.default_rng(0), num_images)
  fake_archives.write_voc_tar(os.path.join(manual, "VOCtrainval_11-May-2012.tar"), fake)
  fake_archives.write_aug_zip(os.path.join(manual, "SegmentationClassAug.zip"), fake)
  return datasets.get_builder("voc2012_aug", data_dir=os.path.join(workdir, "tfds"), manual_dir=manual)


def examples_per_second(builder, batch_size: int, steps: int, crop: int) -> float:
  batches = input_pipeline.train_iterator(
      builder,
      split="train_aug",
      crop_size=crop,
      local_device_count=1,
      per_device_batch=batch_size,
      seed=0,
      num_classes=21,
      process_index=0,
      process_count=1,
  )
  next(batches)  # warm-up: graph tracing, thread pools
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=96)
  parser.add_argument("--batch_sizes", default="1,4,8")
  parser.add_argument("--steps", type=int, default=15)
  parser.add_argument("--crop", type=int, default=513)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    builder = prepare(workdir, args.num_images)
    print(
        f"Prepared a fake voc2012_aug of {builder.info.splits['train_aug'].num_examples} VOC-sized train images "
        f"in {time.perf_counter() - start:.1f}s on {os.cpu_count()} CPU cores.\n"
    )
    print("| batch | crop | input examples/s | input ms/batch | model examples/s (hook) |")
    print("|------:|-----:|-----------------:|---------------:|------------------------:|")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
      rate = examples_per_second(builder, batch_size, args.steps, args.crop)
      model = model_steps_per_second(batch_size, args.crop)
      model_cell = "n/a" if model is None else f"{model * batch_size:.2f}"
      print(f"| {batch_size} | {args.crop} | {rate:.1f} | {1000 * batch_size / rate:.0f} | {model_cell} |", flush=True)


if __name__ == "__main__":
  main()
