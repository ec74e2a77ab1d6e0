"""What the command-line tools share: a user's mistake ends as one line ``error: <message>`` on stderr with exit
code :data:`errors.EXIT_USER_ERROR`, and a mistyped ``--config`` (file, variant or ``--config.KEY`` override) is
named with the nearest existing key or the known variants.

A traceback is printed above the error line only for bug reports: with ``--verbosity=1`` (or higher) or the
environment variable ``DILAFF_TRACEBACK=1``.
"""

from __future__ import annotations

import difflib
import faulthandler
import importlib.util
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from absl import flags

from dilaff_jax import errors


def wants_traceback(verbosity: int | None = 0) -> bool:
  """Whether a user error should also print its traceback (``DILAFF_TRACEBACK=1`` or verbosity >= 1)."""
  return os.environ.get("DILAFF_TRACEBACK", "").strip() not in ("", "0") or (verbosity or 0) >= 1


def one_line(error: BaseException | str) -> str:
  """The error's message on one line (indented continuation lines joined with spaces)."""
  text = str(error)
  return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(error).__name__


def exit_with_error(error: BaseException | str, *, show_traceback: bool = False) -> NoReturn:
  """Prints ``error: <message>`` (after the traceback if asked) and exits with :data:`errors.EXIT_USER_ERROR`."""
  if show_traceback and isinstance(error, BaseException):
    traceback.print_exception(error)
  print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def print_stacks_on_sigusr1() -> None:
  """``kill -USR1 <pid>`` then prints the stack of every thread of this process to its stderr (not to the
  workdir's log.txt) and the process goes on: what a run that seems stuck is doing, e.g. a process of a multi-host
  run waiting in a barrier for another. Nothing happens where the system has no SIGUSR1 (Windows)."""
  if hasattr(signal, "SIGUSR1"):
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True, chain=False)


def exit_reader_gone() -> NoReturn:
  """Ends quietly when the reader of stdout has gone (``--help | head``), as a Unix tool does: no error line."""
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
  sys.exit(1)


# ----------------------------------------------------------------------------------------------- flags


def parse_flags(
    define: Callable[[flags.FlagValues], None], argv: Sequence[str], prog: str, doc: str, required: Sequence[str] = ()
) -> flags.FlagValues | None:
  """absl flags for a tool without a ``--config``: a fresh flag set (no global state) made by ``define``, parsed
  from ``argv`` (without the program name). ``--help`` prints ``doc`` and the flags and returns None. A missing
  ``required`` flag, an unknown flag, a bad value or a stray argument raises :class:`errors.UserError` in one line."""
  fv = flags.FlagValues()
  define(fv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(doc.rstrip() + "\n\nFlags:\n" + fv.get_help(), flush=True)
    return None
  see = f"(see python -m {prog} --help)"
  try:
    rest = fv([prog, *argv])
  except flags.Error as e:
    raise errors.UserError(f"{one_line(e)} {see}") from None
  if len(rest) > 1:
    raise errors.UserError(f"unexpected argument {rest[1]!r}: every option is a --flag=VALUE {see}")
  missing = [f"--{name}" for name in required if fv[name].value in (None, "")]
  if missing:
    raise errors.UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required {see}")
  return fv


# ----------------------------------------------------------------------------------------------- config flags


def flat_keys(config: Mapping, prefix: str = "config") -> list[str]:
  """Every dotted key of a (nested) config, inner nodes included: ``config.train``, ``config.train.num_steps``."""
  keys = []
  for key in config.keys():
    path = f"{prefix}.{key}"
    keys.append(path)
    value = config[key]
    if isinstance(value, Mapping) or hasattr(value, "keys") and hasattr(value, "__getitem__"):
      keys.extend(flat_keys(value, path))
  return keys


def missing_key(config: Mapping, key: str, prefix: str = "config") -> str | None:
  """None if the dotted ``key`` (``train.learning_rate``; an index suffix like ``scales[0]`` is allowed) names an
  entry of ``config``; else a message naming it and the nearest existing key."""
  node = config
  for part in key.split("."):
    name = re.sub(r"(\[\d+\])+$", "", part)
    if not (hasattr(node, "keys") and name in node.keys()):
      full = f"{prefix}.{key}"
      known = [k[len(prefix) + 1 :] for k in flat_keys(config, prefix)]
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      hint = f"did you mean {prefix}.{close[0]}?" if close else "see configs/default.py for every key"
      return f"{full}: no such key; {hint}"
    node = node[name]
  return None


def overrides(argv: Sequence[str], flag: str = "config") -> list[str]:
  """The keys of the ``--config.KEY=VALUE`` (and boolean ``--[no]config.KEY``) overrides in ``argv``."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(flag)}\.([^=]+)")
  return [m.group(1) for m in map(pattern.match, argv) if m]


def config_spec(argv: Sequence[str], flag: str = "config") -> str | None:
  """The value of ``--config=FILE[:VARIANT]`` (or ``--config FILE``) in ``argv``, the last one given."""
  spec = None
  for i, arg in enumerate(argv):
    match = re.match(rf"^--?{re.escape(flag)}(=(.*))?$", arg)
    if match:
      spec = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return spec


# The folder that holds the package and ``configs/`` (an editable install or a checkout).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def with_config_found(argv: Sequence[str], flag: str = "config", repository: str = REPOSITORY) -> list[str]:
  """``argv`` with a relative ``--config=FILE[:VARIANT]`` that is not under the current folder but is under the
  repository (``configs/voc.py``) given as that file's absolute path: the README's commands run from any folder.
  A path found in the current folder is kept (a user's own config wins)."""
  out = list(argv)
  for i, arg in enumerate(out):
    match = re.match(rf"^(--?{re.escape(flag)}=)(.*)$", arg)
    if match:
      prefix, spec = match.groups()
    elif re.match(rf"^--?{re.escape(flag)}$", arg) and i + 1 < len(out):
      prefix, spec, i = "", out[i + 1], i + 1
    else:
      continue
    path, colon, variant = spec.partition(":")
    if path and not os.path.isabs(path) and not os.path.exists(path):
      candidate = os.path.join(repository, path)
      if os.path.isfile(candidate):
        out[i] = prefix + candidate + colon + variant
  return out


def load_config_file(spec: str, flag: str = "config"):
  """``get_config(VARIANT)`` of the config file ``FILE[:VARIANT]``; a missing file, an unknown variant or a config
  file that fails raises :class:`errors.UserError` in one line."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"--{flag}={spec}: no such config file")
  try:
    module_spec = importlib.util.spec_from_file_location(f"_dilaff_{flag}_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
  except errors.UserError as e:
    raise errors.UserError(f"--{flag}={spec}: {one_line(e)}") from e
  except Exception as e:  # noqa: BLE001  (the user's config file: any failure is theirs to fix)
    raise errors.UserError(f"--{flag}={spec}: the config file fails: {type(e).__name__}: {one_line(e)}") from e


def flag_error(error: Exception, argv: Sequence[str], config=None, flag: str = "config") -> errors.UserError:
  """A one-line :class:`errors.UserError` for a failure while absl parsed ``argv``.

  ``--config`` problems are diagnosed afresh rather than read from absl's or ml_collections' text (which nests the
  config file's traceback): the config is ``config`` if given, else loaded from the ``--config=FILE[:VARIANT]`` in
  ``argv``; the first override naming no key is reported with the nearest key. Anything else keeps absl's message.
  """
  result = errors.UserError(one_line(error))
  try:
    if config is None:
      spec = config_spec(argv, flag)
      config = load_config_file(spec, flag) if spec else None
    if config is not None:
      for key in overrides(argv, flag):
        message = missing_key(config, key, flag)
        if message:
          result = errors.UserError(message)
          break
  except errors.UserError as e:
    result = e
  result.__cause__ = error  # the traceback for bug reports shows where absl or the config file failed
  return result
