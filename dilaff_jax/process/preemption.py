"""Preemption of a training: SIGTERM (a scheduler's notice) becomes a flag the loop reads after each step, so that
it saves a checkpoint and stops cleanly (exit code 3 from the command line)."""

import signal

from absl import logging


class Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (then it checkpoints and returns)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, the orbax preemption check still works multi-host
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
