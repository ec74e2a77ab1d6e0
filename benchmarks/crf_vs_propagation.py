"""Time per image of the two post-processings the paper compares (Table 5): dense CRF vs affinity propagation.

Paper-sized case: one 513x513 image, 21 classes. Dense CRF: ``dilaff_jax.engine.crf.dense_crf`` (Krähenbühl & Koltun's
C++ mean-field, single-threaded, CPU; needs the optional package pydensecrf2) with its default parameters and 10
iterations, the whole call timed (input checks, unary, lattice build, inference). Affinity propagation (Eq. 6):
``dilaff_jax.method.propagation.propagate`` with R = {8, (12, 24), 16} (32 directions), λ = 6, 10 iterations, on arrays
already on the JAX device, compilation excluded. Both see the same probabilities: the softmax of smooth random
logits (a stride-8 map bilinearly upsampled, as a network's output would be). The CRF's cost depends on the image
(its permutohedral lattice grows with the number of distinct colours), so the image is a real photograph by
default: matplotlib's bundled sample ``grace_hopper.jpg`` resized to the crop size.

  .venv/bin/python benchmarks/crf_vs_propagation.py [--size 513] [--classes 21] [--iterations 10] [--repeats 5]
  (--only crf runs without JAX, e.g. in a venv that has just numpy, pillow and pydensecrf2)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

from dilaff_jax.engine import crf
from timing import best_and_median, interleaved, per_round, user_error  # benchmarks/timing.py (run from the repository root)


def photo(size: int) -> tuple[np.ndarray, str]:
  """A real RGB photo ``[size, size, 3]`` uint8 (matplotlib's sample), else a smooth synthetic scene."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)), "grace_hopper.jpg (matplotlib)"
  except (ImportError, OSError):
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    scene = np.stack([200 * xx, 120 + 100 * np.sin(6 * yy), 80 + 120 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1)], -1)
    return np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8), "synthetic (no matplotlib/pillow)"


def smooth_probs(size: int, classes: int, seed: int = 0) -> np.ndarray:
  """Softmax of random logits at stride 8, bilinearly upsampled to ``[size, size, classes]`` float32."""
  rng = np.random.default_rng(seed)
  coarse = 3.0 * rng.normal(size=((size - 1) // 8 + 1, (size - 1) // 8 + 1, classes))
  pos = np.arange(size) / 8.0
  i0 = np.minimum(np.floor(pos).astype(int), coarse.shape[0] - 2)
  f = (pos - i0)[:, None]
  rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # [size, coarse_w, C]
  logits = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # [size, size, C]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def crf_case(image: np.ndarray, probs: np.ndarray, iterations: int):
  return lambda: crf.dense_crf(image, probs, iterations=iterations)


def propagation_case(probs: np.ndarray, rates_text: str, iterations: int):
  """A call of ``propagate`` on device-resident inputs (compiled by the warm-up call), and a description of the
  device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dilaff_jax.method import affinity, propagation  # pylint: disable=import-outside-toplevel

  rates = affinity.parse_rates(rates_text)
  h, w, _ = probs.shape
  rng = np.random.default_rng(1)
  aff = propagation.steep_sigmoid(jnp.asarray(rng.normal(size=(1, h, w, 8 * len(rates))), jnp.float32))
  p = jnp.asarray(probs[None])
  device = f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}"
  return lambda: propagation.propagate(p, aff, rates, iterations=iterations), device


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=513)
  parser.add_argument("--classes", type=int, default=21)
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--rates", default="8,12x24,16")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--only", choices=("both", "crf", "propagation"), default="both")
  args = parser.parse_args()

  image, source = photo(args.size)
  probs = smooth_probs(args.size, args.classes)
  s, c, n = args.size, args.classes, args.iterations
  cases, where = {}, {}
  prop = f"affinity propagation (Eq. 6), R={args.rates}, λ=6"
  dense = "dense CRF (pydensecrf2), θγ=3 w2=3 θα=80 θβ=13 w1=10"
  if args.only in ("both", "propagation"):
    cases[prop], where[prop] = propagation_case(probs, args.rates, n)
  if args.only in ("both", "crf"):
    if not crf.available():
      user_error(crf.MISSING_MESSAGE)
    cases[dense], where[dense] = crf_case(image, probs, n), "CPU, 1 thread (C++)"
  t = interleaved(cases, args.repeats, lambda m: print(m, file=sys.stderr, flush=True))

  print(
      f"# post-processing time per image: {s}x{s}, {c} classes, {n} iterations; each method once per round, "
      f"{args.repeats} interleaved rounds after a warm-up, best (median); image: {source}; host: "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
  )
  print("| method | runs on | ms / image | × propagation, round by round |")
  print("|---|---|---|---|")
  for name, times in t.items():
    ratio = best_and_median(per_round(lambda a, b: a / b, times, t[prop]), digits=1) if prop in t else "n/a"
    print(f"| {name} | {where[name]} | {best_and_median(times, 1e3, 1)} | {ratio} |")


if __name__ == "__main__":
  main()
