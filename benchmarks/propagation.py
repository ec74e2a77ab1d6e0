"""Benchmark of affinity propagation (Eq. 6) and of the affinity targets + loss, on the default JAX device.

Paper-sized case: 513x513, 21 classes, R = {8, (12, 24), 16} (4 explicit rates, 32 directions), 10 iterations,
batch 1. Prints ms per iteration, the memory-traffic floor (bytes one iteration must read and write, at the copy
bandwidth measured in this same run) and their ratio (target: within 3x), then the time of
``affinity_targets + affinity_loss`` forward and backward at the same size.

  .venv/bin/python benchmarks/propagation.py [--size 513] [--iterations 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import threading

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.method import affinity, propagation
from dilaff_jax.method.neighbour_stats import AffinityStats
from timing import best_of  # benchmarks/timing.py (run as python benchmarks/propagation.py)


def copy_bandwidth(nbytes: int, repeats: int) -> tuple[float, str, dict[str, float]]:
  """Read+write bytes per second of copying a float32 buffer of ``nbytes`` into another, preallocated one.

  Best of: numpy ``np.copyto`` on one thread, and on two threads (one half each; numpy releases the GIL).
  A jit'd ``v * 1.0001`` (the old measure) mostly timed allocating and page-faulting a fresh 64 MiB output
  (3.7-7 GB/s here), which inflated the floor. Also reported, not used: an in-place donated XLA update
  ``v * 1.0001`` (each line read and written back; faster, but propagation cannot work in place).
  Returns ``(bandwidth, name of the measure used, all measures)``.
  """
  n = nbytes // 4
  src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)
  half = n // 2

  def two_threads():
    t = threading.Thread(target=np.copyto, args=(dst[:half], src[:half]))
    t.start()
    np.copyto(dst[half:], src[half:])
    t.join()

  found = {
      "np.copyto, 1 thread": 2 * nbytes / best_of(lambda: np.copyto(dst, src), repeats),
      "np.copyto, 2 threads": 2 * nbytes / best_of(two_threads, repeats),
  }
  used = max(found, key=found.get)
  scale = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
  box = [jnp.ones((n,), jnp.float32)]

  def in_place():
    box[0] = scale(box[0])
    box[0].block_until_ready()

  found["XLA in-place donated v*1.0001 (not used)"] = 2 * nbytes / best_of(in_place, repeats)
  return found[used], used, found


def device_copy_bandwidth(nbytes: int, repeats: int) -> tuple[float, str, dict[str, float]]:
  """:func:`copy_bandwidth` on a CPU; on a GPU, a jitted out-of-place ``v * 1.0001`` of 512 MiB in device memory
  (larger than any GPU's L2 cache), read + write bytes per second. Same return as :func:`copy_bandwidth`."""
  if jax.devices()[0].platform == "cpu":
    return copy_bandwidth(nbytes, repeats)
  nbytes = max(nbytes, 512 << 20)
  x = jnp.ones((nbytes // 4,), jnp.float32)
  scale = jax.jit(lambda v: v * 1.0001)
  name = f"jitted v * 1.0001 in device memory ({nbytes >> 20} MiB)"
  bandwidth = 2 * nbytes / best_of(lambda: scale(x), repeats)
  return bandwidth, name, {name: bandwidth}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=513)
  p.add_argument("--classes", type=int, default=21)
  p.add_argument("--rates", default="8,12x24,16")
  p.add_argument("--iterations", type=int, default=10)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()

  rates = affinity.parse_rates(args.rates)
  b, s, c, d = args.batch, args.size, args.classes, 8 * len(rates)
  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32), axis=-1)
  aff = propagation.steep_sigmoid(jnp.asarray(rng.normal(size=(b, s, s, d)), jnp.float32))
  labels = jnp.asarray(rng.integers(0, c, size=(b, s, s)), jnp.int32)

  n = args.iterations
  t_n = best_of(lambda: propagation.propagate(probs, aff, rates, iterations=n), args.repeats)
  t_1 = best_of(lambda: propagation.propagate(probs, aff, rates, iterations=1), args.repeats)
  per_iter = (t_n - t_1) / (n - 1) if n > 1 else t_n  # marginal: excludes the once-per-call layout changes

  bytes_iter = 4 * b * s * s * (2 * c + d)  # read p and a, write p (float32)
  bw, bw_name, bws = device_copy_bandwidth(64 << 20, max(args.repeats, 10))
  floor = bytes_iter / bw

  stats = AffinityStats(rates, np.full((len(rates), 9), 1 / 9), np.full(len(rates), 0.8))
  logits = jnp.asarray(rng.normal(size=(b, s, s, d)), jnp.float32)
  loss_fn = jax.jit(lambda lg, lb: affinity.affinity_loss(lg, lb, rates, stats))
  grad_fn = jax.jit(jax.value_and_grad(lambda lg, lb: affinity.affinity_loss(lg, lb, rates, stats)))
  t_fwd = best_of(lambda: loss_fn(logits, labels), args.repeats)
  t_bwd = best_of(lambda: grad_fn(logits, labels), args.repeats)
  t_oracle = best_of(lambda: propagation.gt_affinity(labels, rates), args.repeats)

  print(
      f"# propagation benchmark: {b}x{s}x{s}, {c} classes, R={list(rates)} ({d} directions), "
      f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}"
  )
  print("| quantity | value |")
  print("|---|---|")
  print(f"| propagation, {n} iterations (total) | {1e3 * t_n:.1f} ms |")
  print(f"| propagation, 1 iteration (total, incl. once-per-call layout changes) | {1e3 * t_1:.1f} ms |")
  print(f"| propagation, per iteration (marginal) | {1e3 * per_iter:.2f} ms |")
  for name, value in bws.items():
    print(f"| copy bandwidth (read+write, 64 MiB): {name} | {value / 1e9:.2f} GB/s |")
  print(f"| floor uses: best copy into a preallocated buffer ({bw_name}) | {bw / 1e9:.2f} GB/s |")
  print(f"| memory-traffic floor per iteration ({bytes_iter / 2**20:.1f} MiB) | {1e3 * floor:.2f} ms |")
  print(f"| ratio per-iteration / floor (target <= 3) | {per_iter / floor:.2f} |")
  print(f"| affinity_targets + affinity_loss, forward | {1e3 * t_fwd:.1f} ms |")
  print(f"| affinity_targets + affinity_loss, forward + backward | {1e3 * t_bwd:.1f} ms |")
  print(f"| gt_affinity (oracle) | {1e3 * t_oracle:.1f} ms |")


if __name__ == "__main__":
  main()
