"""The study runner: row grammar, aggregation maths on fabricated results (hand-computed means, ddof=1 standard
deviations, paired differences, partial seeds), export, and one end-to-end study on the tiny config."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from dilaff_jax.process import machine
from dilaff_jax.research import study, tuning
from dilaff_jax.research.study import Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_rows_grammar():
  rows = study.parse_rows(
      ["baseline", "default"],
      "plain=baseline#0,1,2,3,4; plain+crf=evaluate:plain@eval.crf=True@eval.crf_iterations=5;"
      "small=tiny@train.num_steps=2",
      [0, 1, 2],
  )
  assert rows[0] == Row(name="baseline", variant="baseline", seeds=(0, 1, 2))
  assert rows[1] == Row(name="default", variant="", seeds=(0, 1, 2))  # "default": the config without variant
  assert rows[2] == Row(name="plain", variant="baseline", seeds=(0, 1, 2, 3, 4))
  assert rows[3] == Row(
      name="plain+crf", overrides=("eval.crf=True", "eval.crf_iterations=5"), seeds=(0, 1, 2), evaluates="plain"
  )
  assert rows[4] == Row(name="small", variant="tiny", overrides=("train.num_steps=2",), seeds=(0, 1, 2))
  for bad in ("x=evaluate:nothing", "a=tiny;a=tiny", "a b=tiny", "a=tiny@novalue", "a=tiny#1,1", "a=tiny#x", "abc"):
    with pytest.raises(study.StudyError):
      study.parse_rows([], bad, [0])


def test_command_of_a_trained_and_an_evaluate_row(tmp_path):
  rows = study.parse_rows([], "plain=baseline@train.num_steps=8;crf=evaluate:plain@eval.crf=True", [0])
  rows = [Row(**{**r.__dict__, "final_step": 8}) for r in rows]
  w = str(tmp_path)
  train_cmd = study.command("configs/synthetic.py", ["dataset.data_dir=/d"], rows, rows[0], 3, w)
  assert train_cmd[1:] == [
      "-m",
      "dilaff_jax.main",
      "--config=configs/synthetic.py:baseline",
      "--config.seed=3",
      "--config.dataset.data_dir=/d",
      "--config.train.num_steps=8",
      f"--workdir={tmp_path}/plain/seed_3",
  ]
  eval_cmd = study.command("configs/synthetic.py", ["dataset.data_dir=/d"], rows, rows[1], 3, w)
  assert eval_cmd[1:] == [
      "-m",
      "dilaff_jax.main",
      "--config=configs/synthetic.py:baseline",
      "--config.seed=3",
      "--config.dataset.data_dir=/d",
      "--config.train.num_steps=8",
      "--config.eval.crf=True",
      f"--config.eval.output_dir={tmp_path}/crf/seed_3/eval",
      "--mode=evaluate",
      "--step=8",
      f"--workdir={tmp_path}/plain/seed_3",
  ]


def test_plan_is_seed_major_and_resolve_reads_num_steps():
  rows = study.resolve(study.parse_rows(["tiny"], "b=tiny@train.num_steps=7#1,2", [0, 1]), "configs/synthetic.py", [])
  assert [r.final_step for r in rows] == [4, 7]
  assert [(r.name, s) for r, s in study.plan(rows)] == [("tiny", 0), ("tiny", 1), ("b", 1), ("b", 2)]
  with pytest.raises(study.StudyError, match="config.train.bogus: no such key; did you mean config.train.momentum"):
    study.resolve(study.parse_rows([], "a=tiny@train.bogus=1", [0]), "configs/synthetic.py", [])
  with pytest.raises(study.StudyError, match="config.nosuch: no such key"):  # not a bare 'nosuch'
    study.resolve(study.parse_rows([], "a=tiny@nosuch=1", [0]), "configs/synthetic.py", [])


def test_every_rows_config_passes_the_main_jobs_checks_before_anything_runs(monkeypatch):
  """A row the main job would refuse at its start (a bad value; the dense CRF without its optional package) stops the
  study at its start, naming the row, instead of failing after hours of other runs; aggregating does not check."""
  config = "configs/synthetic.py"
  with pytest.raises(study.StudyError, match=r"row 'b': config.affinity.beta = -1.0: "):
    study.resolve(study.parse_rows([], "a=tiny; b=tiny@affinity.beta=-1.0", [0]), config, [])
  rows = study.parse_rows([], "p=tiny; p+crf=evaluate:p@eval.crf=True", [0])
  assert [r.name for r in study.resolve(rows, config, [])] == ["p", "p+crf"]  # the package is installed here
  monkeypatch.setitem(sys.modules, "pydensecrf", None)  # as if it were not: `import pydensecrf` raises ImportError
  monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
  with pytest.raises(
      study.StudyError,
      match=r"row 'p\+crf': config.eval.crf = True: the dense CRF needs the optional package pydensecrf2",
  ):
    study.resolve(rows, config, [])
  assert [r.name for r in study.resolve(rows, config, [], check=False)] == ["p", "p+crf"]


@pytest.mark.parametrize("stage,extras", [("test", "crf"), ("tune", ""), ("answer", "")])
def test_the_launcher_sets_up_the_crf_extra_for_the_stage_with_crf_rows(tmp_path, stage, extras):
  """Stage test's ``+crf`` rows need ``pydensecrf2``: its set-up installs the ``crf`` extra (the launcher run with a
  stand-in set-up that prints what it was given)."""
  os.makedirs(tmp_path / "launch")
  shutil.copy(os.path.join(REPO, "launch", "study.sh"), tmp_path / "launch" / "study.sh")
  (tmp_path / "launch" / "setup.sh").write_text('echo "EXTRAS=[$EXTRAS]"; exit 7\n')
  env = {k: v for k, v in os.environ.items() if k != "EXTRAS"} | {"STAGE": stage}
  proc = subprocess.run(["bash", str(tmp_path / "launch" / "study.sh")], env=env, capture_output=True, text=True)
  assert (proc.returncode, proc.stdout.strip()) == (7, f"EXTRAS=[{extras}]"), proc.stderr


def test_plan_puts_each_evaluate_row_right_after_its_source():
  rows = study.parse_rows([], "a=tiny; b=tiny; a2=evaluate:a; b2=evaluate:b#1; a3=evaluate:a", [0, 1])
  assert [(r.name, s) for r, s in study.plan(rows)] == [
      ("a", 0), ("a2", 0), ("a3", 0), ("b", 0),
      ("a", 1), ("a2", 1), ("a3", 1), ("b", 1), ("b2", 1),
  ]  # fmt: skip


def test_first_rows_run_all_their_seeds_before_the_others():
  rows = study.parse_rows([], "a=tiny; b=tiny; a2=evaluate:a; c=tiny#5", [0, 1])
  assert [(r.name, s) for r, s in study.plan(rows, first=["b", "a"])] == [
      ("a", 0), ("a2", 0), ("b", 0), ("a", 1), ("a2", 1), ("b", 1), ("c", 5),
  ]  # fmt: skip
  assert [(r.name, s) for r, s in study.plan(rows, first=["c"])][:2] == [("c", 5), ("a", 0)]
  with pytest.raises(study.StudyError, match="--first: nope not a row"):
    study.plan(rows, first=["nope"])
  with pytest.raises(study.StudyError, match="--first: a2 evaluate another row"):
    study.plan(rows, first=["a2"])


class _FakeRun:
  """Stands in for ``subprocess.Popen`` of ``dilaff_jax.main``: writes the results (mIoU ``miou``) and, for a
  training, the final checkpoint's folder, where the real command would."""

  def __init__(self, miou):
    self.miou, self.commands, self.popen = miou, [], subprocess.Popen

  def __call__(self, cmd, **kwargs):
    if "dilaff_jax.main" not in cmd:  # another program (e.g. matplotlib's font lookup) runs for real
      return self.popen(cmd, **kwargs)
    self.commands.append(cmd)
    args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    if "--mode=evaluate" in cmd:
      out = args["--config.eval.output_dir"]
    else:
      out = os.path.join(args["--workdir"], "eval")
      os.makedirs(os.path.join(args["--workdir"], "checkpoints", "4"))
    os.makedirs(os.path.join(out, "step_4"), exist_ok=True)
    with open(os.path.join(out, "step_4", "results.json"), "w") as f:
      json.dump({"miou": self.miou, "num_images": 8}, f)
    return self

  def wait(self):
    return 0

  poll = wait


OTHER_MACHINE = {"cpu": "Some CPU", "isa": ["avx2", "fma", "avx512f"], "arch": "x86_64", "jaxlib": "0.0.1"}


@pytest.mark.parametrize(
    "miou,earlier,said",
    [
        (0.5, None, "(the same as recorded)"),
        (0.625, None, "DIFFERS from the recorded 0.5: not deterministic, or computed first on a machine its run.json"),
        (
            0.625,
            OTHER_MACHINE,
            "DIFFERS from the recorded 0.5: computed first on another kind of machine (cpu Some CPU",
        ),
    ],
)
def test_a_study_resumed_from_its_export_trains_a_run_again_for_a_row_that_evaluates_it(
    tmp_path, monkeypatch, capsys, miou, earlier, said
):
  """An export keeps results but no checkpoints: the evaluate row's source is trained again first (its new mIoU
  compared with the recorded one, aloud, naming the machine it was first computed on when that differs; a replaced
  result kept as results.first.json), then the evaluate row runs; a finished row without dependants is not."""
  rows = study.resolve(
      study.parse_rows([], "a=tiny; b=tiny; a2=evaluate:a@affinity.lam=12.0", [0]), "configs/synthetic.py", []
  )
  for name in ("a", "b"):  # what the export holds of two finished runs
    os.makedirs(tmp_path / name / "seed_0" / "eval" / "step_4")
    (tmp_path / name / "seed_0" / "eval" / "step_4" / "results.json").write_text('{"miou": 0.5, "num_images": 8}')
    if earlier:
      (tmp_path / name / "seed_0" / "run.json").write_text(json.dumps({"cores": 1, "machines": [earlier]}))
  fake = _FakeRun(miou)
  monkeypatch.setattr(study.subprocess, "Popen", fake)
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a") == 0
  out = capsys.readouterr().out
  assert [c[-1] for c in fake.commands] == [f"--workdir={tmp_path}/a/seed_0", f"--workdir={tmp_path}/a/seed_0"]
  assert "--mode=evaluate" in fake.commands[1] and "--mode=evaluate" not in fake.commands[0]
  assert "a seed 0: its final checkpoint is gone" in out and f"trained again, mIoU {miou!r} {said}" in out
  step = tmp_path / "a" / "seed_0" / "eval" / "step_4"
  assert json.loads((step / "results.json").read_text())["miou"] == miou
  assert not os.path.exists(step / "results.json.before_training_again")
  if miou == 0.5:
    assert not (step / "results.first.json").exists()
  else:  # the first result stays, and goes into the export
    assert json.loads((step / "results.first.json").read_text())["miou"] == 0.5
    assert "a/seed_0/eval/step_4/results.first.json" in study.export(str(tmp_path), rows, str(tmp_path / "export"))
  machines = json.loads((tmp_path / "a" / "seed_0" / "run.json").read_text())["machines"]
  assert machines == ([earlier] if earlier else []) + [machine.describe()]
  assert ("computed before on another kind of machine" in out) == bool(earlier)
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a") == 0  # now nothing to do
  assert len(fake.commands) == 2


def test_an_evaluate_row_that_changes_no_config_value_takes_its_sources_evaluation(tmp_path, monkeypatch, capsys):
  """An evaluate row whose overrides leave the config as its source's (a value it has already, in the variant or in
  the source's own overrides) is marked, runs nothing and gets its source's results byte for byte, with a run.json
  naming them; even from an export without checkpoints nothing is trained again for it. A row that changes a value
  runs."""
  rows = study.resolve(
      study.parse_rows(
          [],
          "a=tiny@affinity.lam=3.0; same=evaluate:a@affinity.propagation_reading=paper@affinity.lam=3.0;"
          "lam=evaluate:a@affinity.lam=6.0; b=tiny",
          [0],
      ),
      "configs/synthetic.py",
      [],
  )
  assert [r.same_config for r in rows] == [False, True, False, False]
  fake = _FakeRun(0.5)
  monkeypatch.setattr(study.subprocess, "Popen", fake)
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a") == 0
  out = capsys.readouterr().out
  assert [("--mode=evaluate" in c, c[-1]) for c in fake.commands] == [
      (False, f"--workdir={tmp_path}/a/seed_0"),
      (True, f"--workdir={tmp_path}/a/seed_0"),
      (False, f"--workdir={tmp_path}/b/seed_0"),
  ]
  assert "run 2/4: same seed 0: the same config as a: its evaluation taken, nothing run" in out
  assert "run 1/4: a seed 0 (train), 3 left" in out  # the same-config row is not counted as a run to come
  step = lambda name: tmp_path / name / "seed_0" / "eval" / "step_4"
  assert (step("same") / "results.json").read_bytes() == (step("a") / "results.json").read_bytes()
  run = json.loads((tmp_path / "same" / "seed_0" / "run.json").read_text())
  assert run["command"] is None and run["evaluation_of"] == os.path.join("a", "seed_0", "eval", "step_4")
  assert "(no change to `a`'s config: its own evaluation)" in (tmp_path / "study.md").read_text()

  resumed = tmp_path / "export"  # results only: no checkpoints, the same-config row not done yet
  os.makedirs(resumed / "a" / "seed_0" / "eval")
  os.rename(step("a"), resumed / "a" / "seed_0" / "eval" / "step_4")
  fake.commands.clear()
  rows = [r for r in rows if r.name in ("a", "same")]
  assert study.run_study("configs/synthetic.py", [], rows, str(resumed), "a") == 0
  assert fake.commands == [] and (resumed / "same" / "seed_0" / "eval" / "step_4" / "results.json").exists()
  # a damaged source is named, not copied
  (resumed / "a" / "seed_0" / "eval" / "step_4" / "results.json").write_text('{"miou": ')
  shutil.rmtree(resumed / "same")
  with pytest.raises(study.StudyError, match="a/seed_0/eval/step_4/results.json cannot be read"):
    study.run_study("configs/synthetic.py", [], rows, str(resumed), "a")
  assert not (resumed / "same" / "seed_0" / "eval" / "step_4" / "results.json").exists()


def test_run_json_sums_a_runs_seconds_and_a_resumed_study_has_an_eta_at_once(tmp_path, monkeypatch, capsys):
  """run.json records the seconds a run computed, summed over the invocations it ran in; a study started again
  estimates its remaining runs from the finished runs' seconds on the same core count before any run of its own."""
  rows = study.resolve(study.parse_rows([], "a=tiny; b=tiny; c=tiny@affinity.lam=3.0", [0]), "configs/synthetic.py", [])
  fake = _FakeRun(0.5)
  monkeypatch.setattr(study.subprocess, "Popen", fake)
  monkeypatch.setattr(study, "allowed_cores", lambda: (0, 1))
  assert study.run_study("configs/synthetic.py", [], rows[:1], str(tmp_path), "a") == 0
  run_a = json.loads((tmp_path / "a" / "seed_0" / "run.json").read_text())
  assert run_a["cores"] == 2 and 0 <= run_a["seconds"] < 60
  (tmp_path / "a" / "seed_0" / "run.json").write_text(json.dumps({**run_a, "seconds": 600.0}))
  # b was stopped after 50 s of computing on 2 cores; c has no run.json yet
  os.makedirs(tmp_path / "b" / "seed_0")
  (tmp_path / "b" / "seed_0" / "run.json").write_text(json.dumps({**run_a, "seconds": 50.0}))
  capsys.readouterr()
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a") == 0
  out = capsys.readouterr().out
  assert "run 2/3: b seed 0 (train), 2 left, ETA 0h20m00s" in out  # 2 x the 600 s of a, at once
  assert re.search(r"b seed 0: done in 0h00m0\ds \(0h00m5\ds in all\)", out), out
  b_seconds = json.loads((tmp_path / "b" / "seed_0" / "run.json").read_text())["seconds"]
  assert 50.0 <= b_seconds < 60 and json.loads((tmp_path / "c" / "seed_0" / "run.json").read_text())["seconds"] < 10
  # on another core count, a's 600 s say nothing: no ETA before the first run of this invocation
  durations = study.recorded_durations(str(tmp_path), study.plan(rows), 1)
  assert durations == {"train": [], "evaluate": []}


def test_slot_cores_are_equal_shares_in_order_and_bad_jobs_are_named():
  assert study.slot_cores(range(16), 3) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12, 13, 14)]  # 15 unused
  assert study.slot_cores((3, 1, 2, 0), 2) == [(0, 1), (2, 3)]
  assert study.slot_cores((7,), 1) == [(7,)]
  with pytest.raises(study.StudyError, match=r"--jobs=3: this process may use 2 core\(s\)"):
    study.slot_cores((0, 1), 3)
  with pytest.raises(study.StudyError, match="--jobs=0: expected a positive number"):
    study.study_slots(0)


class _SlowFakeRuns:
  """``subprocess.Popen`` of ``dilaff_jax.main`` runs that each end on their third poll, writing their results
  then; records how many ran at once, the cores each was pinned to, and whether an evaluate run's source had
  finished when it started."""

  def __init__(self, monkeypatch):
    self.started, self.live, self.most_at_once, self.pinned = [], [], 0, {}
    self.affinity = None
    monkeypatch.setattr(study.os, "sched_setaffinity", lambda pid, cores: setattr(self, "affinity", tuple(cores)))

  def __call__(self, cmd, preexec_fn=None, **kwargs):
    args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    evaluate = "--mode=evaluate" in cmd
    out = args["--config.eval.output_dir"] if evaluate else os.path.join(args["--workdir"], "eval")
    name = os.path.relpath(os.path.dirname(out), os.path.dirname(os.path.dirname(os.path.dirname(out))))
    if evaluate:  # its source's results and checkpoint are there
      assert os.path.exists(os.path.join(args["--workdir"], "eval", "step_4", "results.json")), name
    self.affinity = None
    if preexec_fn is not None:
      preexec_fn()  # the patched sched_setaffinity records what the child would be pinned to
    self.pinned[name] = self.affinity
    run = _SlowFakeRun(self, out, None if evaluate else args["--workdir"])
    self.started.append(name)
    self.live.append(run)
    self.most_at_once = max(self.most_at_once, len(self.live))
    return run


class _SlowFakeRun:

  def __init__(self, runs, out, workdir):
    self.runs, self.out, self.workdir, self.polls = runs, out, workdir, 0

  def poll(self):
    self.polls += 1
    if self.polls < 3:
      return None
    if self in self.runs.live:
      self.runs.live.remove(self)
      if self.workdir:
        os.makedirs(os.path.join(self.workdir, "checkpoints", "4"))
      os.makedirs(os.path.join(self.out, "step_4"), exist_ok=True)
      with open(os.path.join(self.out, "step_4", "results.json"), "w") as f:
        json.dump({"miou": 0.5, "num_images": 8}, f)
    return 0

  def wait(self):
    while self.poll() is None:
      pass
    return 0


def test_jobs_run_at_once_on_their_own_cores_and_an_evaluate_row_waits_for_its_source(tmp_path, monkeypatch, capsys):
  rows = study.resolve(
      study.parse_rows([], "a=tiny; a2=evaluate:a@affinity.lam=12.0; b=tiny; c=tiny", [0, 1]),
      "configs/synthetic.py",
      [],
  )
  runs = _SlowFakeRuns(monkeypatch)
  monkeypatch.setattr(study.subprocess, "Popen", runs)
  monkeypatch.setattr(study.time, "sleep", lambda seconds: None)
  monkeypatch.setattr(study, "allowed_cores", lambda: (0, 1, 2, 3, 4))
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a", jobs=2) == 0
  out = capsys.readouterr().out
  assert runs.most_at_once == 2
  # a0 and b0 start together (a2 waits for a0); a2 takes the first free slot, then c0, then seed 1 the same way
  assert runs.started == [
      "a/seed_0",
      "b/seed_0",
      "a2/seed_0",
      "c/seed_0",
      "a/seed_1",
      "b/seed_1",
      "a2/seed_1",
      "c/seed_1",
  ]
  assert set(runs.pinned.values()) == {(0, 1), (2, 3)}  # core 4 unused: both slots compute with 2 threads
  assert runs.pinned["a/seed_0"] == (0, 1) and runs.pinned["b/seed_0"] == (2, 3)
  assert "run 1/8: a seed 0 (train) on cores 0-1, 8 left" in out and "run 3/8: b seed 0 (train) on cores 2-3" in out
  assert json.loads((tmp_path / "b" / "seed_1" / "run.json").read_text())["cores"] == 2
  assert all(os.path.exists(study.results_path(str(tmp_path), r, s)) for r, s in study.plan(rows))
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a", jobs=2) == 0  # nothing left to do
  assert len(runs.started) == 8 and capsys.readouterr().out.count("finished, skipped") == 8


def test_jobs_pin_the_real_child_processes(tmp_path, monkeypatch):
  """Through a real ``subprocess.Popen``: each child computes on its slot's core (two slots on the first core(s)
  of this machine; on one core both slots are that core)."""
  allowed = sorted(os.sched_getaffinity(0))
  slots = (allowed[0], allowed[-1])

  def command(config_path, overrides, rows, row, seed, workdir):
    out = study.results_path(workdir, row, seed)
    write = f"json.dump({{'miou': 0.5, 'cores': sorted(os.sched_getaffinity(0))}}, open({out!r}, 'w'))"
    return [sys.executable, "-c", f"import json, os; os.makedirs(os.path.dirname({out!r})); {write}"]

  monkeypatch.setattr(study, "command", command)
  monkeypatch.setattr(study, "allowed_cores", lambda: slots)
  rows = study.resolve(study.parse_rows([], "a=tiny; b=tiny", [0]), "configs/synthetic.py", [])
  assert study.run_study("configs/synthetic.py", [], rows, str(tmp_path), "a", jobs=2) == 0
  cores = {r.name: json.load(open(study.results_path(str(tmp_path), r, 0)))["cores"] for r in rows}
  assert cores == {"a": [slots[0]], "b": [slots[1]]}


@pytest.mark.parametrize(
    "args,said",
    [
        (["--jobs=two"], "flag --jobs=two: invalid literal"),
        (["--jobs=0"], "--jobs=0: expected a positive number of runs at once"),
        (["--bogus=1"], "Unknown command line flag 'bogus'"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_a_bad_command_line_is_one_error_line(tmp_path, args, said):
  cmd = [sys.executable, "-m", "dilaff_jax.research.study", "--config=configs/synthetic.py", "--variants=baseline"]
  proc = subprocess.run(cmd + [f"--workdir={tmp_path}", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith("error: ") and said in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_a_signal_stops_every_running_job():
  class Running:

    def __init__(self):
      self.signals = []

    def poll(self):
      return None

    def send_signal(self, sig):
      self.signals.append(sig)

  stop = study._Stop()
  stop.processes = {Running(), Running()}
  stop._handle(15, None)
  assert stop.requested and [p.signals for p in stop.processes] == [[15], [15]]


def test_eta_from_the_durations_of_each_kind():
  assert study.eta_seconds({"train": [], "evaluate": []}, ["train"]) is None
  assert study.eta_seconds({"train": [100.0, 200.0], "evaluate": [10.0]}, ["train", "train", "evaluate"]) == 310.0
  # no evaluate run yet: the mean of all runs stands in for it
  assert study.eta_seconds({"train": [100.0, 200.0], "evaluate": []}, ["evaluate", "train"]) == 300.0


def _write(workdir, row, seed, step, results):
  d = os.path.join(workdir, row, f"seed_{seed}", "eval", f"step_{step}")
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(d, "results.md"), "w") as f:
    f.write("# md\n")
  with open(os.path.join(workdir, row, f"seed_{seed}", "config.json"), "w") as f:
    f.write("{}")
  with open(os.path.join(workdir, row, f"seed_{seed}", "log.txt"), "w") as f:
    f.write("log\n")


def _fabricated(tmp_path):
  w = str(tmp_path / "study")
  rows = [
      Row("plain", "baseline", seeds=(0, 1, 2), final_step=10),
      Row("aff", "", seeds=(0, 1, 2), final_step=10),
      Row("one", "x", seeds=(0, 1), final_step=10),
  ]
  for s, m in enumerate((0.70, 0.73, 0.76)):
    _write(w, "plain", s, 10, {"miou": m})
  sweeps = {0: [0.74, 0.75], 1: [0.72, 0.78]}
  for s, (m, p) in enumerate(((0.74, 0.75), (0.72, 0.78))):  # seed 2 missing: a partial row
    _write(
        w,
        "aff",
        s,
        10,
        {
            "miou": m,
            "miou_propagated": p,
            "final_iterations": 1,
            "sweep": {"iterations": [0, 1], "predicted": sweeps[s], "oracle": [m, m + 0.1]},
        },
    )
  _write(w, "one", 1, 10, {"miou": 0.80})
  _write(w, "aff", 0, 99, {"miou": 0.0})  # another step: not the final one, ignored
  return w, rows


def test_aggregate_matches_hand_computed_values(tmp_path):
  w, rows = _fabricated(tmp_path)
  s = study.write_aggregates(w, "configs/synthetic.py", ["dataset.data_dir=/d"], rows, "plain")
  agg = s["aggregate"]
  p = agg["plain"]["metrics"]["miou"]
  assert p["n"] == 3 and p["mean"] == pytest.approx(0.73) and p["std"] == pytest.approx(0.03)  # sqrt(.0018/2)
  assert (p["min"], p["max"]) == (0.70, 0.76)
  assert "miou" not in agg["plain"]["vs_baseline"]
  a = agg["aff"]["metrics"]
  assert agg["aff"]["finished"] == [0, 1]
  assert a["miou"]["n"] == 2 and a["miou"]["mean"] == pytest.approx(0.73)
  assert a["miou"]["std"] == pytest.approx(math.sqrt(2) * 0.01)  # sqrt((.01² + .01²) / 1)
  d = agg["aff"]["vs_baseline"]["miou"]  # paired over seeds 0, 1: +.04, -.01
  assert d["n"] == 2 and d["mean"] == pytest.approx(0.015) and d["std"] == pytest.approx(math.sqrt(2) * 0.025)
  assert d["improved"] == 1
  # paired t-test with 1 degree of freedom (a Cauchy distribution): t = .015 / (.0354 / sqrt 2) = 0.6,
  # two-sided p = 1 - (2 / pi) atan(0.6)
  assert d["t"] == pytest.approx(0.6) and d["p"] == pytest.approx(1 - 2 / math.pi * math.atan(0.6))
  dp = agg["aff"]["vs_baseline"]["miou_propagated"]  # .75 - .70, .78 - .73
  assert dp["mean"] == pytest.approx(0.05) and dp["std"] == pytest.approx(0.0, abs=1e-12) and dp["improved"] == 2
  assert dp["t"] is None and dp["p"] is None  # no test when every seed differs by the same amount
  assert agg["aff"]["final_iterations"] == 1
  sw = agg["aff"]["sweep"]
  assert sw["iterations"] == [0, 1] and sw["predicted"]["n"] == 2
  assert sw["predicted"]["mean"] == pytest.approx([0.73, 0.765])
  assert sw["predicted"]["std"] == pytest.approx([math.sqrt(2) * 0.01, math.sqrt(2) * 0.015])
  assert sw["oracle"]["mean"] == pytest.approx([0.73, 0.83])
  one = agg["one"]
  assert one["metrics"]["miou"] == {"n": 1, "mean": 0.80, "std": None, "min": 0.80, "max": 0.80, "values": {"1": 0.80}}
  assert one["vs_baseline"]["miou"]["n"] == 1 and one["vs_baseline"]["miou"]["mean"] == pytest.approx(0.07)
  assert one["vs_baseline"]["miou"]["std"] is None and one["vs_baseline"]["miou"]["t"] is None

  md = open(os.path.join(w, "study.md")).read()
  assert "| plain | `:baseline` | 3 | 73.00 ± 3.00 | 70.00–76.00 | – | – | 0: 70.00, 1: 73.00, 2: 76.00 |" in md
  assert (
      "| aff | `:default` | 2 | 73.00 ± 1.41 | 72.00–74.00 | +1.50 ± 3.54 (n=2, t = 0.60, p = 0.66; sign p = 1) | 1/2 |"
      in md
  )
  assert "| aff (1 it.) | `:default` | 2 | 76.50 ± 2.12 | 75.00–78.00 | +5.00 ± 0.00 (n=2; sign p = 0.5) | 2/2 |" in md
  assert "| aff (1 it.) | `:default` | 2 | 76.50 ± 2.12 |" in md
  assert "| aff | predicted | 2 | 73.00 ± 1.41 | 76.50 ± 2.12 |" in md
  assert "| one | `:x` | 1 | 80.00 | 80.00–80.00 | +7.00 (n=1) | 1/1 |" in md
  assert "aff seed 2, one seed 0" in md
  assert os.path.getsize(os.path.join(w, "study.png")) > 1000
  assert json.load(open(os.path.join(w, "study.json")))["aggregate"] == json.loads(json.dumps(agg))


def test_paired_t_test_matches_the_closed_form_for_two_degrees_of_freedom():
  # differences 1, 2, 3: mean 2, std 1, t = 2 / (1 / sqrt 3); with 2 degrees of freedom the two-sided p is
  # 1 - t / sqrt(t^2 + 2)
  d = study.paired({0: 3.0, 1: 5.0, 2: 7.0, 4: 9.0}, {0: 2.0, 1: 3.0, 2: 4.0, 3: 0.0})  # seeds 3, 4: unpaired
  t = 2 * math.sqrt(3)
  assert (d["n"], d["improved"]) == (3, 3)
  assert d["t"] == pytest.approx(t) and d["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
  assert study.paired({0: 1.0, 1: 0.0, 2: 2.0}, {0: 2.0, 1: 1.0, 2: 3.0})["t"] is None  # all -1: std 0
  small = study.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 1.0, 2: 1.99})  # 1, 1, 1.01: t = 301
  assert small["t"] > 300 and small["p"] < 1e-4
  assert study._delta(small) == "+100.33 ± 0.58 (n=3, t = 301.00, p < 0.001; sign p = 0.25)"


def test_sign_test_is_the_exact_binomial_over_the_seeds_that_differ():
  # 5 of 5 better: p = 2 * (1/2)^5; 4 of 5: 2 * (1 + 5) / 32; a tie (Δ = 0) is left out of n
  assert study.paired({s: 1.0 + s for s in range(5)}, {s: 0.0 for s in range(5)})["sign_p"] == pytest.approx(2 / 32)
  four = study.paired({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: -1.0}, {s: 0.0 for s in range(5)})
  assert (four["improved"], four["sign_p"]) == (4, pytest.approx(2 * 6 / 32))
  tie = study.paired({0: 1.0, 1: 2.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0})
  assert tie["sign_p"] == pytest.approx(0.5)  # 2 of 2 non-zero: 2 * (1/2)^2
  assert study.paired({0: 1.0, 1: 0.0}, {0: 0.0, 1: 0.0})["sign_p"] is None  # one seed differs: no test


def test_comparisons_of_two_rows_seed_by_seed(tmp_path):
  w, rows = _fabricated(tmp_path)
  rows.append(Row("aff2", "", seeds=(0, 1), final_step=10))
  for seed, (m, p) in enumerate(((0.70, 0.80), (0.75, 0.76))):
    _write(w, "aff2", seed, 10, {"miou": m, "miou_propagated": p, "final_iterations": 1})
  comparisons = study.parse_comparisons(["aff:plain", " aff:one", "one:aff", "aff2:aff"], rows)
  assert comparisons == [("aff", "plain"), ("aff", "one"), ("one", "aff"), ("aff2", "aff")]
  s = study.write_aggregates(w, "configs/synthetic.py", [], rows, "plain", comparisons)
  by = {(c["a"], c["b"]): c["metrics"] for c in s["comparisons"]}
  # against the baseline row, a comparison is the baseline column again (plain has no propagation: its mIoU)
  for key in ("miou", "miou_propagated"):
    assert {k: v for k, v in by["aff", "plain"][key].items() if k != "against"} == s["aggregate"]["aff"]["vs_baseline"][
        key
    ]
  assert by["aff", "plain"]["miou_propagated"]["against"] == "miou"
  # aff and one share seed 1 only: .72 - .80; aff's propagated .78 against one's mIoU (one has no propagation)
  assert by["aff", "one"]["miou"]["n"] == 1 and by["aff", "one"]["miou"]["mean"] == pytest.approx(-0.08)
  assert by["aff", "one"]["miou_propagated"]["mean"] == pytest.approx(-0.02)
  assert by["one", "aff"]["miou"]["mean"] == pytest.approx(0.08) and list(by["one", "aff"]) == ["miou"]
  # both rows propagate: propagated against propagated, .80 - .75 and .76 - .78
  two = by["aff2", "aff"]["miou_propagated"]
  assert two["against"] == "miou_propagated" and two["values"] == pytest.approx({"0": 0.05, "1": -0.02})
  md = open(os.path.join(w, "study.md")).read()
  assert "| aff | plain | mIoU | +1.50 ± 3.54 (n=2, t = 0.60, p = 0.66; sign p = 1) | 1/2 | 0: +4.00, 1: -1.00 |" in md
  assert "| aff | one | mIoU with propagation against mIoU | -2.00 (n=1) | 0/1 | 1: -2.00 |" in md
  # --aggregate_only without rows reads the comparisons back from study.json
  assert study.rows_from_study_json(w)[4] == ["aff:plain", "aff:one", "one:aff", "aff2:aff"]


def test_a_damaged_results_file_is_named_with_how_to_make_it_again(tmp_path):
  """A results.json cut short or without an mIoU (a finished run, as far as the study's skip goes) stops the
  aggregation with a StudyError naming the file and what to do, not a JSON traceback."""
  w, rows = _fabricated(tmp_path)
  path = study.results_path(w, rows[0], 1)
  for text, said in (('{"miou": 0.7', "cannot be read (Expecting"), ('{"loss": 1}', "is not a run's results")):
    with open(path, "w") as f:
      f.write(text)
    with pytest.raises(study.StudyError) as e:
      study.load_results(w, rows)
    assert str(e.value).startswith(f"{path} {said}") and "delete it and rerun the study" in str(e.value)


def test_a_comparison_with_a_dense_crf_row_is_against_its_refined_miou(tmp_path):
  """A CRF row's unrefined mIoU is its source's: every metric of A is compared with the CRF's refined mIoU."""
  w, rows = _fabricated(tmp_path)
  rows.append(Row("plain+crf", "", seeds=(0, 1), evaluates="plain", final_step=10))
  for seed, (m, c) in enumerate(((0.70, 0.74), (0.73, 0.72))):
    _write(w, "plain+crf", seed, 10, {"miou": m, "miou_crf": c})
  s = study.write_aggregates(w, "configs/synthetic.py", [], rows, "plain", [("aff", "plain+crf")])
  (c,) = s["comparisons"]
  # aff: mIoU .74 / .72, propagated .75 / .78; the CRF .74 / .72 (the unrefined .70 / .73 would give +4 / -1)
  for key, want in (("miou", {"0": 0.0, "1": 0.0}), ("miou_propagated", {"0": 0.01, "1": 0.06})):
    assert c["metrics"][key]["against"] == "miou_crf"
    assert c["metrics"][key]["values"] == pytest.approx(want)
  md = open(os.path.join(w, "study.md")).read()
  assert "| aff | plain+crf | mIoU against mIoU with dense CRF |" in md


@pytest.mark.parametrize(
    "item, match",
    [("aff", "is not A:B"), ("aff:", "is not A:B"), ("aff:nope", "'nope' .* is not a row"), ("aff:aff", "itself")],
)
def test_a_bad_comparison_names_itself(tmp_path, item, match):
  _, rows = _fabricated(tmp_path)
  with pytest.raises(study.StudyError, match=match):
    study.parse_comparisons([item], rows)


def test_export_copies_the_small_files_and_aggregates_again(tmp_path):
  w, rows = _fabricated(tmp_path)
  study.write_aggregates(w, "configs/synthetic.py", [], rows, "plain")
  dest = str(tmp_path / "export")
  copied = study.export(w, rows, dest)
  assert "study.md" in copied and os.path.join("aff", "seed_1", "eval", "step_10", "results.json") in copied
  assert os.path.join("aff", "seed_1", "config.json") in copied
  assert not any(name.endswith("log.txt") or "step_99" in name for name in copied)
  again = study.write_aggregates(dest, "configs/synthetic.py", [], rows, "plain")
  assert again["aggregate"] == json.load(open(os.path.join(w, "study.json")))["aggregate"]


def test_export_names_no_folder_of_the_machine(tmp_path):
  """run.json holds the absolute --workdir the runner passed: the export keeps it relative to the study folder."""
  w, rows = _fabricated(tmp_path)
  run = os.path.join(w, "aff", "seed_0")
  with open(os.path.join(run, "run.json"), "w") as f:
    json.dump(
        {
            "seed": 0,
            "command": [
                "-m",
                "dilaff_jax.main",
                f"--workdir={os.path.abspath(run)}",
                f"--config.eval.output_dir={os.path.abspath(run)}/eval",
            ],
        },
        f,
    )
  dest = str(tmp_path / "export")
  study.export(w, rows, dest)
  exported = json.load(open(os.path.join(dest, "aff", "seed_0", "run.json")))
  assert exported["command"][2:] == ["--workdir=aff/seed_0", "--config.eval.output_dir=aff/seed_0/eval"]
  assert not any(
      str(tmp_path) in open(os.path.join(d, n)).read()
      for d, _, names in os.walk(dest)
      for n in names
      if n.endswith((".json", ".md"))
  )


def test_study_end_to_end_on_tiny(tmp_path, data_dir):
  """A trained row and a row evaluating it again (seed 0): both finish; a second invocation runs nothing. (Which
  row has a propagation sweep, the order of the rows and the aggregate's maths are tested without training.)"""
  w = str(tmp_path / "study")
  cmd = [
      sys.executable,
      "-m",
      "dilaff_jax.research.study",
      "--config=configs/synthetic.py",
      "--seeds=0",
      f"--workdir={w}",
      "--rows=aff=tiny; aff4=evaluate:aff@dataset.eval_split=tune",  # the 4 tune scenes
      "--baseline_row=aff",
      f"--config.dataset.data_dir={data_dir}",
      # the suite's 8 CPU devices and the other tests' batches: their compiled programs are reused from the cache
      "--config.train.batch_size=8",
      "--config.eval.batch_size=8",
  ]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "run 1/2: aff seed 0 (train), 2 left" in proc.stdout and "run 2/2: aff4 seed 0 (evaluate)" in proc.stdout
  results = {
      r: json.load(open(os.path.join(w, r, "seed_0", "eval", "step_4", "results.json"))) for r in ("aff", "aff4")
  }
  assert results["aff"]["num_images"] == 8 and results["aff4"]["num_images"] == 4  # not overwritten
  assert "sweep" in results["aff"] and "sweep" in results["aff4"]
  assert not os.path.exists(os.path.join(w, "aff4", "seed_0", "checkpoints"))
  for name in (
      "study.json",
      "study.md",
      "study.png",
      "aff/seed_0/log.txt",
      "aff/seed_0/config.json",
      "aff4/seed_0/run.json",
  ):
    assert os.path.exists(os.path.join(w, name)), name
  log = open(os.path.join(w, "aff", "seed_0", "log.txt")).read()  # the job's own log is the study's: not doubled
  assert log.count("[train] step 4/4") == 1 and log.strip().splitlines()[-1].startswith("[done] results in ")
  agg = json.load(open(os.path.join(w, "study.json")))["aggregate"]
  assert agg["aff"]["metrics"]["miou"]["values"] == {"0": results["aff"]["miou"]}
  assert agg["aff4"]["vs_baseline"]["miou"]["mean"] == pytest.approx(results["aff4"]["miou"] - results["aff"]["miou"])
  stamp = os.path.getmtime(os.path.join(w, "aff", "seed_0", "eval", "step_4", "results.json"))
  # What a same-config evaluate row relies on: the final checkpoint evaluated in a process of its own gives the
  # training's final evaluation to the last digit (every value but the throughput)
  again = str(tmp_path / "again")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "dilaff_jax.main",
          "--config=configs/synthetic.py:tiny",
          "--config.seed=0",
          *cmd[-3:],
          f"--config.eval.output_dir={again}",
          "--mode=evaluate",
          "--step=4",
          f"--workdir={os.path.join(w, 'aff', 'seed_0')}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  evaluated = json.load(open(os.path.join(again, "step_4", "results.json")))
  drop = lambda r: {k: v for k, v in r.items() if k != "images_per_second"}
  assert drop(evaluated) == drop(results["aff"])

  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("finished, skipped") == 2 and "(train)" not in proc.stdout, proc.stdout
  assert os.path.getmtime(os.path.join(w, "aff", "seed_0", "eval", "step_4", "results.json")) == stamp


def _launcher_stages() -> tuple[dict[str, tuple[str, list[str], list[int]]], dict[str, list[str]]]:
  """``launch/study.sh``'s rows, comparisons and seeds per stage (tune, test), as the shell would expand them, and
  per stage the config overrides it gives every run (the exec line's, then the stage's ``STAGE_FLAGS``)."""
  with open(os.path.join(REPO, "launch", "study.sh")) as f:
    text = f.read().replace("\\\n", "")  # the shell's line continuations
  tune_split = re.search(r"^T=(\S+)$", text, re.M).group(1)
  out = {}
  for stage in ("tune", "test"):
    rows = re.search(rf'{stage.upper()}_ROWS="(.*?)"', text, re.S).group(1).replace("$T", tune_split)
    compare = re.search(rf'{stage.upper()}_COMPARE="(.*?)"', text, re.S).group(1)
    seeds = re.search(rf"{stage}\).*?SEEDS=\$\{{SEEDS:-([0-9,]+)\}}", text, re.S).group(1)
    out[stage] = rows, [c for c in compare.split(",") if c], [int(s) for s in seeds.split(",")]
  common = re.findall(r"--config\.(\S+=\S+)", text[text.rindex("exec ") :])  # overrides of every run
  assert "$STAGE_FLAGS" in text[text.rindex("exec ") :]
  every_run = {}
  for stage in ("tune", "test"):
    flags = re.search(rf'^  {stage}\).*?STAGE_FLAGS="?([^";]*)"? ;;', text, re.S | re.M).group(1)
    every_run[stage] = common + re.findall(r"--config\.(\S+=\S+)", flags)
  return out, every_run


def test_the_launchers_tune_choices_cover_every_tuned_row_once():
  """``TUNE_CHOICES`` parses against the tune stage's rows, and every trained row but the reference is the
  candidate of exactly one choice (so no method's weight goes unchosen), with the default's propagation chosen too."""
  with open(os.path.join(REPO, "launch", "study.sh")) as f:
    choices_text = re.search(r'TUNE_CHOICES="(.*?)"', f.read(), re.S).group(1)
  stages, every_run = _launcher_stages()
  rows_text, _, seeds = stages["tune"]
  rows = study.resolve(
      study.parse_rows([], rows_text, seeds), os.path.join(REPO, "configs", "synthetic.py"), every_run["tune"]
  )
  choices = tuning.parse_choices(choices_text, rows)
  listed = [name for c in choices for name in c.rows]
  trained = [r.name for r in rows if not r.evaluates and r.name != "tune_baseline"]
  assert sorted(listed) == sorted(trained)
  assert ("", tuning.PROPAGATION) in {(c.variant, c.key) for c in choices}
  assert {c.variant for c in choices} >= {"", "aaf", "boundary", "table1_none", "table1_signal", "table1_sqrt"}


@pytest.mark.parametrize("stage", ["tune", "test"])
def test_the_launchers_study_is_valid_and_the_committed_one_is_part_of_it(stage):
  """Every row of ``launch/study.sh``'s stage loads its config and every comparison names its rows (else the study
  stops at its start); the tune stage scores on the tune split only and the test stage never does; the committed
  export of the stage (``results/study_synthetic/<stage>``, once it exists) is a part of the launcher's: the same
  rows with the same variants and overrides, a subset of their seeds and of the comparisons. A row whose meaning
  changes in the launcher (another variant or override under the same name) fails here until the committed study
  is rerun."""
  stages, every_run = _launcher_stages()
  rows_text, compare, seeds = stages[stage]
  every_run = every_run[stage]
  assert "train.num_steps=1000" in every_run and "eval.max_images=0" in every_run
  # stage test trains without validation (which leaves the training unchanged); stage tune kept it
  assert ("train.eval_every=0" in every_run) == ("train.checkpoint_every=100" in every_run) == (stage == "test")
  rows = study.resolve(study.parse_rows([], rows_text, seeds), os.path.join(REPO, "configs", "synthetic.py"), every_run)
  pairs = study.parse_comparisons(compare, rows)
  assert len(rows) >= 17 and len(pairs) >= 3, (len(rows), len(pairs))
  by_name = {r.name: r for r in rows}
  for r in rows:
    source = by_name[r.evaluates] if r.evaluates else r
    on_tune = "dataset.eval_split=tune" in source.overrides
    assert on_tune == (stage == "tune"), r.name
    if stage == "test":
      assert all(s < 100 for s in r.seeds), r.name  # the tune stage's seeds (100, 101) are not reused
  fresh = {r.name for r in rows if r.name.endswith("_fresh")}
  assert all(set(by_name[n].seeds) == {5, 6, 7} for n in fresh) and (stage == "tune" or len(fresh) >= 4)
  if stage == "test":  # the headline rows first, every seed of them, then Tables 1 and 2
    with open(os.path.join(REPO, "launch", "study.sh")) as f:
      first = re.search(r'^TEST_FIRST="(.*)"$', f.read(), re.M).group(1).split(",")
    order = [r.name for r, _ in study.plan(rows, first)]
    tables = [i for i, n in enumerate(order) if n.startswith("table")]
    assert tables == list(range(len(order) - len(tables), len(order))) and len(tables) == 21
  path = os.path.join(REPO, "results", "study_synthetic", stage, "study.json")
  if not os.path.exists(path):
    assert stage == "test", "the tune stage's export is committed"  # the test stage has not run yet
    return
  with open(path) as f:
    committed = json.load(f)
  assert committed["config"] == "configs/synthetic.py" and committed["overrides"] == every_run
  for r in committed["rows"]:
    launched = by_name.get(r["name"])
    assert launched is not None, f"committed row {r['name']} is not in launch/study.sh"
    assert (r["variant"], tuple(r["overrides"]), r["evaluates"], r["final_step"]) == (
        launched.variant,
        launched.overrides,
        launched.evaluates,
        launched.final_step,
    ), r["name"]
    assert set(r["seeds"]) <= set(launched.seeds), r["name"]
  assert {(c["a"], c["b"]) for c in committed["comparisons"]} <= set(pairs)


def test_one_study_per_folder_with_the_workdir_locks_stale_takeover(tmp_path):
  """The study's lock is the workdir lock under another name: a live holder is refused naming it, a lock left by a
  dead process is taken over, and the lock is gone after the study."""
  import json as json_lib
  import socket

  from dilaff_jax.process import workdir_lock

  lock = tmp_path / study.STUDY_LOCK
  live = {"host": socket.gethostname(), "pid": os.getpid(), "since": "then"}
  lock.write_text(json_lib.dumps(live))
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"in use by another study \\(held by pid {os.getpid()}"):
    study.run_study("configs/synthetic.py", [], [], str(tmp_path), "plain")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  lock.write_text(json_lib.dumps({**live, "pid": int(dead.stdout)}))
  assert study.run_study("configs/synthetic.py", [], [], str(tmp_path), "plain") == 0
  assert not lock.exists()
