"""``train.init_from=WORKDIR[:STEP]``: a new training starts from another run's checkpoint, its parameters and batch
statistics copied, the heads whose shapes differ re-initialised and named, step and optimiser state afresh."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from dilaff_jax import train
from dilaff_jax.engine import checkpoints, config_checks, run_spec, warm_start
from dilaff_jax.engine import train_state as state_lib
from cli_helpers import assert_one_error_line, main_cli
from test_train import restored_variables, tiny_config


def _fresh_state(config):
  """The state training starts from, before any checkpoint (train.py builds it the same way)."""
  spec = run_spec.derive(config)
  return state_lib.create_train_state(spec, state_lib.build_model(spec), jax.random.key(config.seed))


def _flat(state):
  return {
      (collection, *path): np.asarray(value)
      for collection in ("params", "batch_stats")
      for path, value in traverse_util.flatten_dict(
          getattr(state, collection) if hasattr(state, collection) else state[collection]
      ).items()
  }


@pytest.fixture(scope="module")
def source_run(data_dir, tmp_path_factory):
  """A tiny run trained 2 steps: (workdir, config, its step-2 variables)."""
  workdir = str(tmp_path_factory.mktemp("source_run"))
  config = tiny_config(data_dir, **{"train.num_steps": 2})
  train.train_and_evaluate(config, workdir)
  return workdir, config, restored_variables(workdir, config)[1]


def test_copies_trained_variables_and_reinitialises_an_affinity_head_of_other_width(
    source_run, data_dir, tmp_path, capsys
):
  workdir, _, source = source_run
  config = tiny_config(data_dir, **{"affinity.rates": (4, 8), "train.num_steps": 2, "train.init_from": workdir})
  fresh = _fresh_state(config)
  lines = []
  started = warm_start.warm_start(config, fresh, report=lines.append)
  got, init, src = _flat(started), _flat(fresh), _flat(source)
  assert set(got) == set(init)
  copied = 0
  for path, value in got.items():
    if path[1] == "affinity":  # 16 channels here (2 rates), 32 in the source (4 rates): fresh initialisation
      assert value.shape != src[path].shape
      np.testing.assert_array_equal(value, init[path])
    else:
      np.testing.assert_array_equal(value, src[path], err_msg=str(path))
      copied += 1
  assert copied == len(got) - 2  # all but the affinity kernel and bias
  changed = [p for p in got if p[1] != "affinity" and not np.array_equal(src[p], init[p])]
  assert len(changed) > copied // 2  # the source was trained: copying is not a no-op
  assert int(started.step) == 0
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(started.opt_state))  # momentum starts at zero
  (line,) = lines
  assert f"initialised from step 2 of {workdir}: copied {copied} of {len(got)}" in line
  assert "re-initialised" in line and "affinity/kernel (1, 1, 16, 16) here, (1, 1, 16, 32) in the checkpoint" in line
  assert "classifier" not in line

  run = str(tmp_path / "new")  # the same through the training loop: a new run of 2 steps, not a resume at step 2
  train.train_and_evaluate(config, run)
  out = capsys.readouterr().out
  assert f"[train] initialised from step 2 of {workdir}" in out
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]
  step, trained = restored_variables(run, config)
  assert step == 2
  train.train_and_evaluate(config, run)  # a rerun resumes its own checkpoint and does not initialise again
  assert "initialised from" not in capsys.readouterr().out
  assert restored_variables(run, config)[0] == 2


def test_classifier_of_another_class_count_is_reinitialised_and_another_model_refused(data_dir, tmp_path):
  source_config = tiny_config(data_dir, **{"dataset.num_classes": 4, "affinity.rates": (4, 8)})
  source = _fresh_state(source_config)
  source = source.replace(  # distinct from any fresh initialisation
      params=jax.tree.map(lambda x: x + 0.5, source.params),
      batch_stats=jax.tree.map(lambda x: x + 2.0, source.batch_stats),
  ).replace(step=5)
  workdir = str(tmp_path / "source")
  with checkpoints.opened(workdir, source_config, write=True) as mngr:
    checkpoints.save_checkpoint(
        mngr, source, {"compat": checkpoints.compat_record(run_spec.derive(source_config)), "step": 5}
    )
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(source_config.to_json_best_effort())

  config = tiny_config(data_dir, **{"train.init_from": f"{workdir}:5"})
  config_checks.validate(config, num_devices=8)
  fresh = _fresh_state(config)
  lines = []
  started = warm_start.warm_start(config, fresh, report=lines.append)
  got, init, src = _flat(started), _flat(fresh), _flat(source)
  for path, value in got.items():
    if path[1] in ("classifier", "affinity"):
      np.testing.assert_array_equal(value, init[path])
      assert value.shape != src[path].shape
    else:
      np.testing.assert_array_equal(value, src[path], err_msg=str(path))
      assert not np.array_equal(value, init[path])
  assert "classifier/kernel (1, 1, 16, 6) here, (1, 1, 16, 4) in the checkpoint" in lines[0]
  assert "affinity/kernel (1, 1, 16, 32) here, (1, 1, 16, 16) in the checkpoint" in lines[0]
  assert "from step 5 of" in lines[0] and int(started.step) == 0

  other = tiny_config(data_dir, **{"train.init_from": workdir, "model.aspp_channels": 8})
  with pytest.raises(warm_start.WarmStartError, match=r"train.init_from: the checkpoint's parameters differ .*aspp/"):
    warm_start.warm_start(other, _fresh_state(other), report=lines.append)
  missing = tiny_config(data_dir, **{"train.init_from": f"{workdir}:7"})
  with pytest.raises(checkpoints.NoCheckpointError, match=r"no checkpoint for step 7 .* available: \[5\]"):
    warm_start.warm_start(missing, fresh, report=lines.append)
  with pytest.raises(config_checks.ConfigError, match="has no config.json"):
    config_checks.validate(tiny_config(data_dir, **{"train.init_from": str(tmp_path)}), num_devices=8)


def test_init_from_a_missing_folder_is_one_error_line(data_dir, tmp_path):
  proc = main_cli(data_dir, str(tmp_path / "run"), f"--config.train.init_from={tmp_path / 'nowhere'}")
  assert_one_error_line(proc, "config.train.init_from", "no such folder")
