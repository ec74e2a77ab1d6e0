"""Prepares a dataset once (before a multi-host job, or to check the archives):

python -m dilaff_jax.datasets.prepare --dataset=voc2012_aug --manual_dir=/data/voc_archives [--data_dir=DIR]
python -m dilaff_jax.datasets.prepare --dataset=cityscapes19 --manual_dir=/data/cityscapes
python -m dilaff_jax.datasets.prepare --dataset=synthetic_shapes/default
python -m dilaff_jax.datasets.prepare --dataset=image_folder --manual_dir=my_data [--num_classes=N] [--foreground_255]

It prints the examples and pixels per class of each split (saved as class_pixels.json beside the prepared copy)
and a warning for an evaluation split of fewer than 20 images or one where a class has no pixel.
"""

from __future__ import annotations

import sys

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

from absl import flags  # noqa: E402

from dilaff_jax import datasets, errors  # noqa: E402
from dilaff_jax.datasets import input_pipeline  # noqa: E402
from dilaff_jax.method import conventions  # noqa: E402
from dilaff_jax.process import cli  # noqa: E402


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
      "dataset",
      None,
      "synthetic_shapes/default, synthetic_shapes/tiny, voc2012_aug, cityscapes19, " "image_folder",
      flag_values=fv,
  )
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default ~/tensorflow_datasets)", flag_values=fv)
  flags.DEFINE_string(
      "manual_dir", None, "folder with the downloaded archives (image_folder: the folder)", flag_values=fv
  )
  flags.DEFINE_integer("num_classes", 0, "image_folder without classes.txt: number of classes", flag_values=fv)
  flags.DEFINE_bool(
      "foreground_255",
      False,
      "image_folder with two classes whose masks are 0/255: 255 is the foreground (class 1), not void "
      "(training: --config.dataset.foreground_255=True)",
      flag_values=fv,
  )


LARGE_IMAGE_SIDE = (
    conventions.MAX_INFERENCE_SIDE
)  # longer sides beyond this get a warning (configs/default.py's dataset.eval_max_size)


def report_largest_images(builder) -> None:
  """Prints the largest image of each split, with a warning on stderr when its longer side exceeds
  :data:`LARGE_IMAGE_SIDE`: evaluation and prediction infer such images downscaled, and training scales them up to
  ``dataset.max_scale`` times before cropping."""
  for name in builder.info.splits:
    largest = input_pipeline.largest_example(builder, name)
    if largest is None:
      continue
    h, w, image_id = largest
    print(f"{builder.info.full_name} {name}: largest image {image_id} ({h}x{w})")
    if max(h, w) > LARGE_IMAGE_SIDE:
      print(
          f"warning: the {name} split's largest image {image_id} is {h}x{w} pixels, more than {LARGE_IMAGE_SIDE} a "
          f"side: evaluation and prediction infer such images downscaled to {LARGE_IMAGE_SIDE} a side "
          "(config.dataset.eval_max_size, predict --max_size), and training scales them up to "
          "config.dataset.max_scale times before cropping (slow, memory-hungry); downscale them if you do not need "
          "that resolution",
          file=sys.stderr,
      )


def main(argv=None) -> int:
  """Command line entry; returns the exit status (2 for a bad flag or archive, with one ``error:`` line)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = cli.parse_flags(_define_flags, argv, "dilaff_jax.datasets.prepare", __doc__, required=("dataset",))
    if args is None:  # --help
      return 0
    builder = datasets.get_builder(
        args.dataset,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        num_classes=args.num_classes,
        foreground_255=args.foreground_255,
    )
  except (errors.UserError, FileNotFoundError) as e:
    if cli.wants_traceback():
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  for name, split in builder.info.splits.items():
    print(f"{builder.info.full_name} {name}: {split.num_examples} examples")
  print(f"prepared in {builder.data_dir}")
  counts = datasets.class_pixels.load_or_count(builder)
  print(f"pixels per class and split ({datasets.class_pixels.FILENAME} there):")
  print(datasets.class_pixels.table(counts))
  for line in datasets.class_pixels.warnings(counts):
    print(f"warning: {line}")
  if datasets.is_image_folder(args.dataset):
    report_largest_images(builder)
    print(f"classes: {', '.join(datasets.class_names(builder))}")
    # A complete command: the prepared copy is found only through its own data_dir (see image_folder.py).
    print(
        f"neighbour statistics (Fig. 3; optional, training computes its own): python -m dilaff_jax.research.stats "
        f"--dataset={args.dataset} --data_dir={builder.data_dir_root} --output=stats.json"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
