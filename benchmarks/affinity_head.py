"""Cost of the affinity head's full-resolution part in training, against its naive formulation, in one run.

The part of the training step the dilated-affinity head adds at the label resolution: upsampling the stride-4
affinity logits (8·|R| channels) to the crop, the targets (Eq. 1), the weighted focal loss (Eq. 4–5) and the
logged accuracy, forward and backward with respect to the stride-4 logits. Two formulations, timed in turn
(A, B, A, B, ...) on the same inputs:

- this project's (``affinity_loss_terms`` with ``upsample=upsample_logits``): targets packed one byte per pixel and
  rate, loss, gradient and accuracy from one exp and one log1p per element in one pass, one image at a time, the
  gradient pulled back to stride 4 in the forward pass (only it is kept for the backward pass);
- the unpacked form it replaced (2026-11-27 to 2026-12-06): ``upsample_logits``, rolled targets stacked to
  ``8·|R|`` channels, categories, a weight lookup, the focal loss with its gradient written out, the accuracy
  from the targets again;
- the naive one before that (kept as the reference): upsampling with gathers (their gradient is a scatter-add),
  the focal loss differentiated automatically, the accuracy grouped by n_k.

Printed per batch size: the best and median time, XLA's ``memory_analysis()`` temporaries and
``cost_analysis()`` bytes accessed, the number of gathers and scatters in the compiled program, the ratios, and a
memory-traffic floor: reading the upsampled logits and the labels once and writing the logits' gradient once, at
the copy bandwidth measured in the same run (``propagation.device_copy_bandwidth``: numpy on a CPU, a jitted
copy in device memory on a GPU). Both formulations give the same loss and accuracy, and gradients equal to float32 rounding (checked).

  .venv/bin/python benchmarks/affinity_head.py [--size 513] [--batches 1,2] [--repeats 7]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.method import affinity
from dilaff_jax.models import deeplab
from dilaff_jax.process import host_memory
from propagation import device_copy_bandwidth  # benchmarks/propagation.py (run as python benchmarks/affinity_head.py)
from timing import best_and_median, interleaved, per_round  # benchmarks/timing.py
from train_step import PAPER_RATES, made_up_stats


def naive_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Aligned bilinear upsampling with gathers (the gradient of a gather is a scatter-add)."""
  return deeplab.resize_bilinear(x, size, gather=True)


def naive_focal(logits: jax.Array, targets: jax.Array, gamma: float) -> jax.Array:
  """Eq. 4 with the gradient left to automatic differentiation."""
  z = jnp.where(targets > 0.5, logits, -logits)
  return jnp.exp(gamma * jax.nn.log_sigmoid(-z)) * -jax.nn.log_sigmoid(z)


def naive_part(logits4, labels, rates, stats, gamma=2.0):
  size = labels.shape[1:]
  logits = naive_resize(logits4, size)
  targets, valid = affinity.affinity_targets(labels, rates)
  b, h, w, _ = targets.shape
  shape5 = (b, h, w, len(rates), affinity.DIRECTIONS_PER_RATE)
  fl = jnp.where(valid, naive_focal(logits, targets, gamma), 0.0).reshape(shape5).sum(-1)
  table = jnp.asarray(affinity.neighbor_weights(stats.freq, "sqrt"))
  k = affinity.neighbor_categories(targets, valid, len(rates), stats.partial_neighbors)
  total = (table[jnp.arange(len(rates)), jnp.maximum(k, 0)] * fl).sum()
  correct, count = affinity.affinity_accuracy_counts(logits, labels, rates)
  return total / jnp.sum(labels != 255), (correct.sum(), count.sum())


def unpacked_part(logits4, labels, rates, stats, gamma=2.0):
  logits = deeplab.upsample_logits(logits4, labels.shape[1:])
  targets, valid = affinity.affinity_targets(labels, rates)
  b, h, w, _ = targets.shape
  shape5 = (b, h, w, len(rates), affinity.DIRECTIONS_PER_RATE)
  fl = jnp.where(valid, affinity.focal_loss(logits, targets, gamma), 0.0).reshape(shape5).sum(-1)
  table = jnp.asarray(affinity.neighbor_weights(stats.freq, "sqrt"))
  k = affinity.neighbor_categories(targets, valid, len(rates), stats.partial_neighbors)
  total = (table[jnp.arange(len(rates)), jnp.maximum(k, 0)] * fl).sum()
  return total / jnp.sum(labels != 255), affinity.affinity_accuracy_total(logits, labels, rates)


def project_part(logits4, labels, rates, stats):
  total, n, correct, valid = affinity.affinity_loss_terms(
      logits4, labels, rates, stats, "sqrt", 2.0, upsample=deeplab.upsample_logits
  )
  return total / n, (correct, valid)


def compiled(fn, *args):
  """``fn``'s value and gradient with respect to its first argument, compiled for ``args`` (all of them jit
  arguments: labels closed over as constants would let XLA fold the targets away at compile time)."""
  c = jax.jit(jax.value_and_grad(fn, has_aux=True)).lower(*args).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = c.as_text()
  return c, {
      "temp MiB": c.memory_analysis().temp_size_in_bytes / 2**20,
      "bytes accessed MiB": float(cost.get("bytes accessed", float("nan"))) / 2**20,
      "gathers": text.count(" gather("),
      "scatters": text.count(" scatter("),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=513, help="square crop, 4k + 1 (stride-4 logits of (size-1)/4+1)")
  parser.add_argument("--batches", default="1,2", help="comma-separated batch sizes")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  if (args.size - 1) % 4 or args.size < 5:
    parser.error(f"--size={args.size}: expected 4k + 1 (e.g. 129, 513)")
  host_memory.reuse_freed_memory()  # as the training job does: without it fresh pages dominate these timings
  rates = PAPER_RATES
  stats = made_up_stats(rates)
  h4 = (args.size - 1) // 4 + 1
  channels = affinity.DIRECTIONS_PER_RATE * len(rates)
  bandwidth = device_copy_bandwidth(64 * 2**20, args.repeats)[0]
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    rng = np.random.default_rng(batch)
    logits4 = jnp.asarray(rng.normal(size=(batch, h4, h4, channels)), jnp.float32)
    labels = rng.integers(0, 21, size=(batch, args.size, args.size))
    labels = jnp.asarray(np.where(rng.random(labels.shape) < 0.1, 255, labels), jnp.int32)
    cases = {}
    for name, part in (("naive", naive_part), ("unpacked", unpacked_part), ("project", project_part)):
      cases[name] = compiled(lambda x, y, part=part: part(x, y, rates, stats), logits4, labels)
    (v0, a0), g0 = cases["naive"][0](logits4, labels)
    rel = 0.0
    for name in ("unpacked", "project"):
      (v1, a1), g1 = cases[name][0](logits4, labels)
      rel = max(rel, float(jnp.max(jnp.abs(g1 - g0)) / jnp.max(jnp.abs(g0))))
      if not (
          np.isclose(float(v0), float(v1), rtol=1e-6) and [int(a) for a in a0] == [int(a) for a in a1] and rel < 1e-5
      ):
        raise RuntimeError(f"{name} disagrees with naive: loss {float(v0)} vs {float(v1)}, gradient {rel:.1e}")
    times = interleaved({name: (lambda c=c: c(logits4, labels)) for name, (c, _) in cases.items()}, args.repeats)
    floor = (2 * batch * args.size**2 * channels * 4 + batch * args.size**2 * 4) / bandwidth
    rows.append((batch, cases, times, floor, rel))

  device = jax.devices()[0]
  print(
      f"Affinity head's full-resolution part, forward + backward: {args.size}x{args.size}, "
      f"{len(rates)} explicit rates ({channels} channels); {device.platform.upper()} ({device.device_kind}); "
      f"jax {jax.__version__}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; best (median) of {args.repeats}, "
      "the formulations in turn.\n"
  )
  print(
      "| batch | formulation | ms best (median) | x floor | temporaries MiB | bytes accessed MiB | gathers | scatters |"
  )
  print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for batch, cases, times, floor, _ in rows:
    for name, (_, info) in cases.items():
      best = min(times[name])
      print(
          f"| {batch} | {name} | {1e3 * best:.1f} ({1e3 * np.median(times[name]):.1f}) | {best / floor:.1f} | "
          f"{info['temp MiB']:.0f} | {info['bytes accessed MiB']:.0f} | {info['gathers']} | {info['scatters']} |"
      )
  print(
      "\n| batch | time project / unpacked | time project / naive | temporaries project / unpacked | "
      "temporaries project / naive | floor ms | gradients' max relative difference |"
  )
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for batch, cases, times, floor, rel in rows:
    ratio = lambda other: best_and_median(per_round(lambda a, b: a / b, times["project"], times[other]))
    temp = lambda other: cases["project"][1]["temp MiB"] / cases[other][1]["temp MiB"]
    print(
        f"| {batch} | {ratio('unpacked')} | {ratio('naive')} | {temp('unpacked'):.2f} | {temp('naive'):.2f} | "
        f"{1e3 * floor:.1f} | {rel:.1e} |"
    )


if __name__ == "__main__":
  main()
