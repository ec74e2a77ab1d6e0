"""Running the package's command-line tools in their own process, as a user does, and reading what they print."""

import os
import re
import subprocess
import sys

from dilaff_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic.py")

# An absl / glog log record: "E1126 22:00:00.123456  1234 file.cc:73] message" (Python's absl and XLA's C++ alike).
_LOG_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def run_cli(module, *args, env=None, timeout=300, **kwargs):
  """``python -m module args...`` from the repository root; the test process's environment (8 CPU devices,
  set in conftest) plus ``env``."""
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=dict(os.environ, **(env or {})),
      **kwargs,
  )


def main_cli_args(data_dir, workdir, *args) -> list[str]:
  """The arguments of ``python -m dilaff_jax.main`` on the tiny demo config with batches that divide over the 8 CPU
  devices, then ``args``."""
  return [
      f"--config={CONFIG}:tiny",
      f"--workdir={workdir}",
      f"--config.dataset.data_dir={data_dir}",
      "--config.train.batch_size=8",
      "--config.eval.batch_size=8",
      *args,
  ]


def main_cli(data_dir, workdir, *args, env=None, timeout=300):
  """``python -m dilaff_jax.main`` with :func:`main_cli_args`, run to its end."""
  return run_cli("dilaff_jax.main", *main_cli_args(data_dir, workdir, *args), env=env, timeout=timeout)


def user_facing_lines(stderr: str) -> list[str]:
  """A command's stderr without log records (a header line and its continuation lines, e.g. XLA's multi-line
  slow-compile alarm on a loaded machine): the lines a user's message is made of. A traceback is always kept."""
  out, in_record = [], False
  for line in stderr.strip().splitlines():
    if _LOG_RECORD.match(line):
      in_record = True
    elif in_record and not line.startswith(("error: ", "Traceback")):
      continue
    else:
      in_record = False
      out.append(line)
  return out


def assert_one_error_line(proc, *fragments):
  """Exit code 2, stderr's last line starts with ``error:`` and holds every fragment, no traceback anywhere."""
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, (fragment, last)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return last


def run_outside_the_project(script: str, *args: str, cwd: str) -> dict:
  """Runs ``script`` (Python source) with ``args`` in ``cwd``, without the repository on the path (as a deployment
  would): it must exit 0 and print, as its last line, a JSON object whose ``modules`` lists no module of the
  project (``dilaff...``). Returns that object."""
  import json

  path = os.path.join(cwd, "outside.py")
  with open(path, "w") as f:
    f.write(script)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  run = subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["modules"] == [], out  # plain JAX / TensorFlow, not the project
  return out
