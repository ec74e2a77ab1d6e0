"""A new training started from another run's segmentation checkpoint: ``train.init_from=WORKDIR[:STEP]``.

The source checkpoint (the newest intact one, or exactly ``STEP``) is restored and verified as evaluation restores
it: against the source run's own ``config.json`` (compat record, variable signature, fingerprint, finiteness). Its
parameters and batch statistics are copied into the new run's freshly initialised state wherever a variable has the
same path and shape. The task-specific heads may differ: the classifier (another class count), the affinity head
(another set of rates) and AAF's size weights keep their fresh initialisation when their shapes differ or the source
lacks them, and a source head the new model does not have is left out; both are reported. Any other difference
(depth, stem, ASPP or decoder widths) is another model and is refused, naming the variables. The step, the optimiser
state and so the learning-rate schedule start afresh.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from dilaff_jax.engine import checkpoints, config_checks, run_spec, train_state

HEADS = ("classifier", "affinity", train_state.AAF_PARAMS)  # top-level variables that may be re-initialised


class WarmStartError(config_checks.ConfigError):
  """``train.init_from`` names a checkpoint whose model does not fit this config beyond its heads."""


def source_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the source run recorded in ``<workdir>/config.json`` (tuples restored, retired keys dropped)."""
  path = os.path.join(workdir, "config.json")
  try:
    return config_checks.read_json_config(path)[0]
  except (OSError, ValueError) as e:
    raise WarmStartError(
        f"config.train.init_from: cannot read {path} ({e}); it records the source run's model"
    ) from None


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _note(heads: dict[str, str], bad: list[str], path: tuple[str, ...], why: str) -> None:
  """Records a differing variable: under its head (the kernel's shapes preferred, as they say why), else as bad."""
  if path[0] not in HEADS:
    bad.append(why)
  elif path[0] not in heads or path[-1] == "kernel":
    heads[path[0]] = why


def merge(fresh: dict, source: dict, what: str) -> tuple[dict, int, dict[str, str]]:
  """``(merged tree, variables copied, {head: why it was re-initialised or left out})``: ``fresh`` with every
  variable of ``source`` that has the same path and shape. A differing variable outside :data:`HEADS` raises
  :class:`WarmStartError`."""
  new, old = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(source)
  out, copied, heads, bad = {}, 0, {}, []
  for path, value in new.items():
    name = "/".join(path)
    if path in old and _shape(old[path]) == _shape(value):
      out[path] = jnp.asarray(old[path], jnp.result_type(value))
      copied += 1
      continue
    out[path] = value
    why = f"{name} {_shape(value)} here, " + (
        f"{_shape(old[path])} in the checkpoint" if path in old else "absent there"
    )
    _note(heads, bad, path, why)
  for path in sorted(set(old) - set(new)):
    why = f"{'/'.join(path)} {_shape(old[path])} in the checkpoint, absent here"
    _note(heads, bad, path, why)
  if bad:
    raise WarmStartError(
        f"config.train.init_from: the checkpoint's {what} differ from this model's beyond the classifier and affinity "
        f"head ({'; '.join(bad[:3])}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): use the source run's "
        "model.depth, model.stem and channel widths (its config.json)"
    )
  return traverse_util.unflatten_dict(out), copied, heads


def warm_start(
    config: ml_collections.ConfigDict, state: train_state.TrainState, report: Callable[[str], None] = print
) -> train_state.TrainState:
  """``state`` (a fresh train state of ``config``) with the parameters and batch statistics of the checkpoint named
  by ``config.train.init_from`` copied in (:func:`merge`), at step 0 with a fresh optimiser state."""
  workdir, step = config_checks.init_from(config)
  source = run_spec.derive(source_config(workdir))
  restored, _ = checkpoints.restore_from_workdir(
      workdir, source, lambda: train_state.state_template(source), step, report
  )
  params, n_params, heads = merge(state.params, restored.params, "parameters")
  batch_stats, n_stats, stat_heads = merge(state.batch_stats, restored.batch_stats, "batch statistics")
  for head, why in stat_heads.items():
    heads.setdefault(head, why)
  total = len(traverse_util.flatten_dict(state.params)) + len(traverse_util.flatten_dict(state.batch_stats))
  kept = "; ".join(f"{head} ({why})" for head, why in heads.items())
  report(
      f"[train] initialised from step {int(restored.step)} of {workdir}: copied {n_params + n_stats} of {total} "
      f"parameters and batch statistics"
      + (f"; re-initialised or left out, as their shapes differ: {kept}" if heads else "")
      + "; step, optimiser state and learning-rate schedule start afresh"
  )
  return state.replace(params=params, batch_stats=batch_stats, opt_state=state.tx.init(params))
