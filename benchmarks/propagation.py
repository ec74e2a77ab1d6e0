"""Benchmark of affinity propagation (Eq. 6) and of the affinity targets + loss, on the default JAX device.

Paper-sized case: 513x513, 21 classes, R = {8, (12, 24), 16} (4 explicit rates, 32 directions), 10 iterations,
batch 1. Prints ms per iteration, the memory-traffic floor (bytes one iteration must read and write, at the copy
bandwidth measured in this same run) and their ratio, then the time of ``affinity_targets + affinity_loss``
forward and backward at the same size. Every case (propagation at n and at 1 iteration, the copies that set the
floor, the loss, the oracle) runs once per round, in interleaved rounds, and the ratio is taken round by round:
a change in the machine's load falls on the propagation and on its floor alike.

  .venv/bin/python benchmarks/propagation.py [--size 513] [--iterations 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.method import affinity, propagation
from dilaff_jax.method.neighbour_stats import AffinityStats
from timing import best_and_median, interleaved, per_round  # benchmarks/timing.py (run as python benchmarks/...)


def copy_cases(nbytes: int) -> tuple[dict, int, set[str]]:
  """The copy measures, as ``(cases, bytes read + written per call, names of the floor's measures)``.

  On a CPU: numpy ``np.copyto`` of a float32 buffer of ``nbytes`` into another, preallocated one, on one thread and
  on two (one half each; numpy releases the GIL); the faster of the two in each round sets that round's floor. A
  jit'd ``v * 1.0001`` (an older measure) mostly timed allocating and page-faulting a fresh output, which inflated
  the floor. Also timed, not used: an in-place donated XLA update ``v * 1.0001`` (each line read and written back;
  faster, but propagation cannot work in place). On a GPU: a jitted out-of-place ``v * 1.0001`` of 512 MiB in
  device memory (larger than any GPU's L2 cache)."""
  if jax.devices()[0].platform != "cpu":
    nbytes = max(nbytes, 512 << 20)
    x = jnp.ones((nbytes // 4,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.0001)
    name = f"jitted v * 1.0001 in device memory ({nbytes >> 20} MiB)"
    return {name: lambda: scale(x)}, 2 * nbytes, {name}
  n = nbytes // 4
  src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)
  half = n // 2

  def two_threads():
    t = threading.Thread(target=np.copyto, args=(dst[:half], src[:half]))
    t.start()
    np.copyto(dst[half:], src[half:])
    t.join()

  scale = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
  box = [jnp.ones((n,), jnp.float32)]

  def in_place():
    box[0] = scale(box[0])
    return box[0]

  cases = {
      "np.copyto, 1 thread": lambda: np.copyto(dst, src),
      "np.copyto, 2 threads": two_threads,
      "XLA in-place donated v*1.0001 (not used)": in_place,
  }
  return cases, 2 * nbytes, {"np.copyto, 1 thread", "np.copyto, 2 threads"}


def device_copy_bandwidth(nbytes: int, repeats: int) -> tuple[float, str, dict[str, float]]:
  """The best copy bandwidth (bytes read + written per second) of :func:`copy_cases`' floor measures, over
  ``repeats`` interleaved rounds: ``(bandwidth, name of the fastest measure, {name: bandwidth})``."""
  cases, copy_bytes, floor_names = copy_cases(nbytes)
  t = interleaved({k: cases[k] for k in sorted(floor_names)}, repeats)
  found = {k: copy_bytes / min(v) for k, v in t.items()}
  used = max(found, key=found.get)
  return found[used], used, found


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=513)
  p.add_argument("--classes", type=int, default=21)
  p.add_argument("--rates", default="8,12x24,16")
  p.add_argument("--iterations", type=int, default=10)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (every case once per round)")
  args = p.parse_args()
  if args.iterations < 2:
    p.error("--iterations must be >= 2 (the per-iteration time is the difference of n and 1 iterations)")

  rates = affinity.parse_rates(args.rates)
  b, s, c, d = args.batch, args.size, args.classes, 8 * len(rates)
  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32), axis=-1)
  aff = propagation.steep_sigmoid(jnp.asarray(rng.normal(size=(b, s, s, d)), jnp.float32))
  labels = jnp.asarray(rng.integers(0, c, size=(b, s, s)), jnp.int32)
  stats = AffinityStats(rates, np.full((len(rates), 9), 1 / 9), np.full(len(rates), 0.8))
  logits = jnp.asarray(rng.normal(size=(b, s, s, d)), jnp.float32)
  loss_fn = jax.jit(lambda lg, lb: affinity.affinity_loss(lg, lb, rates, stats))
  grad_fn = jax.jit(jax.value_and_grad(lambda lg, lb: affinity.affinity_loss(lg, lb, rates, stats)))

  n = args.iterations
  copies, copy_bytes, floor_names = copy_cases(64 << 20)
  cases = {
      f"propagation, {n} iterations": lambda: propagation.propagate(probs, aff, rates, iterations=n),
      "propagation, 1 iteration": lambda: propagation.propagate(probs, aff, rates, iterations=1),
      **copies,
      "affinity_targets + affinity_loss, forward": lambda: loss_fn(logits, labels),
      "affinity_targets + affinity_loss, forward + backward": lambda: grad_fn(logits, labels),
      "gt_affinity (oracle)": lambda: propagation.gt_affinity(labels, rates),
  }
  log(f"timing {len(cases)} cases in {args.repeats} interleaved rounds")
  t = interleaved(cases, args.repeats, log)

  # per round: the marginal iteration (excludes the once-per-call layout changes), the copy bandwidth, the floor
  per_iter = per_round(
      lambda tn, t1: (tn - t1) / (n - 1), t[f"propagation, {n} iterations"], t["propagation, 1 iteration"]
  )
  bandwidth = per_round(lambda *ts: copy_bytes / min(ts), *(t[k] for k in floor_names))
  bytes_iter = 4 * b * s * s * (2 * c + d)  # read p and a, write p (float32)
  floor = [bytes_iter / bw for bw in bandwidth]
  ratio = per_round(lambda it, fl: it / fl, per_iter, floor)

  print(
      f"# propagation benchmark: {b}x{s}x{s}, {c} classes, R={list(rates)} ({d} directions), "
      f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}; every case once per round, "
      f"{args.repeats} interleaved rounds after a warm-up; best (median) over rounds; derived rows are computed "
      f"round by round"
  )
  print("| quantity | best (median) |")
  print("|---|---|")
  for name in (f"propagation, {n} iterations", "propagation, 1 iteration"):
    print(
        f"| {name} (total{', incl. once-per-call layout changes' if name.endswith(' 1 iteration') else ''}) "
        f"| {best_and_median(t[name], 1e3, 1)} ms |"
    )
  print(f"| propagation, per iteration (marginal) | {best_and_median(per_iter, 1e3)} ms |")
  for name in copies:
    gbs = [copy_bytes / x / 1e9 for x in t[name]]
    print(f"| copy bandwidth (read+write): {name} | {max(gbs):.2f} ({statistics.median(gbs):.2f}) GB/s |")
  print(f"| floor uses, per round: the faster of {' and '.join(repr(k) for k in sorted(floor_names))} | |")
  print(f"| memory-traffic floor per iteration ({bytes_iter / 2**20:.1f} MiB) | {best_and_median(floor, 1e3)} ms |")
  print(f"| **ratio per-iteration / floor, round by round** (target <= 2) | **{best_and_median(ratio)}** |")
  for name in (
      "affinity_targets + affinity_loss, forward",
      "affinity_targets + affinity_loss, forward + backward",
      "gt_affinity (oracle)",
  ):
    print(f"| {name} | {best_and_median(t[name], 1e3, 1)} ms |")


if __name__ == "__main__":
  main()
