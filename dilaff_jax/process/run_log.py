"""A job's text log: what it prints to the terminal (stdout, stderr and absl's log lines) is also appended to
``<workdir>/log.txt``, each run starting with a header line (time, command line), so that a resumed training's log
holds all of its runs in order."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from absl import logging

LOG_NAME = "log.txt"


class _Tee:
  """A text stream that writes to ``stream`` and to ``copy``; a failing copy (full disk) never stops the run."""

  def __init__(self, stream: TextIO, copy: TextIO):
    self._stream, self._copy, self._copy_ok = stream, copy, True

  def write(self, text: str) -> int:
    n = self._stream.write(text)
    if self._copy_ok:
      try:
        self._copy.write(text)
      except (OSError, ValueError):  # the disk filled up, or the file was closed: the terminal still gets it
        self._copy_ok = False
    return n

  def flush(self) -> None:
    self._stream.flush()
    if self._copy_ok:
      try:
        self._copy.flush()
      except (OSError, ValueError):
        self._copy_ok = False

  def __getattr__(self, name):  # isatty, fileno, encoding, ...: the terminal's
    return getattr(self._stream, name)


def header(argv: Sequence[str], now: datetime.datetime | None = None) -> str:
  """The line that starts a run in the log: UTC time and the command line."""
  now = now or datetime.datetime.now(datetime.timezone.utc)
  return f"===== {now:%Y-%m-%d %H:%M:%S} UTC: python -m dilaff_jax.main {shlex.join(argv)}\n"


def _already_there(stream: TextIO, path: str) -> bool:
  """Whether ``stream`` is itself written into ``path`` (e.g. ``> workdir/log.txt``, as the study runs jobs)."""
  try:
    mine, theirs = os.fstat(stream.fileno()), os.stat(path)
  except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
    return False
  return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


@contextlib.contextmanager
def tee(workdir: str, argv: Sequence[str]) -> Iterator[str | None]:
  """Appends everything printed inside the block to ``<workdir>/log.txt`` (yields its path). Does nothing (yields
  None) when ``workdir`` is not an existing folder or the log cannot be opened: a log is never a reason to fail.
  When stdout already goes into that file, nothing is doubled (yields its path)."""
  path = os.path.join(workdir, LOG_NAME)
  if _already_there(sys.stdout, path):
    yield path
    return
  try:
    if not os.path.isdir(workdir):
      raise FileNotFoundError(workdir)
    f = open(path, "a", encoding="utf-8")
  except OSError:
    yield None
    return
  handler = logging.get_absl_handler().python_handler
  saved = sys.stdout, sys.stderr, handler.stream
  with f:
    try:
      f.write(header(argv))
      f.flush()
    except OSError:
      yield None
      return
    sys.stdout, sys.stderr = _Tee(saved[0], f), _Tee(saved[1], f)
    handler.stream = sys.stderr
    try:
      yield path
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      sys.stdout, sys.stderr = saved[0], saved[1]
      handler.stream = saved[2]


def closing_line(workdir: str, results_dirs: Sequence[str], log_path: str | None) -> str:
  """A run's last line: where its results, its log and its TensorBoard summaries are."""
  parts = [f"results in {', '.join(results_dirs)}" if results_dirs else f"checkpoints in {workdir}/checkpoints"]
  if log_path:
    parts.append(f"log {log_path}")
  parts.append(f"TensorBoard: tensorboard --logdir {workdir}")
  return "[done] " + "; ".join(parts)
