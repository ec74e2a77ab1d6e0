"""One training per workdir: ``<workdir>/train.lock`` names the training that holds it.

Two trainings writing one workdir would interleave their checkpoints and overwrite each other's ``config.json``.
The lock file is created atomically (``O_CREAT | O_EXCL``) and holds the holder's host, pid and start time; it is
removed on every exit of :func:`hold`. A lock whose process is gone (same host, no such pid: a ``kill -9`` or a
crash) is stale and taken over with a message; a lock held by another host cannot be checked and is refused.
Evaluation, ``--watch`` and prediction only read, and take no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Callable, Iterator

from dilaff_jax import errors

LOCK_NAME = "train.lock"


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another training holds the workdir's lock."""


def _read(path: str) -> tuple[str, dict]:
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return "", {}
  try:
    info = json.loads(text)
  except ValueError:
    info = {}
  return text, info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _stale(info: dict, host: str) -> bool:
  pid = info.get("pid")
  return info.get("host") == host and isinstance(pid, int) and not _alive(pid)


def _describe(path: str, info: dict) -> str:
  if not info:
    return f"{path} exists but names no holder"
  return f"held by pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


@contextlib.contextmanager
def hold(
    workdir: str, report: Callable[[str], None] = print, name: str = LOCK_NAME, holder: str = "training"
) -> Iterator[str]:
  """Holds ``<workdir>/<name>`` (``train.lock``) for the block; yields its path. Raises :class:`WorkdirBusyError`
  (one line: the holder and what to do) when a live ``holder`` (a training; the study uses its own lock name)
  holds it."""
  path = os.path.join(workdir, name)
  host = socket.gethostname()
  mine = json.dumps(
      {"host": host, "pid": os.getpid(), "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  )
  for _ in range(3):  # a stale lock is moved away and creation retried; a live one ends the loop
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      text, info = _read(path)
      if not text:  # released between open and read
        continue
      if not _stale(info, host):
        raise WorkdirBusyError(
            f"--workdir={workdir} is in use by another {holder} ({_describe(path, info)}): wait for it to end, "
            f"or use another --workdir; if that process is gone, delete {path}"
        ) from None
      # Take over atomically: rename the stale file away, and put it back if it was replaced in the meantime.
      aside = f"{path}.stale.{os.getpid()}"
      try:
        os.rename(path, aside)
      except FileNotFoundError:
        continue
      if _read(aside)[0] != text:  # another starter took the lock between our read and rename: it is theirs
        with contextlib.suppress(FileExistsError):
          os.link(aside, path)
        os.remove(aside)
        continue
      os.remove(aside)
      report(
          f"[lock] took over the stale lock {path} (pid {info.get('pid')} on {host}, since {info.get('since')}, "
          "is gone)"
      )
      continue
    with os.fdopen(fd, "w") as f:
      f.write(mine)
    break
  else:
    raise WorkdirBusyError(
        f"--workdir={workdir}: could not take {path} (other trainings keep starting there); "
        f"start one {holder} per workdir"
    )
  try:
    yield path
  finally:
    if _read(path)[0] == mine:  # never remove a lock that is no longer ours
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
