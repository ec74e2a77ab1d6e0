"""Where an evaluation's time goes: the parts of one evaluation batch of the demo (``configs/synthetic.py``), each
timed alone, as shares of their sum.

The parts are what ``dilaff_jax.evaluate.eval_step`` computes per batch: the network at the evaluation's output
stride (``inference.predict_as_configured``: logits and affinities upsampled to the image, steep sigmoid), the
propagation sweep with the predicted affinity (0, 1, 3, 6, 10 iterations, each count continuing from the last),
the same sweep with the ground-truth affinity (the oracle rows, its ``gt_affinity`` included), Fig. 4's affinity
accuracy counts, and one confusion matrix. The network has random weights (its time does not depend on them);
every part runs once per round, in interleaved rounds, so a change in the machine's load falls on all of them.

  .venv/bin/python benchmarks/evaluation.py [--batch 10] [--size 257] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from timing import best_and_median, interleaved, pin_threads, user_error  # benchmarks/timing.py

THREADS = pin_threads(sys.argv[1:])  # before JAX starts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import synthetic  # noqa: E402
from dilaff_jax.engine import eval_metrics, inference, run_spec, train_state  # noqa: E402
from dilaff_jax.method import affinity, propagation  # noqa: E402


def parts(batch: int, size: int) -> tuple[dict, str]:
  """The timed cases (name -> call) of one evaluation batch of ``batch`` images of ``size`` px, and a description."""
  config = synthetic.get_config()
  config.dataset.eval_pad_size = (size, size)
  spec = run_spec.derive(config)
  rates, lam, c = spec.rates, config.affinity.lam, config.dataset.num_classes
  ign = config.dataset.ignore_label
  model = train_state.build_model(spec, axis_name=None)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  stripes = (np.arange(size)[None, :, None] // 24 + np.arange(size)[None, None, :] // 40) % c  # regions of 24-40 px
  labels = jnp.asarray(np.broadcast_to(stripes, (batch, size, size)), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), images[:1])
  predict = jax.jit(lambda v, x: inference.predict_as_configured(model.apply, v, x, spec, (size, size)))
  probs, aff = predict(variables, images)
  full = jnp.full((batch,), size)
  inside = inference.inside_mask(full, full, (size, size), rates)
  counts = tuple(sorted(config.eval.iterations))

  def sweep(p, a):  # as eval_step: the class map after every count
    return [jnp.argmax(q, -1) for q in propagation.sweep(p, a, rates, counts, lam=lam).values()]

  predicted = jax.jit(lambda p, a: sweep(p, a * inside))
  oracle = jax.jit(lambda p, lb: sweep(p, propagation.gt_affinity(lb, rates, ign)))
  fig4 = jax.jit(  # from the logits' sign, as eval_step
      lambda a, lb: affinity.affinity_accuracy_counts(
          jnp.where(a > 0.5, 1.0, -1.0), lb, rates, ign, config.affinity.partial_neighbors
      )
  )
  confusion = jax.jit(lambda lb, p: eval_metrics.confusion_matrix(lb, jnp.argmax(p, -1), c, lb != ign))
  cases = {
      f"network at output stride {config.eval.output_stride} (+ upsampling, Eq. 7)": lambda: predict(variables, images),
      f"predicted-affinity sweep {counts}": lambda: predicted(probs, aff),
      "ground-truth sweep (with gt_affinity)": lambda: oracle(probs, labels),
      "Fig. 4 affinity accuracy counts": lambda: fig4(aff, labels),
      "one confusion matrix": lambda: confusion(labels, probs),
  }
  what = (
      f"{batch} images of {size}x{size}, {c} classes, R={list(rates)}, ResNet-{config.model.depth} "
      f"(configs/synthetic.py), {jax.devices()[0].platform}, {THREADS or len(os.sched_getaffinity(0))} core(s)"
  )
  return cases, what


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=10, help="images per batch (the demo's eval.batch_size)")
  parser.add_argument("--size", type=int, default=257, help="image side (the demo's crop)")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--threads", type=int, default=None, help="run on the first N allowed cores")
  args = parser.parse_args()
  for name in ("batch", "size", "repeats"):
    if getattr(args, name) < 1:
      user_error(f"--{name}={getattr(args, name)}: expected a positive integer")
  cases, what = parts(args.batch, args.size)
  t = interleaved(cases, args.repeats, lambda m: print(m, file=sys.stderr, flush=True))
  total = sum(min(v) for v in t.values())
  print(f"# evaluation batch, part by part: {what}; best (median) of {args.repeats} interleaved rounds")
  print("| part | ms per batch | ms per image | share of the sum of bests |")
  print("|---|---|---|---|")
  for name, times in t.items():
    per_image = best_and_median([x / args.batch for x in times], 1e3, 1)
    print(f"| {name} | {best_and_median(times, 1e3, 1)} | {per_image} | {min(times) / total:.1%} |")
  print(f"| sum | {1e3 * total:.1f} | {1e3 * total / args.batch:.1f} | 100% |")


if __name__ == "__main__":
  main()
