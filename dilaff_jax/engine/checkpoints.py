"""Saving and restoring the train state (Orbax), so that a checkpoint is either intact and finite or named damaged.

* Only finite states are saved: before every save, one small fetch tells whether every parameter, batch statistic
  and optimizer slot is finite; a non-finite state is refused, so the newest checkpoint is always a finite one and
  no rotation (``train.keep_checkpoints``) can drop it in favour of a poisoned one.
* Every checkpoint records, in its JSON meta, the name, shape and dtype of each array (its signature) and a
  SHA-256 fingerprint of their bytes, hashed from the host copy that the save makes anyway.
* A restore checks, in this order: the config (a differing model or class count is an incompatible config), the
  signature (a different set of arrays does not fit this model), then reads the arrays and checks the fingerprint
  and finiteness. Anything failing after the signature matched (unreadable, truncated or missing files, flipped
  bytes, NaN or inf) is a *damaged* checkpoint: callers fall back to the newest intact one, or with an explicit
  step refuse and list the intact steps.
* Managers are opened through :func:`opened`, which closes them on every path, errors included: an unclosed
  manager leaves Orbax's asyncio machinery to die with the interpreter, burying the real error in noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging as pylogging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dilaff_jax import errors
from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.models.deeplab import SHAPE_FIELDS

FINGERPRINT = "sha256"
DAMAGED_DIR = "damaged"  # <workdir>/checkpoints/damaged/<step>: damaged steps that training moved aside
HINT = "train first (python -m dilaff_jax.main --mode=train) or point --workdir at a run"


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint cannot be restored or written; the message names it and says what to do."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
  """The workdir has no (such) checkpoint."""


class IncompatibleCheckpointError(CheckpointError):
  """The checkpoint is intact but comes from another config or model."""


class DamagedCheckpointError(CheckpointError):
  """The checkpoint's files cannot be read, do not match its fingerprint, or hold non-finite values."""

  def __init__(self, message: str, step: int, reason: str):
    super().__init__(message)
    self.step = step
    self.reason = reason


class NonFiniteStateError(CheckpointError):
  """A state with NaN or inf was not saved."""


# ----------------------------------------------------------------------------------------------- records


def _json_value(value):
  """Tuples as lists, as a record reads back from JSON."""
  return list(value) if isinstance(value, (tuple, list)) else value


def compat_record(spec: RunSpec) -> dict:
  """What a checkpoint must agree with to be restored into the model of ``spec``."""
  config = spec.config
  record = {f"model.{k}": _json_value(config.model[k]) for k in SHAPE_FIELDS}
  return {
      **record,
      "dataset.num_classes": config.dataset.num_classes,
      "affinity.rates (explicit)": [list(r) for r in spec.rates],
      # None without AAF, as a checkpoint whose record lacks the key reads
      "structure.aaf_weights (shape)": (
          [2, config.dataset.num_classes, len(config.structure.aaf_dilations)] if spec.structure == "aaf" else None
      ),
  }


def host_state(state) -> dict:
  """The saved part of a train state (anything with ``step``, ``params``, ``batch_stats``, ``opt_state``)."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def _arrays(tree) -> list[tuple[str, np.ndarray]]:
  """``(path, array)`` of every leaf in flattening order; integer scalars (the step) become int64 so that a
  template's Python ``0`` and a saved ``int32`` step read alike."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    if a.ndim == 0 and np.issubdtype(a.dtype, np.integer):
      a = a.astype(np.int64)
    out.append((jax.tree_util.keystr(path), a))
  return out


def signature(tree) -> list[list]:
  """``[[path, shape, dtype], ...]`` of a host tree: what must match for a checkpoint to fit a model."""
  return [[path, list(a.shape), a.dtype.name] for path, a in _arrays(tree)]


def fingerprint(tree) -> str:
  """SHA-256 over every array's path, dtype, shape and bytes, in flattening order (hardware-accelerated on current
  CPUs: well under a second for a ResNet-101 state with its momentum)."""
  h = hashlib.sha256()
  for path, a in _arrays(tree):
    h.update(f"{path}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_variables(tree) -> list[str]:
  """Paths of the floating-point arrays of ``tree`` holding a NaN or an infinity. The check runs where the arrays
  are (host arrays on the host, device arrays on their device) and fetches one flag per array."""
  items = [
      (jax.tree_util.keystr(p), x)
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  if not items:
    return []
  if all(isinstance(x, np.ndarray) for _, x in items):
    flags = np.asarray([np.isfinite(x).all() for _, x in items])
  else:
    flags = np.asarray(_finite_flags([x for _, x in items]))
  return [path for (path, _), ok in zip(items, flags) if not ok]


def _names(paths: Sequence[str], limit: int = 3) -> str:
  return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# ----------------------------------------------------------------------------------------------- managers


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def checkpoint_manager(
    workdir: str, config: ml_collections.ConfigDict | None = None, *, create: bool = False
) -> ocp.CheckpointManager:
  """Orbax manager of ``<workdir>/checkpoints`` (asynchronous saves). ``config`` gives ``train.keep_checkpoints``
  (for a writer); readers pass none and ``create=False``, so that looking never creates a folder. Prefer
  :func:`opened`, which also closes it."""
  if config is None:
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=True)
  else:  # the newest train.keep_checkpoints, and the best validated one (train.eval_every) beside them
    policies = ocp.checkpoint_managers
    keep = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=config.train.keep_checkpoints),
            policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(preservation_policy=keep, create=create, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=("state", "meta"))


BEST_METRIC = "validation_score"  # the metric a validated checkpoint is saved with (higher is better)


def _best_metric(metrics: dict) -> float:
  return float(metrics[BEST_METRIC])


@contextlib.contextmanager
def opened(
    workdir: str, config: ml_collections.ConfigDict | None = None, *, write: bool = False
) -> Iterator[ocp.CheckpointManager]:
  """:func:`checkpoint_manager` (``write``: creating the folder, rotating by ``config``), closed on every exit. On
  a normal exit a writer's last save must have reached the disk (else :class:`CheckpointError`); on an error exit
  the manager is closed without masking that error."""
  _ignore_callbacks_into_closed_loops()
  if logging.get_verbosity() < logging.DEBUG:  # --verbosity=1 keeps Orbax's tracebacks for bug reports
    _shorten_orbax_errors()
  mngr = checkpoint_manager(workdir, config, create=write)
  try:
    yield mngr
  except BaseException:
    try:
      mngr.close()
    except Exception as e:  # noqa: BLE001  (the error in flight is the one to report)
      logging.warning("closing the checkpoint manager of %s after an error: %s", mngr.directory, e)
    raise
  try:
    if write:
      finish(mngr)
  finally:
    mngr.close()


def _ignore_callbacks_into_closed_loops() -> None:
  """When Orbax gives up on a damaged checkpoint, reads still in flight later call back into its closed asyncio
  loop; each such callback prints a harmless "Event loop is closed" traceback, hundreds of them burying the one
  error that matters. This drops exactly those (wrapping the interpreter's hook once; everything else passes)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


class _OneLineOrbaxErrors(pylogging.Filter):
  """Logs Orbax's errors from its background save threads as one line each, without their tracebacks: the
  failure (e.g. a full disk) reaches the caller as one :class:`CheckpointError` anyway."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname:
      record.msg = f"{record.getMessage()} ({_first_line(record.exc_info[1])})" if record.exc_info[1] else record.msg
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


class _DropAbandonedReads(pylogging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for reads of a damaged OCDBT checkpoint that Orbax
  abandoned after the first failed one (that failure is already reported as the damaged checkpoint): garbage
  collected at exit, each would print a traceback after the one ``error:`` line."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (
        record.getMessage().startswith("Task exception was never retrieved") and "in OCDBT database" in str(exc)
    )


def _shorten_orbax_errors() -> None:
  """Installs :class:`_OneLineOrbaxErrors` on absl's logger once, for the rest of the process: reads still in
  flight when Orbax gave up on a damaged checkpoint can log after their manager was closed."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
    logger.addFilter(_OneLineOrbaxErrors())
  asyncio_logger = pylogging.getLogger("asyncio")
  if not any(isinstance(f, _DropAbandonedReads) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropAbandonedReads())


def _saved_on_disk(mngr: ocp.CheckpointManager, step: int) -> bool:
  return os.path.isdir(os.path.join(str(mngr.directory), str(step)))


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the pending save and checks that it reached the disk (Orbax only logs a failed background write,
  e.g. a full disk, and would go on reporting that step as saved)."""
  pending = mngr.latest_step()
  try:
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _save_failed(mngr, pending, e) from None
  if pending is not None and not _saved_on_disk(mngr, pending):
    raise _save_failed(mngr, pending, "the background write did not complete (see the log above)")


def _newest_on_disk(mngr: ocp.CheckpointManager) -> int | None:
  steps = [s for s in mngr.all_steps() if _saved_on_disk(mngr, s)]
  return max(steps) if steps else None


def _save_failed(mngr: ocp.CheckpointManager, step: int | None, cause) -> CheckpointError:
  good = _newest_on_disk(mngr)
  return CheckpointError(
      f"saving the checkpoint of step {step} in {mngr.directory} failed: {cause}. Free disk space (or fix the "
      f"folder's permissions) and rerun with the same --workdir to resume from "
      f"{'step ' + str(good) if good is not None else 'the start'}"
  )


# ----------------------------------------------------------------------------------------------- save


def save_checkpoint(mngr: ocp.CheckpointManager, state, meta: dict, metrics: dict | None = None) -> None:
  """Saves an (unreplicated) state asynchronously with its signature and fingerprint added to ``meta`` (JSON:
  compat record, data position), and ``metrics`` (a validation's :data:`BEST_METRIC`) for Orbax's best-checkpoint
  policy. Raises :class:`NonFiniteStateError` instead of saving a state with NaN or inf,
  and :class:`CheckpointError` when the previous save or this one could not be written."""
  step = int(jax.device_get(state.step))
  bad = nonfinite_variables(host_state(state))
  if bad:
    finish(mngr)
    good = mngr.latest_step()
    raise NonFiniteStateError(
        f"the state at step {step} is not finite (NaN or inf in {_names(bad)}): it was not saved. The newest "
        f"finite checkpoint is {'step ' + str(good) if good is not None else 'none'} in {mngr.directory}"
    )
  if mngr.latest_step() is not None:  # the previous write must have landed before this one counts on it
    finish(mngr)
  host = jax.device_get(host_state(state))
  meta = dict(meta, signature=signature(host), fingerprint={FINGERPRINT: fingerprint(host)})
  try:
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )
  except OSError as e:
    raise _save_failed(mngr, step, e) from None


# ----------------------------------------------------------------------------------------------- restore


def _damaged(mngr: ocp.CheckpointManager, step: int, reason: str) -> DamagedCheckpointError:
  return DamagedCheckpointError(f"checkpoint {mngr.directory}/{step} is damaged: {reason}", step, reason)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def restore_checkpoint(mngr: ocp.CheckpointManager, state, compat: dict, step: int) -> tuple[Any, dict]:
  """Restores checkpoint ``step`` into ``state``'s structure. Raises :class:`IncompatibleCheckpointError` (another
  config or model) or :class:`DamagedCheckpointError` (unreadable, fingerprint mismatch, non-finite)."""
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("compat"), dict):
      raise ValueError("its meta record is not a JSON object with a compat record")
  except Exception as e:  # noqa: BLE001  (whatever the reader says, the files are not a checkpoint)
    raise _damaged(mngr, step, f"its meta record cannot be read ({_first_line(e)})") from None
  diffs = [
      f"{k}: checkpoint has {meta['compat'].get(k)!r}, config has {v!r}"
      for k, v in compat.items()
      if meta["compat"].get(k) != v
  ]
  if diffs:
    raise IncompatibleCheckpointError(
        f"checkpoint {mngr.directory}/{step} comes from an incompatible config:\n  "
        + "\n  ".join(diffs)
        + "\nUse another --workdir or the config the run was started with."
    )
  target = jax.device_get(host_state(state))
  expected = signature(target)
  if "signature" in meta and meta["signature"] != expected:
    saved = {p: (tuple(s), d) for p, s, d in meta["signature"]}
    want = {p: (tuple(s), d) for p, s, d in expected}
    diff = sorted(p for p in saved.keys() | want.keys() if saved.get(p) != want.get(p))
    raise IncompatibleCheckpointError(
        f"checkpoint {mngr.directory}/{step} does not fit this model: {len(diff)} variable(s) differ in name, "
        f"shape or dtype ({_names(diff)}). Use the config and code version the run was trained with"
    )
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001
    if "signature" not in meta and isinstance(e, (ValueError, KeyError)):  # a record without signature
      raise IncompatibleCheckpointError(f"checkpoint {mngr.directory}/{step} does not fit this model: {e}") from None
    raise _damaged(mngr, step, f"its arrays cannot be read ({_first_line(e)})") from None
  recorded = meta.get("fingerprint", {}).get(FINGERPRINT)
  if recorded is None:
    logging.warning("checkpoint %s/%d has no fingerprint: its contents cannot be verified", mngr.directory, step)
  elif fingerprint(restored) != recorded:
    raise _damaged(
        mngr, step, "its arrays do not match the fingerprint recorded when it was saved " "(bytes changed on disk)"
    )
  bad = nonfinite_variables(restored)
  if bad:
    raise _damaged(mngr, step, f"it holds NaN or inf ({_names(bad)})")
  new = state.replace(
      step=restored["step"],
      params=restored["params"],
      batch_stats=restored["batch_stats"],
      opt_state=restored["opt_state"],
  )
  return new, meta


def restore_newest_intact(
    mngr: ocp.CheckpointManager, state, compat: dict, report: Callable[[str], None] = print
) -> tuple[Any, dict, list[int]]:
  """Restores the newest intact checkpoint, reporting each damaged newer one; returns ``(state, meta, damaged
  steps)``. Raises :class:`DamagedCheckpointError` when none is intact (an incompatible one is no fallback case:
  its error is raised at once)."""
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored, meta = restore_checkpoint(mngr, state, compat, step)
    except DamagedCheckpointError as e:
      damaged.append(step)
      report(f"[checkpoint] {e}; trying the previous one")
      continue
    if damaged:
      report(
          f"[checkpoint] using step {step}, the newest intact checkpoint in {mngr.directory} "
          f"(damaged: {', '.join(map(str, damaged))})"
      )
    return restored, meta, damaged
  raise DamagedCheckpointError(
      f"no intact checkpoint in {mngr.directory}: steps {', '.join(map(str, damaged))} "
      "are all damaged (see above); restore them from a backup or use another --workdir",
      damaged[0] if damaged else -1,
      "all damaged",
  )


def intact_steps(mngr: ocp.CheckpointManager, state, compat: dict) -> list[int]:
  """The steps whose checkpoint restores intact (reads every checkpoint: for error messages)."""
  good = []
  for step in mngr.all_steps():
    try:
      restore_checkpoint(mngr, state, compat, step)
    except DamagedCheckpointError:
      continue
    good.append(step)
  return good


def move_aside(mngr: ocp.CheckpointManager, steps: Sequence[int], report: Callable[[str], None] = print) -> None:
  """Moves damaged step folders to ``checkpoints/damaged/<step>`` (never deletes them), so that training can save
  those steps again and rotation does not count them."""
  if not steps:
    return
  root = os.path.join(str(mngr.directory), DAMAGED_DIR)
  os.makedirs(root, exist_ok=True)
  for step in steps:
    dest, n = os.path.join(root, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(root, f"{step}.{n}"), n + 1
    os.rename(os.path.join(str(mngr.directory), str(step)), dest)
    report(f"[checkpoint] moved the damaged checkpoint of step {step} to {dest}")
  mngr.reload()


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoints' steps in ``<workdir>/checkpoints`` (none when the folder does not exist)."""
  if not os.path.isdir(checkpoints_dir(workdir)):
    return []
  with opened(workdir) as mngr:
    return list(mngr.all_steps())


def restore_from_workdir(
    workdir: str,
    spec: RunSpec,
    make_template: Callable[[], Any],
    step: int | None = None,
    report: Callable[[str], None] = print,
) -> tuple[Any, dict]:
  """Restores ``<workdir>/checkpoints`` for evaluation or prediction into ``make_template()`` (a train state of
  ``spec``'s model, made only once a checkpoint is found): the newest intact checkpoint (damaged newer ones are
  reported and skipped), or exactly ``step`` (a damaged one is refused, listing the intact steps). Never creates a
  folder and takes no lock: it reads beside a running training."""
  directory = checkpoints_dir(workdir)
  if not os.path.isdir(directory):
    raise NoCheckpointError(f"--workdir={workdir}: no checkpoint in {directory} (no such folder): {HINT}")
  compat = compat_record(spec)
  with opened(workdir) as mngr:
    steps = list(mngr.all_steps())
    if not steps:
      raise NoCheckpointError(f"--workdir={workdir}: no checkpoint in {directory}: {HINT}")
    template = make_template()
    if step is None:
      state, meta, _ = restore_newest_intact(mngr, template, compat, report)
      return state, meta
    if step not in steps:
      raise NoCheckpointError(
          f"--workdir={workdir}: no checkpoint for step {step} in {directory}; available: " f"{steps}"
      )
    try:
      return restore_checkpoint(mngr, template, compat, step)
    except DamagedCheckpointError as e:
      good = intact_steps(mngr, template, compat)
      raise DamagedCheckpointError(
          f"{e}; intact checkpoints: {', '.join(map(str, good)) if good else 'none'}"
          + (" (pass one of them to --step)" if good else ""),
          step,
          e.reason,
      ) from None
