"""Every user mistake ends as one line ``error: ...`` on stderr with exit code 2 and no traceback (the command-line
tools run in subprocesses, failing before any training), a preempted run exits 3, and the checks behind them."""

import json
import os
import subprocess
import sys

import pytest

from configs import synthetic
from dilaff_jax import errors
from dilaff_jax.engine import affinity_stats, run_spec
from dilaff_jax.method import neighbour_stats
from dilaff_jax.research import stats
from dilaff_jax.process import cli
from cli_helpers import CONFIG, REPO, assert_one_error_line, main_cli, run_cli
from test_train import tiny_config

# ---------------------------------------------------------------------------------------------- config mistakes


def test_mistyped_config_key_names_the_nearest_key(data_dir, tmp_path):
  proc = main_cli(data_dir, tmp_path / "w", "--config.train.learnig_rate=0.1")
  last = assert_one_error_line(proc)
  assert last == "error: config.train.learnig_rate: no such key; did you mean config.train.learning_rate?"
  assert not (tmp_path / "w").exists()
  # the traceback is there for bug reports when asked for
  proc = main_cli(data_dir, tmp_path / "w", "--config.train.learnig_rate=0.1", env={"DILAFF_TRACEBACK": "1"})
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.train.learnig_rate: no such key")


def test_help_read_by_a_reader_that_stops_early_ends_quietly():
  """``python -m dilaff_jax.main --help | head -1``: the help is longer than a pipe holds and the reader goes away
  while it is written; that is no mistake of the user's (before: sometimes ``error: [Errno 32] Broken pipe``, exit
  2, depending on which write met the closed pipe). The flag parsing meets the closed pipe for certain here."""
  code = (
      "from dilaff_jax import main\n"
      "def gone(argv):\n"
      "  raise BrokenPipeError(32, 'Broken pipe')\n"
      "main.FLAGS = gone\n"
      "main.parse_flags(['main', '--config=configs/synthetic.py', '--help'])\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "")


def test_nearest_key_and_override_parsing():
  config = synthetic.get_config()
  assert cli.missing_key(config, "train.learning_rate") is None
  assert cli.missing_key(config, "eval.scales[0]") is None
  assert cli.missing_key(config, "afinity.lam") == "config.afinity.lam: no such key; did you mean config.affinity.lam?"
  assert cli.missing_key(config, "learning_rate") == (
      "config.learning_rate: no such key; did you mean " "config.train.learning_rate?"
  )
  assert cli.missing_key(config, "xyz") == "config.xyz: no such key; see configs/default.py for every key"
  assert cli.missing_key(config, "train.num_steps.x").startswith("config.train.num_steps.x: no such key")
  argv = ["--config=a.py:tiny", "--config.a.b=1", "-config.c=2", "--noconfig.d.e", "--configx=3", "--other=4"]
  assert cli.overrides(argv) == ["a.b", "c", "d.e"]
  assert cli.config_spec(argv) == "a.py:tiny" and cli.config_spec(["--config", "b.py"]) == "b.py"


def test_mistyped_variant_and_missing_config_file(tmp_path):
  proc = run_cli("dilaff_jax.main", f"--config={REPO}/configs/voc.py:tabel1_sqrt", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(
      proc,
      "unknown config variant 'tabel1_sqrt' (did you mean table1_sqrt?); known: aaf, baseline, boundary, "
      "paper, table1_baseline, table1_neighbor, table1_signal, table1_sqrt, table2_r8_12x24_16",
  )
  proc = run_cli("dilaff_jax.main", f"--config={CONFIG}:tyni", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(proc, "unknown config variant 'tyni' (did you mean tiny?); known: aaf, baseline, ", ", tiny")
  proc = run_cli("dilaff_jax.main", f"--config={tmp_path}/nope.py", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(proc, f"--config={tmp_path}/nope.py: no such config file")
  proc = run_cli(
      "dilaff_jax.main", f"--config={CONFIG}:tiny", f"--workdir={tmp_path / 'w'}", "--config.train.num_steps=many"
  )
  assert_one_error_line(proc, "--config.train.num_steps=many")
  assert not (tmp_path / "w").exists()


def test_unknown_dataset_lists_this_projects_datasets(data_dir, tmp_path):
  proc = main_cli(data_dir, tmp_path / "w", "--config.dataset.name=voc2012")
  assert_one_error_line(
      proc,
      "config.dataset.name = 'voc2012': not one of this project's datasets "
      "(synthetic_shapes/default, synthetic_shapes/tiny, voc2012_aug, cityscapes19, image_folder)",
  )
  assert len(proc.stderr.strip().splitlines()) < 5  # not TFDS's list of every dataset it knows


def test_num_classes_not_matching_the_dataset_fails_before_anything_is_written(data_dir, tmp_path):
  proc = main_cli(data_dir, tmp_path / "w", "--config.dataset.num_classes=21")
  assert_one_error_line(
      proc, "config.dataset.num_classes = 21: synthetic_shapes/tiny has 6 classes (background, " "red_stripes"
  )
  assert not (tmp_path / "w").exists()  # no config.json, no statistics, no checkpoint


def test_eval_max_images_minus_one_exits_2_in_evaluate_mode(data_dir, tmp_path):
  proc = main_cli(data_dir, tmp_path / "w", "--mode=evaluate", "--config.eval.max_images=-1")
  assert_one_error_line(proc, "config.eval.max_images = -1: expected an integer >= 0")


# ---------------------------------------------------------------------------------------------- inputs


def test_garbage_pretrained_weights_exit_2_naming_the_file(data_dir, tmp_path):
  weights = tmp_path / "resnet18.safetensors"
  weights.write_bytes(b"garbage garbage garbage garbage")
  proc = main_cli(data_dir, tmp_path / "w", "--config.affinity.enabled=False", f"--config.model.pretrained={weights}")
  assert_one_error_line(proc, f"cannot read pretrained weights '{weights}'", "header too large")
  # (NaN tensors, wrong keys and shapes: tests/test_pretrained.py, through the same error class)


def test_statistics_from_images_too_small_for_a_rate_fail_before_jit(data_dir, tmp_path):
  # synthetic_shapes/tiny has 48-64 px label maps: at rate 32 no pixel has all 8 neighbours (needs > 65x65), so
  # under the literal n_k rule ("count": k = positives among all 8) n_8 never occurs and its sqrt weight is undefined
  config = tiny_config(
      data_dir,
      **{"affinity.rates": (4, 32), "affinity.stats_max_images": 3, "affinity.partial_neighbors": "count"},
  )
  with pytest.raises(
      neighbour_stats.StatsError,
      match=r"freq\(n_8, r\) is 0 at rate 32 in the statistics of "
      r"synthetic_shapes/tiny:train: the 'sqrt' weights \(Eq. 5\) are undefined\. A pixel has 8 "
      r"neighbours at this rate only in label maps larger than 65x65 pixels, the largest label map "
      r"is 6\dx6\d",
  ):
    affinity_stats.load_or_compute(run_spec.derive(config), str(tmp_path))
  assert not os.path.exists(tmp_path / "affinity_stats.json")  # a rerun fails the same way
  config.affinity.scheme = "none"  # no per-category weights: the same statistics are usable
  assert affinity_stats.load_or_compute(run_spec.derive(config), str(tmp_path)).freq[1, 8] == 0
  # the default rule ("rescale": k from the valid neighbours only) does see n_8 at rate 32 in these maps
  config.affinity.scheme, config.affinity.partial_neighbors = "sqrt", "rescale"
  assert affinity_stats.load_or_compute(run_spec.derive(config), str(tmp_path / "rescale")).freq[1, 8] > 0


def test_stats_command_line_bad_rates_and_too_small_images(data_dir, tmp_path, capsys):
  common = ["--dataset=synthetic_shapes/tiny", f"--data_dir={data_dir}", f"--output={tmp_path / 's.json'}"]
  assert_one_error_line(
      run_cli("dilaff_jax.research.stats", *common, "--rates=8,12y24"), "--rates=8,12y24: cannot parse rate " "'12y24'"
  )
  proc = run_cli("dilaff_jax.research.stats", *common, "--rates=4,80", "--max_images=2")
  assert_one_error_line(proc, "has a valid neighbour at rate(s) 80 in 2 label map(s)", "the largest label map is 6")
  cases = {
      "--rates=8,8": "--rates=8,8: ",
      "--rates=,": "--rates=,: expand_rates: the set of rates R is empty",
      "--max_images=-1": "--max_images=-1: expected 0",
      "--dataset=voc2012": "dataset 'voc2012' is not one of " "this project's datasets",
      "--split=tran": "split 'tran' of synthetic_shapes/tiny",
  }
  for arg, message in cases.items():  # the same entry point, in this process
    assert stats.main([*common, "--rates=8", arg]) == 2, arg
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), (arg, err)
  assert stats.main(["--rates=8"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: --dataset and --output are required (see python -m dilaff_jax.research.stats --help)"
  ]
  for argv, message in (
      (["--dataset=x", "--output=y", "--max_images=two"], "--max_images"),
      (["--dataset=x", "--output=y", "--partial_neighbours=count"], "partial_neighbours"),
      (["--dataset=x", "--output=y", "stray"], "unexpected argument 'stray'"),
  ):
    assert stats.main(argv) == 2, argv  # absl's parse errors: one line too, before any data is read
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
  assert not (tmp_path / "s.json").exists()


# ---------------------------------------------------------------------------------------------- exit codes


def test_preempted_training_exits_3(tmp_path):
  script = f"""
import sys
from absl import app
from dilaff_jax import main, train
train.train_and_evaluate = lambda config, workdir, **kw: {{"train": {{}}, "preempted_at": 2}}
sys.argv = ["main", "--config={CONFIG}:tiny", "--workdir={tmp_path / 'w'}", *{EIGHT!r}]
app.run(main.main, flags_parser=main.parse_flags)
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == errors.EXIT_PREEMPTED == 3, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "module",
    ["main", "predict", "export", "research.stats", "research.propagation_diagnosis", "datasets.prepare"],
)
def test_every_command_keeps_tensorflows_start_up_notices_off_the_terminal(module):
  """Each command that reads data through TensorFlow sets, before TensorFlow is imported, its log level and oneDNN
  off (unless the user set them): on CPUs where TensorFlow turns oneDNN on by default (AVX-512 VNNI, AMX) it prints a
  notice whatever the log level, two lines above a user's one ``error:`` line. On such a CPU importing TensorFlow then
  prints nothing; on others the variables are still checked."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  code = (
      f"import os, dilaff_jax.{module}, tensorflow; "
      "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["2", "0"], proc.stdout
  assert "oneDNN" not in proc.stderr and "InitializeLog" not in proc.stderr, proc.stderr[-2000:]


def test_print_config_prints_the_validated_config_and_needs_no_workdir(tmp_path):
  eight = ("--config.train.batch_size=8", "--config.eval.batch_size=8")  # the tests' 8 devices
  proc = run_cli(
      "dilaff_jax.main", f"--config={CONFIG}:tiny", "--mode=print_config", "--config.affinity.beta=0.5", *eight
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout)
  assert printed["affinity"]["beta"] == 0.5 and printed["dataset"]["name"] == "synthetic_shapes/tiny"
  assert printed["affinity"]["rates"] == [4, [6, 12], 8]
  proc = run_cli(
      "dilaff_jax.main", f"--config={CONFIG}:tiny", "--mode=print_config", "--config.affinity.scheme=x", *eight
  )
  assert_one_error_line(proc, "config.affinity.scheme = 'x': expected one of")
  proc = run_cli("dilaff_jax.main", f"--config={CONFIG}:tiny")  # training needs its folder
  assert_one_error_line(proc, "--workdir is required")


EIGHT = ("--config.train.batch_size=8", "--config.eval.batch_size=8")  # the tests' 8 devices


def test_the_readmes_config_paths_work_from_any_folder(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  (repo / "configs").mkdir(parents=True)
  (repo / "configs" / "voc.py").write_text("")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  found = str(repo / "configs" / "voc.py")
  assert cli.with_config_found(["--config=configs/voc.py:baseline", "--x=1"], repository=str(repo)) == [
      f"--config={found}:baseline",
      "--x=1",
  ]
  assert cli.with_config_found(["--config", "configs/voc.py"], repository=str(repo)) == ["--config", found]
  assert cli.with_config_found(["--config=configs/nope.py"], repository=str(repo)) == ["--config=configs/nope.py"]
  (elsewhere / "configs").mkdir()
  (elsewhere / "configs" / "voc.py").write_text("")  # the user's own file of that name wins
  assert cli.with_config_found(["--config=configs/voc.py"], repository=str(repo)) == ["--config=configs/voc.py"]
  # the real command, from another folder
  proc = subprocess.run(
      [sys.executable, "-m", "dilaff_jax.main", "--config=configs/synthetic.py:tiny", "--mode=print_config", *EIGHT],
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '"name": "synthetic_shapes/tiny"' in proc.stdout


def test_the_study_tools_name_a_missing_or_damaged_study_file_in_their_own_words(tmp_path, capsys):
  """``research.tuning`` and ``research.answer`` read a study folder: one without study.json is named with what
  that tool needs (not the study's --config/--rows, which they do not have), a damaged study.json or tuning.json
  with how to write it again; ``research.geometry`` takes no flags."""
  from dilaff_jax.research import answer, geometry, tuning  # pylint: disable=import-outside-toplevel

  w = str(tmp_path / "nothing")
  calls = (
      (tuning.main, [f"--workdir={w}", "--choices=x", "--output=o"], "give the tune stage's study folder"),
      (answer.main, [f"--workdir={w}", "--claims=x", "--output=o"], "give the test stage's study folder"),
      (geometry.main, ["--rates=4"], "Unknown command line flag 'rates'"),
      (geometry.main, ["stray"], "unexpected argument 'stray'"),
  )
  for main, argv, advice in calls:
    with pytest.raises(SystemExit) as exited:
      main(argv)
    assert exited.value.code == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and advice in err[0], err
    if main is not geometry.main:
      assert err[0].startswith(f"error: --workdir={w}: no study.json there: ") and "--rows" not in err[0], err
  # damaged files they read: a study.json cut short or of another shape, a tuning.json that is not one
  os.makedirs(w)
  damaged = {
      "study.json": ('{"rows": [', "cannot be read"),
      "study2.json": ('{"rows": [{"name": "a"}]}', "is not a study's study.json"),
  }
  for name, (text, said) in damaged.items():
    with open(os.path.join(w, "study.json"), "w") as f:
      f.write(text)
    with pytest.raises(SystemExit):
      answer.main([f"--workdir={w}", "--claims=x", "--output=o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {os.path.join(w, 'study.json')} {said}"), (name, err)
    assert "rerun the study's own command" in err[0]
  for text in ("[1, 2", '{"complete": true, "choices": [{"variant": ""}]}'):
    with open(tmp_path / "tuning.json", "w") as f:
      f.write(text)
    with pytest.raises(SystemExit):
      tuning.main([f"--check={tmp_path / 'tuning.json'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --check={tmp_path / 'tuning.json'} is not a readable"), err
