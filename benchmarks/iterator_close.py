"""The demo's evaluation with tf.data's autotuning on and off: what closing an old input iterator costs.

With autotuning on, deleting a tf.data iterator waits for the autotuner's background thread, which sleeps between
rounds for a period that grows with the iterator's age (``dilaff_jax/datasets/tfdata.py``); at the end of an
evaluation, while XLA's threads keep the cores busy, that wait was measured at 40-58 s. This times the demo's whole
evaluation (``configs/synthetic.py``, its 300 tune scenes, a freshly initialised model: the same program and cost as
a trained one) both ways, alternating in one process, and prints the ratio.

  python benchmarks/iterator_close.py [--rounds 1] [--max_images 0]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dilaff_jax.process import tf_env  # noqa: E402

tf_env.set_defaults()

import jax  # noqa: E402

from configs import synthetic  # noqa: E402
from dilaff_jax import evaluate  # noqa: E402
from dilaff_jax.datasets import tfdata  # noqa: E402
from dilaff_jax.engine import run_spec  # noqa: E402
from dilaff_jax.engine import train_state as state_lib  # noqa: E402


def one_pass(autotune: bool, max_images: int) -> tuple[int, float]:
  """``(images, seconds)`` of the demo's evaluation on its tune split (a freshly initialised demo model: the same
  program and cost as a trained one), its input read with tf.data's autotuning on or off."""
  config = synthetic.get_config()
  config.dataset.eval_split = "tune"
  config.eval.max_images = max_images
  spec = run_spec.derive(config)
  state = state_lib.create_train_state(spec, state_lib.build_model(spec), jax.random.key(0))
  original = tfdata.without_autotune
  if autotune:  # the pipelines always switch it off: undo that for this pass
    tfdata.without_autotune = lambda dataset: dataset
  try:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
      results = evaluate.evaluate_state(spec, "", state, report=False)
    seconds = time.perf_counter() - start
  finally:
    tfdata.without_autotune = original
  return results["num_images"], seconds


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--max_images", type=int, default=0, help="the first N tune scenes (0: all 300)")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.max_images < 0:
    parser.error("--rounds must be >= 1 and --max_images >= 0")
  rows = []
  for r in range(args.rounds):
    for autotune in (True, False):
      images, seconds = one_pass(autotune, args.max_images)
      rows.append((seconds, images))
      print(f"round {r}, autotune {'on' if autotune else 'off'}: {images} images in {seconds:.1f} s", flush=True)
  print(f"\nThe demo's evaluation of {images} tune scenes, {jax.device_count()} device(s)\n")
  print("| round | autotune on | autotune off | on / off |")
  print("| ---: | ---: | ---: | ---: |")
  for r in range(args.rounds):
    (on, _), (off, _) = rows[2 * r : 2 * r + 2]
    print(f"| {r} | {on:.1f} s | {off:.1f} s | {on / off:.2f}x |")


if __name__ == "__main__":
  main(sys.argv[1:])
