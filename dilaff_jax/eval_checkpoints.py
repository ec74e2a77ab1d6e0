"""Evaluating a workdir's checkpoints: the newest intact one, chosen steps, or every checkpoint a running training
writes, as it appears (``--mode=evaluate``, with ``--watch``)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence

import jax
import ml_collections

from dilaff_jax import checkpoints, config_checks
from dilaff_jax.evaluate import evaluate_state, results_dir
from dilaff_jax.state import state_template


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
  """Restores the latest (or ``step``) checkpoint of ``workdir`` and evaluates it."""
  return evaluate_checkpoints(config, workdir, steps=[step] if step is not None else None)[-1]


def evaluate_checkpoints(
    config: ml_collections.ConfigDict,
    workdir: str,
    steps: Sequence[int] | None = None,
    watch: bool = False,
    poll_seconds: float = 30.0,
    timeout_seconds: float = 0.0,
) -> list[dict]:
  """Evaluates checkpoints of ``workdir``: ``steps``, or the newest intact one; with ``watch``, every checkpoint a
  running training writes, as it appears, until the one at ``train.num_steps`` (or ``timeout_seconds`` without a
  new one). Checkpoints already evaluated (``<results_dir>/step_N/results.json`` exists) are skipped while watching, and so
  are damaged ones (reported). Only reads: no lock, no folder created (a missing ``workdir`` is an error, also with
  ``watch``; a workdir whose training has not saved yet is waited for)."""
  config_checks.validate(config, num_devices=jax.device_count(), mode="evaluate")
  rates = config_checks.rates_of(config)
  if watch and not os.path.isdir(workdir):
    raise checkpoints.NoCheckpointError(
        f"--workdir={workdir}: no such folder: start the training first (it creates " "the workdir), or fix the path"
    )
  template = functools.cache(lambda: state_template(config, rates))
  if not watch:
    results = []
    for s in steps or [None]:
      state, _ = checkpoints.restore_from_workdir(workdir, config, template, s)
      results.append(evaluate_state(config, workdir, state, rates))
    return results
  results = []
  last_new = time.time()
  done = set()
  directory = checkpoints.checkpoints_dir(workdir)
  print(f"[eval] watching {directory} for new checkpoints (until step {config.train.num_steps})", flush=True)
  while True:
    saved = checkpoints.saved_steps(workdir)
    todo = [
        s
        for s in saved
        if s not in done and not os.path.exists(os.path.join(results_dir(config, workdir), f"step_{s}", "results.json"))
    ]
    for s in sorted(todo):
      try:
        state, _ = checkpoints.restore_from_workdir(workdir, config, template, s)
      except checkpoints.DamagedCheckpointError as e:
        print(f"[eval] skipping step {s}: {e}", flush=True)
      except checkpoints.NoCheckpointError:  # rotated out (or moved aside) since it was listed
        print(f"[eval] skipping step {s}: it was removed before it could be read", flush=True)
      else:
        results.append(evaluate_state(config, workdir, state, rates))
      done.add(s)
      last_new = time.time()
    if saved and max(saved) >= config.train.num_steps:
      break
    if timeout_seconds and time.time() - last_new > timeout_seconds:
      print(f"[eval] no new checkpoint for {timeout_seconds:.0f}s: stopping", flush=True)
      break
    time.sleep(poll_seconds)
  return results
