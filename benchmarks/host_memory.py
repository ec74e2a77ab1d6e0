"""What ``dilaff_jax.process.host_memory.reuse_freed_memory`` changes in a training step on this CPU, in one run.

The setting is process-wide and cannot be undone, so each case runs in a child process of its own: one with
``DILAFF_REUSE_FREED_MEMORY=0`` (glibc's defaults), one with the setting (what the command-line jobs do), in turn,
``--rounds`` times each. A child compiles the real training step (``benchmarks/train_step.py``'s
``compile_step``: the paper's DeepLabv3+ with its affinity head at ``--depth``, ``--crop`` and ``--batch``),
takes two untimed steps, then times ``--steps`` steps and reports, per step, the page faults and the system and
user CPU time of the process (``getrusage``), the best and median wall time, and the process's peak resident
memory. Printed: one Markdown table, and the ratios "with the setting / without".

  .venv/bin/python benchmarks/host_memory.py                       # ResNet-50, crop 97, batch 8 (a few minutes)
  .venv/bin/python benchmarks/host_memory.py --depth 101 --crop 257 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dilaff_jax.process import host_memory  # noqa: E402

CASES = (("glibc defaults", "0"), ("reuse_freed_memory", "1"))


def child(depth: int, crop: int, batch: int, steps: int) -> dict:
  """Runs in the child: applies the setting unless turned off, then measures the step."""
  applied = host_memory.reuse_freed_memory()
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import train_step  # noqa: E402  (after the setting: importing it starts nothing, compiling starts the backend)

  s = train_step.compile_step(crop, batch, train_step.PAPER_RATES, depth=depth)
  s.step()
  s.step()
  before = resource.getrusage(resource.RUSAGE_SELF)
  times = [s.step() for _ in range(steps)]
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {
      "applied": applied,
      "faults": (after.ru_minflt - before.ru_minflt) / steps,
      "sys": (after.ru_stime - before.ru_stime) / steps,
      "user": (after.ru_utime - before.ru_utime) / steps,
      "best": min(times),
      "median": statistics.median(times),
      "peak_rss_gib": after.ru_maxrss / 2**20,  # KiB on Linux
  }


def run_child(env_value: str, args) -> dict:
  env = dict(os.environ, **{host_memory.ENV: env_value})
  cmd = [sys.executable, __file__, "--child", f"--depth={args.depth}", f"--crop={args.crop}"]
  cmd += [f"--batch={args.batch}", f"--steps={args.steps}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"error: the child process failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depth", type=int, default=50, help="ResNet depth (50, 101 or 152)")
  parser.add_argument("--crop", type=int, default=97, help="square crop, 16k + 1")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=6, help="timed steps per child")
  parser.add_argument("--rounds", type=int, default=1, help="children per case, run in turn (A, B, A, B, ...)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.depth, args.crop, args.batch, args.steps)))
    return
  results = {name: [] for name, _ in CASES}
  start = time.time()
  for r in range(args.rounds):
    for name, value in CASES:
      print(f"[host_memory] round {r + 1}/{args.rounds}: {name} ({time.time() - start:.0f}s)", file=sys.stderr)
      results[name].append(run_child(value, args))
  print(
      f"\nTraining step, ResNet-{args.depth} DeepLabv3+ with the affinity head, crop {args.crop}, batch {args.batch}, "
      f"float32, 1 CPU device; per step over {args.steps} steps, {args.rounds} child process(es) per case "
      "(the best of them):\n"
  )
  print("| case | applied | page faults | system s | user s | step s best (median) | peak RSS GiB |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  best = {}
  for name, _ in CASES:
    b = min(results[name], key=lambda x: x["best"])
    best[name] = b
    print(
        f"| {name} | {b['applied']} | {b['faults']:,.0f} | {b['sys']:.2f} | {b['user']:.2f} | "
        f"{b['best']:.2f} ({b['median']:.2f}) | {b['peak_rss_gib']:.2f} |"
    )
  off, on = (best[name] for name, _ in CASES)
  print(
      f"\nwith / without the setting: step time {on['best'] / off['best']:.2f}x, system time "
      f"{on['sys'] / max(off['sys'], 1e-9):.3f}x, page faults {on['faults'] / max(off['faults'], 1):.4f}x, "
      f"peak RSS {on['peak_rss_gib'] / off['peak_rss_gib']:.2f}x"
  )


if __name__ == "__main__":
  main()
