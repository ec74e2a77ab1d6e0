"""research/curves.py: a run's TensorBoard scalars read back exactly and drawn."""

import os

import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from dilaff_jax.research import curves


def _write(workdir, points):
  writer = metric_writers.create_default_writer(str(workdir))
  for step, scalars in points:
    writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()


def test_scalars_read_back_and_a_resumed_step_keeps_its_last_value(tmp_path):
  _write(tmp_path, [(1, {"train/loss": 2.5}), (2, {"train/loss": 1.25, "validation/miou": 0.5})])
  _write(tmp_path, [(2, {"train/loss": 1.0}), (3, {"train/loss": 0.75})])  # a resumed run: a second event file
  scalars = curves.read_scalars(str(tmp_path))
  assert scalars["train/loss"] == [(1, 2.5), (2, 1.0), (3, 0.75)]
  assert scalars["validation/miou"] == [(2, 0.5)]
  # the order of writing decides, not the file names: renamed so that the resumed run's file sorts first (as TF's
  # per-process counter does within one second: "...10.v2" before "...9.v2")
  first, second = sorted(p for p in os.listdir(tmp_path) if p.startswith("events.out.tfevents."))
  os.rename(tmp_path / first, tmp_path / "events.out.tfevents.1.host.1.9.v2")
  os.rename(tmp_path / second, tmp_path / "events.out.tfevents.1.host.1.10.v2")
  assert curves.read_scalars(str(tmp_path)) == scalars
  out = str(tmp_path / "curves.png")
  assert curves.plot(scalars, ["validation/miou", "nope", "train/loss"], out, "run") == [
      "validation/miou",
      "train/loss",
  ]
  width, height = Image.open(out).size
  assert width > 1.8 * height  # two panels side by side
  assert np.asarray(Image.open(out).convert("L")).std() > 0


def test_the_command_names_a_folder_without_events_and_unknown_tags(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    curves.main([f"--workdir={tmp_path}", f"--output={tmp_path / 'c.png'}"])
  assert e.value.code == 2 and "no TensorBoard event file" in capsys.readouterr().err
  _write(tmp_path, [(1, {"train/loss": 1.0})])
  with pytest.raises(SystemExit):
    curves.main([f"--workdir={tmp_path}", f"--output={tmp_path / 'c.png'}", "--tags=validation/miou"])
  assert "none of the scalars validation/miou was written (found: train/loss)" in capsys.readouterr().err
  assert curves.main([f"--workdir={tmp_path}", f"--output={tmp_path / 'c.png'}"]) == 0
  assert os.path.exists(tmp_path / "c.png") and "train/loss ->" in capsys.readouterr().out


def test_an_event_file_cut_short_gives_the_events_before_the_cut_and_a_note(tmp_path, capsys):
  """A run killed while writing leaves a truncated last record: its scalars up to there are read, with a note, and
  nothing is printed about TensorFlow's deprecated reader."""
  _write(tmp_path, [(step, {"train/loss": 1.0 / step}) for step in (1, 2, 3)])
  (path,) = [tmp_path / p for p in os.listdir(tmp_path) if p.startswith("events.out.tfevents.")]
  assert curves.read_scalars(str(tmp_path))["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
  assert capsys.readouterr().err == ""
  os.truncate(path, os.path.getsize(path) - 5)  # into the last record (step 3's)
  assert curves.read_scalars(str(tmp_path))["train/loss"] == [(1, 1.0), (2, 0.5)]
  err = capsys.readouterr().err
  assert f"[curves] note: {path}: the record after its first " in err and "is truncated or damaged" in err
  assert "deprecated" not in err
