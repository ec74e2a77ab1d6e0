"""Files written whole or not at all: a temporary file beside the target, flushed to disk, renamed over it. A crash
or a full disk leaves the old file (or none), never a truncated one, and a failed write is one named error. And a
lock that lets processes of one machine take turns at work that must not run twice at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator

from dilaff_jax import errors


class WriteError(errors.UserError, OSError):
  """A file could not be written (full disk, no permission, read-only filesystem): names the path and the cause."""


def free_space(path: str) -> str:
  """``"N.N MiB free there"`` for the filesystem of ``path`` (or of its nearest existing parent folder)."""
  folder = os.path.abspath(path)
  while not os.path.exists(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  try:
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
  except OSError:
    return "free space unknown"


def read_json(path: str, kind: type, expected: str):
  """The JSON value in ``path``; ``OSError`` when it cannot be read, ``ValueError`` when it is not JSON or not a
  ``kind`` (the message then says it is not ``expected``, e.g. "a JSON object")."""
  with open(path) as f:
    value = json.load(f)
  if not isinstance(value, kind):
    raise ValueError(f"not {expected}")
  return value


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes ``content`` to ``path`` atomically (temporary file + fsync + rename); creates the folder. On failure
  the temporary file is removed, ``path`` is as it was, and :class:`WriteError` says what to do."""
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    os.makedirs(folder, exist_ok=True)
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise WriteError(
        f"writing {path} failed: [Errno {e.errno}] {e.strerror} ({free_space(folder)}); free disk space or fix the "
        "folder's permissions and rerun (the file is unchanged)"
    ) from None


@contextlib.contextmanager
def taking_turns(lock_path: str) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``lock_path`` (created with its folder): another process entering with the same
  path waits until this one leaves. The kernel drops the lock when its holder dies, so a killed process leaves no
  stale lock (the empty file stays). A folder where no lock can be taken (e.g. a network filesystem without
  ``flock``, or a system without ``fcntl``) runs the work without one."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
  except ImportError:
    yield
    return
  try:
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError:
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)  # releases the lock
