"""The workdir's text log (``process/run_log.py``) and the run's closing line."""

import datetime
import io
import logging as stdlib_logging
import sys

from absl import logging

from dilaff_jax.process import run_log


def test_everything_printed_goes_to_the_terminal_and_the_log_and_runs_append(tmp_path, capsys):
  logging.use_absl_handler()  # as app.run does in the jobs
  stdlib_logging.root.setLevel(stdlib_logging.WARNING)
  for run in (1, 2):
    with run_log.tee(str(tmp_path), ["--workdir=w", f"--run={run}"]) as path:
      print(f"out {run}")
      print(f"err {run}", file=sys.stderr)
      logging.warning("absl %d", run)
  assert path == str(tmp_path / "log.txt")
  captured = capsys.readouterr()
  assert "out 1\n" in captured.out and "out 2\n" in captured.out and "err 2\n" in captured.err
  lines = open(path).read().splitlines()
  headers = [i for i, line in enumerate(lines) if line.startswith("===== ")]
  assert len(headers) == 2 and lines[headers[1]].endswith("python -m dilaff_jax.main --workdir=w --run=2")
  first, second = lines[: headers[1]], lines[headers[1] :]
  assert "out 1" in first and "err 1" in first and any(line.endswith("] absl 1") for line in first)
  assert "out 2" in second and "out 1" not in second
  assert sys.stdout is not None and not isinstance(sys.stdout, run_log._Tee)  # restored
  stdlib_logging.root.removeHandler(logging.get_absl_handler())


def test_no_folder_no_log_and_nothing_created(tmp_path):
  with run_log.tee(str(tmp_path / "missing"), []) as path:
    print("hello")
  assert path is None and not (tmp_path / "missing").exists()


def test_output_already_redirected_into_the_log_is_not_doubled(tmp_path, monkeypatch):
  log = tmp_path / "log.txt"
  with open(log, "a") as f:
    monkeypatch.setattr(sys, "stdout", f)
    with run_log.tee(str(tmp_path), []) as path:
      print("once")
  assert path == str(log) and open(log).read() == "once\n"


def test_a_log_that_stops_being_writable_never_stops_the_run():
  terminal, copy = io.StringIO(), io.StringIO()
  tee = run_log._Tee(terminal, copy)
  tee.write("a\n")
  copy.close()  # as a full disk would make every write fail
  tee.write("b\n")
  tee.flush()
  assert terminal.getvalue() == "a\nb\n"


def test_header_and_closing_line():
  when = datetime.datetime(2026, 12, 5, 6, 7, 8, tzinfo=datetime.timezone.utc)
  assert run_log.header(["--workdir=my runs"], when) == (
      "===== 2026-12-05 06:07:08 UTC: python -m dilaff_jax.main '--workdir=my runs'\n"
  )
  line = run_log.closing_line("runs/x", ["runs/x/eval/step_4"], "runs/x/log.txt")
  assert line == "[done] results in runs/x/eval/step_4; log runs/x/log.txt; TensorBoard: tensorboard --logdir runs/x"
  assert run_log.closing_line("w", [], None).startswith("[done] checkpoints in w/checkpoints; TensorBoard")
