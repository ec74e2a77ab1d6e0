"""Errors a user can cause, and the exit codes of the command-line tools.

A :class:`UserError` is a mistake in what the user gave (a file, a config key or value, a damaged checkpoint,
a busy workdir): the command-line tools print ``error: <message>`` as one line on stderr and exit with
:data:`EXIT_USER_ERROR`, without a traceback (``--verbosity=1`` or ``DILAFF_TRACEBACK=1`` shows it for bug
reports). Any other exception is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2  # a bad input: the message names it and what to do
EXIT_PREEMPTED = 3  # training stopped on SIGTERM/preemption after saving a checkpoint; rerun to resume


class UserError(Exception):
  """A user's mistake; the message names the file, key or value and says what to do."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named (or must provide) is not there; the message names it and where to get it."""
