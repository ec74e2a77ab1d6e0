"""Prepares a dataset once (before a multi-host job, or to check the archives):

  python -m dilaff_jax.datasets.prepare --dataset=voc2012_aug --manual_dir=/data/voc_archives [--data_dir=DIR]
  python -m dilaff_jax.datasets.prepare --dataset=cityscapes19 --manual_dir=/data/cityscapes
  python -m dilaff_jax.datasets.prepare --dataset=synthetic_shapes/default
  python -m dilaff_jax.datasets.prepare --dataset=image_folder --manual_dir=my_data [--num_classes=N]
"""

from __future__ import annotations

import argparse
import sys

from dilaff_jax import cli, datasets, errors


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m dilaff_jax.datasets.prepare", description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True, help="synthetic_shapes/default, synthetic_shapes/tiny, voc2012_aug, "
                 "cityscapes19, image_folder")
  p.add_argument("--data_dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
  p.add_argument("--manual_dir", default=None, help="folder with the downloaded archives (image_folder: the folder)")
  p.add_argument("--num_classes", type=int, default=0, help="image_folder without classes.txt: number of classes")
  args = p.parse_args(argv)
  try:
    builder = datasets.get_builder(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                                   num_classes=args.num_classes)
  except (errors.UserError, FileNotFoundError) as e:
    if cli.wants_traceback():
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR
  for name, split in builder.info.splits.items():
    print(f"{builder.info.full_name} {name}: {split.num_examples} examples")
  print(f"prepared in {builder.data_dir}")
  if datasets.is_image_folder(args.dataset):
    print(f"classes: {', '.join(datasets.class_names(builder))}")
    # A complete command: the prepared copy is found only through its own data_dir (see image_folder.py).
    print(f"neighbour statistics (Fig. 3; optional, training computes its own): python -m dilaff_jax.stats "
          f"--dataset={args.dataset} --data_dir={builder.data_dir_root} --output=stats.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
