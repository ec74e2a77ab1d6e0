"""What a run records of its config: config.json written atomically, a resume with a config that trains differently
refused (or, when allowed, recorded with its step in config_history.json), a workdir that is a file named."""

import errno
import json
import os

import pytest

from configs import synthetic
from dilaff_jax import errors, train
from dilaff_jax.process import files


def _config(**overrides):
  c = synthetic.get_config("tiny")
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def test_a_resume_with_another_learning_rate_is_refused_naming_the_key_and_the_flag(tmp_path):
  w = str(tmp_path)
  train.record_config(w, _config(), step=0, allow_change=False)
  before = open(tmp_path / "config.json").read()
  with pytest.raises(train.ConfigChangedError) as e:
    train.record_config(w, _config(**{"train.learning_rate": 0.05}), step=2, allow_change=False)
  assert "trained to step 2 with another config (train.learning_rate: 0.02 -> 0.05)" in str(e.value)
  assert "--allow_config_change" in str(e.value)
  assert open(tmp_path / "config.json").read() == before  # the record still says how the steps were trained
  assert not os.path.exists(tmp_path / train.CONFIG_HISTORY)


def test_an_allowed_change_is_recorded_with_its_step_and_the_same_config_records_nothing(tmp_path):
  w = str(tmp_path)
  train.record_config(w, _config(), step=0, allow_change=False)
  train.record_config(w, _config(), step=2, allow_change=False)  # the same config: nothing to record
  assert not os.path.exists(tmp_path / train.CONFIG_HISTORY)
  train.record_config(w, _config(**{"train.learning_rate": 0.05}), step=2, allow_change=True)
  train.record_config(w, _config(**{"train.learning_rate": 0.05, "eval.batch_size": 2}), step=3, allow_change=False)
  history = json.load(open(tmp_path / train.CONFIG_HISTORY))
  assert [(h["step"], h["changes"]) for h in history] == [
      (2, {"train.learning_rate": [0.02, 0.05]}),
      (3, {"eval.batch_size": [4, 2]}),  # evaluation keys need no flag, and are recorded too
  ]
  assert json.load(open(tmp_path / "config.json"))["train"]["learning_rate"] == 0.05


def test_a_damaged_change_record_is_named_and_left_as_it_is(tmp_path):
  w = str(tmp_path)
  train.record_config(w, _config(), step=0, allow_change=False)
  for text in ('[{"step": 2', '{"step": 2}'):  # cut short; not a list of changes
    (tmp_path / train.CONFIG_HISTORY).write_text(text)
    with pytest.raises(train.ConfigChangedError) as e:
      train.record_config(w, _config(**{"train.learning_rate": 0.05}), step=2, allow_change=True)
    assert str(e.value).startswith(f"{tmp_path / train.CONFIG_HISTORY} cannot be read (") and "restore it" in str(
        e.value
    )
    assert (tmp_path / train.CONFIG_HISTORY).read_text() == text
    assert json.load(open(tmp_path / "config.json"))["train"]["learning_rate"] == 0.02


def test_keys_of_another_code_version_are_not_changes():
  old = {"train": {"learning_rate": 0.1, "removed_key": 1}, "affinity": {"rates": [4, [6, 12]]}}
  new = {"train": {"learning_rate": 0.1, "new_key": 2}, "affinity": {"rates": [4, [6, 12]]}}
  assert train.config_changes(old, new) == {}
  new["affinity"]["rates"] = [4, 8]
  assert train.config_changes(old, new) == {"affinity.rates": ([4, [6, 12]], [4, 8])}


def test_a_failed_write_leaves_the_file_as_it_was_and_names_path_and_cause(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  files.write_atomic(str(path), "old")

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(
      files.WriteError,
      match=rf"writing {path} failed: \[Errno {errno.ENOSPC}\] No space left on "
      r"device \(\d+\.\d MiB free there\); free disk space",
  ):
    files.write_atomic(str(path), "new")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]  # no temporary file left
  assert isinstance(files.WriteError("x"), errors.UserError)


def test_a_workdir_that_is_a_file_is_named(tmp_path, data_dir):
  not_a_folder = tmp_path / "notes.txt"
  not_a_folder.write_text("x")
  c = _config(**{"dataset.data_dir": data_dir, "train.batch_size": 8, "eval.batch_size": 8})
  with pytest.raises(errors.UserError, match=f"--workdir={not_a_folder} is a file, not a folder"):
    train.train_and_evaluate(c, str(not_a_folder))
  assert not_a_folder.read_text() == "x"


def test_every_process_refuses_alike_and_only_the_writer_writes(tmp_path):
  w = str(tmp_path)
  train.record_config(w, _config(), step=0, allow_change=False)
  with pytest.raises(train.ConfigChangedError):  # a process that does not write still refuses
    train.record_config(w, _config(**{"train.learning_rate": 0.05}), step=2, allow_change=False, write=False)
  train.record_config(w, _config(**{"train.learning_rate": 0.05}), step=2, allow_change=True, write=False)
  assert not os.path.exists(tmp_path / train.CONFIG_HISTORY)  # ... and writes nothing
  assert json.load(open(tmp_path / "config.json"))["train"]["learning_rate"] == 0.02
