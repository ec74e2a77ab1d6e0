"""Runs at once on one machine: the demo's training throughput with ``--jobs=N`` of the study runner against one run
on every core.

XLA:CPU does not scale linearly with threads (the demo's step is about 1.7x faster on 2 cores than on 1), so N runs
each pinned to ``cores // N`` cores can get more images through than one run on all of them. This starts N copies of
``benchmarks/train_step.py`` (the demo's step, ``configs/synthetic.py``, no PyTorch) at once, each pinned to the
cores ``python -m dilaff_jax.research.study --jobs=N`` would give it (``study.slot_cores``), and adds up their
images/s (the median step of each, timed while the others run too). Every N is measured in this one invocation, so
the ratios are comparable; the other work on the machine still shows in them (run it quiet).

  python benchmarks/study_jobs.py [--jobs 1,2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dilaff_jax.research import study  # noqa: E402  (imports no JAX)

# The row of train_step.py's table for the model with its affinity head: step seconds "best (median)", images/s.
ROW = re.compile(r"^\|[^|]*\|[^|]*\|\s*(\d+)\s*\|\s*\+ affinity head\s*\|[^|]*\|\s*([\d.]+) \(([\d.]+)\)\s*\|")


def run_at_once(jobs: int, repeats: int) -> list[tuple[int, float]]:
  """``(batch, median step seconds)`` of each of ``jobs`` train_step.py processes run at once on their slots."""
  slots = study.slot_cores(study.allowed_cores(), jobs)
  cmd = [
      sys.executable,
      os.path.join(REPO, "benchmarks", "train_step.py"),
      "--config=configs/synthetic.py",
      "--torch=none",
      f"--repeats={repeats}",
  ]
  procs = []
  for cores in slots:
    pin = lambda cores=cores: os.sched_setaffinity(0, cores)  # noqa: E731
    procs.append(
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pin)
    )
  out = []
  for cores, proc in zip(slots, procs):
    text, _ = proc.communicate()
    rows = [m for m in (ROW.match(line) for line in text.splitlines()) if m]
    if proc.returncode != 0 or not rows:
      raise SystemExit(f"error: train_step.py on cores {cores} failed (exit {proc.returncode}):\n{text[-2000:]}")
    out.append((int(rows[0].group(1)), float(rows[0].group(3))))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jobs", default="1,2", help="comma-separated runs at once (1: one run on every core)")
  parser.add_argument("--repeats", type=int, default=20, help="timed steps per process (the median is used)")
  args = parser.parse_args()
  allowed = study.allowed_cores()
  if allowed is None:
    raise SystemExit("error: this system cannot pin a process to cores (no sched_setaffinity)")
  try:
    counts = [int(j) for j in args.jobs.split(",")]
    for n in counts:
      study.slot_cores(allowed, n)
  except (ValueError, study.StudyError) as e:
    raise SystemExit(f"error: --jobs={args.jobs}: {e}") from None
  if args.repeats < 1:
    raise SystemExit("error: --repeats must be >= 1")
  results = {}
  for n in counts:
    start = time.perf_counter()
    print(f"[bench] {n} run(s) at once ...", flush=True)
    results[n] = run_at_once(n, args.repeats)
    print(f"[bench] {n} run(s) at once: {time.perf_counter() - start:.0f} s", flush=True)
  base = sum(b / s for b, s in results[counts[0]])
  print(
      f"\nThe demo's training step (configs/synthetic.py, with its affinity head) run N at a time on {len(allowed)} "
      f"cores, each on cores // N of them; median of {args.repeats} steps per run, images/s added up over the runs."
  )
  print(f"\n| runs at once | cores each | step s per run (median) | images/s, all runs | vs {counts[0]} at once |")
  print("| ---: | ---: | --- | ---: | ---: |")
  for n in counts:
    total = sum(b / s for b, s in results[n])
    steps = ", ".join(f"{s:.2f}" for _, s in results[n])
    print(f"| {n} | {len(allowed) // n} | {steps} | {total:.2f} | {total / base:.2f}x |")


if __name__ == "__main__":
  main()
