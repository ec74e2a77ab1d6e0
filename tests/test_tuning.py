"""The tune stage's choices: the declared rule (highest mean over the seeds every candidate finished, ties to the one
listed first) on fabricated results with hand-computed winners, the propagation choice on the chosen row's runs, the
provisional mode, and the check of a config against the choices."""

import json
import os

import pytest

from cli_helpers import CONFIG, assert_one_error_line, run_cli
from dilaff_jax.research import study, tuning
from dilaff_jax.research.study import Row

OVERRIDES = ["eval.max_images=0"]


def _rows(seeds=(0, 1)):
  return [
      Row("b0.1", "", ("affinity.beta=0.1",), seeds, final_step=10),
      Row("b0.3", "", ("affinity.beta=0.3",), seeds, final_step=10),
      Row("b1", "", ("affinity.beta=1.0",), seeds, final_step=10),
      Row("b0.1_lam3", "", ("affinity.lam=3.0",), seeds, evaluates="b0.1", final_step=10),
      Row("b0.1_anchored", "", ("affinity.propagation_reading=anchored",), seeds, evaluates="b0.1", final_step=10),
      Row("b0.3_lam3", "", ("affinity.lam=3.0",), seeds, evaluates="b0.3", final_step=10),
      Row("aaf_w1", "aaf", ("structure.aaf_weight=1.0",), seeds, final_step=10),
      Row("aaf_w3", "aaf", ("structure.aaf_weight=3.0",), seeds, final_step=10),
  ]


CHOICES = """
default:affinity.beta=b0.1,b0.3,b1
default:propagation
aaf:structure.aaf_weight=aaf_w1,aaf_w3
"""


def _sweep(*predicted):
  return {"iterations": [0, 1, 3], "predicted": list(predicted), "oracle": list(predicted)}


def _results():
  """Seed -> mIoU per row. β: means 0.72 (0.1), 0.715 (0.3), 0.61 (1.0): 0.1 wins though 0.3 has the best seed.
  Propagation on b0.1 (unrefined 0.70 / 0.74): means per iteration count 0 / 1 / 3 are
  λ = 6 (the row's own): 0.72 / 0.735 / 0.70;  λ = 3: 0.72 / 0.745 / 0.69;  anchored: 0.72 / 0.745 / 0.74
  so λ = 3 and the anchored reading tie at 1 iteration (λ = 3 is listed first) and the anchored reading at 3
  iterations is below both: λ = 3, the paper's reading, 1 iteration. b0.3_lam3 (not the chosen β) would beat all.
  AAF: 1.0 and 3.0 tie at 0.80: the first listed (1.0) wins."""
  return {
      "b0.1": {
          0: {"miou": 0.70, "sweep": _sweep(0.70, 0.72, 0.69)},
          1: {"miou": 0.74, "sweep": _sweep(0.74, 0.75, 0.71)},
      },
      "b0.3": {0: {"miou": 0.75, "sweep": _sweep(0.75, 0.9, 0.9)}, 1: {"miou": 0.68, "sweep": _sweep(0.68, 0.9, 0.9)}},
      "b1": {0: {"miou": 0.60}, 1: {"miou": 0.62}},
      "b0.1_lam3": {
          0: {"miou": 0.70, "sweep": _sweep(0.70, 0.73, 0.68)},
          1: {"miou": 0.74, "sweep": _sweep(0.74, 0.76, 0.70)},
      },
      "b0.1_anchored": {
          0: {"miou": 0.70, "sweep": _sweep(0.70, 0.73, 0.73)},
          1: {"miou": 0.74, "sweep": _sweep(0.74, 0.76, 0.75)},
      },
      "b0.3_lam3": {
          0: {"miou": 0.75, "sweep": _sweep(0.75, 0.99, 0.99)},
          1: {"miou": 0.68, "sweep": _sweep(0.68, 0.99, 0.99)},
      },
      "aaf_w1": {0: {"miou": 0.81}, 1: {"miou": 0.79}},
      "aaf_w3": {0: {"miou": 0.79}, 1: {"miou": 0.81}},
  }


def _recorded(rows=None, lam=6.0):
  """The config.json of every training run, as saved when the config file had λ = ``lam`` (the tune stage ran before
  its choices were written into the file)."""
  out = {}
  for r in rows or _rows():
    if not r.evaluates:
      config = json.loads(json.dumps(study.load_config(CONFIG, r.variant, OVERRIDES + list(r.overrides)).to_dict()))
      config["affinity"]["lam"] = lam
      out[r.name] = {s: config for s in r.seeds}
  return out


def _choose(results=None, rows=None, **kw):
  rows = rows or _rows()
  kw.setdefault("recorded", _recorded(rows))
  return tuning.choose(tuning.parse_choices(CHOICES, rows), rows, results or _results(), CONFIG, OVERRIDES, **kw)


def _by_key(out):
  return {(c["variant"], c["key"]): c for c in out["choices"]}


def test_the_rule_picks_the_hand_computed_winners():
  out = _choose()
  c = _by_key(out)
  assert out["complete"] and out["config"] == CONFIG
  assert c[("", "affinity.beta")]["chosen"] == {"affinity.beta": 0.1}
  assert [e["mean"] for e in c[("", "affinity.beta")]["candidates"]] == pytest.approx([0.72, 0.715, 0.61])
  assert c[("", "propagation")]["chosen"] == {
      "affinity.propagation_reading": "paper",
      "affinity.lam": 3.0,
      "affinity.iterations": 1,
  }
  winners = [e for e in c[("", "propagation")]["candidates"] if e.get("chosen")]
  assert len(winners) == 1 and winners[0]["row"] == "b0.1_lam3" and winners[0]["mean"] == pytest.approx(0.745)
  rows = {e["row"] for e in c[("", "propagation")]["candidates"]}
  assert rows == {"b0.1", "b0.1_lam3", "b0.1_anchored"}  # only the chosen β's runs
  assert c[("aaf", "structure.aaf_weight")]["chosen"] == {"structure.aaf_weight": 1.0}  # the tie: listed first
  # β = 0.1 is the smallest of 3 values tried (the best may lie below); AAF tried only 2 values: no edge to speak of
  assert c[("", "affinity.beta")]["edge"] == "smallest" and c[("aaf", "structure.aaf_weight")]["edge"] is None
  assert "edge" not in c[("", "propagation")]


def test_each_candidates_values_are_the_ones_its_runs_recorded_not_the_config_files_now():
  """The choices go into the config file after the runs, so λ of the row that is not re-evaluated (6 when it ran)
  may read 3 in the file now: the values come from the runs' config.json. Here b0.1's own λ = 6 sweep wins; read from
  the file it would be chosen as λ = 3, a setting no run had."""
  results = _results()
  for seed in (0, 1):
    results["b0.1"][seed]["sweep"]["predicted"][1] = 0.8
  config_lam = study.load_config(CONFIG, "", []).affinity.lam
  prop = _by_key(_choose(results))[("", "propagation")]
  assert prop["chosen"] == {"affinity.propagation_reading": "paper", "affinity.lam": 6.0, "affinity.iterations": 1}
  lams = {e["row"]: e["values"]["affinity.lam"] for e in prop["candidates"]}
  assert lams == {"b0.1": 6.0, "b0.1_lam3": 3.0, "b0.1_anchored": 6.0}  # the anchored row evaluated with b0.1's λ
  if config_lam != 6.0:  # the file's λ now (what the values were read from before)
    stale = _by_key(_choose(results, recorded=None))[("", "propagation")]
    assert stale["chosen"]["affinity.lam"] == config_lam
  recorded = _recorded()
  del recorded["b0.1"][1]
  with pytest.raises(tuning.TuningError, match=r"b0\.1/seed_1/config\.json is missing: which affinity\.beta"):
    _choose(results, recorded=recorded)
  recorded = _recorded()
  recorded["b0.1"][1] = json.loads(json.dumps(recorded["b0.1"][0]))
  recorded["b0.1"][1]["affinity"]["lam"] = 12.0
  with pytest.raises(tuning.TuningError, match=r"row b0\.1: its seeds' runs used different affinity\.lam"):
    _choose(results, recorded=recorded)


@pytest.mark.parametrize("scores, edge", [((0.7, 0.75, 0.6), None), ((0.6, 0.65, 0.7), "largest")])
def test_a_choice_at_the_edge_of_the_values_tried_is_marked(scores, edge):
  results = _results()
  for row, score in zip(("b0.1", "b0.3", "b1"), scores):
    results[row] = {seed: {"sweep": _sweep(0.7, 0.7, 0.7), **results[row][seed], "miou": score} for seed in (0, 1)}
  out = _choose(results)
  beta = _by_key(out)[("", "affinity.beta")]
  assert beta["edge"] == edge and beta["chosen"] == {"affinity.beta": (0.3 if edge is None else 1.0)}
  md = tuning.markdown(out, "w")
  said = "Chosen: `affinity.beta = 1.0`, the largest value tried: the best may lie above the values tried."
  assert (said in md) == (edge == "largest") and ("Chosen: `affinity.beta = 0.3`." in md) == (edge is None)


def test_propagation_that_never_helps_chooses_zero_iterations_only():
  results = _results()
  for name in ("b0.1", "b0.1_lam3", "b0.1_anchored"):
    for seed, r in results[name].items():
      r["sweep"] = _sweep(r["miou"], r["miou"] - 0.01, r["miou"] - 0.02)
  assert _by_key(_choose(results))[("", "propagation")]["chosen"] == {"affinity.iterations": 0}


def test_unfinished_runs_are_an_error_or_a_provisional_choice_from_the_seeds_all_finished():
  rows = _rows(seeds=(0, 1, 2))
  results = _results()
  results["b0.3"][2] = {"miou": 0.99, "sweep": _sweep(0.99, 0.99, 0.99)}  # b0.3's own mean would now be best
  with pytest.raises(tuning.TuningError, match=r"has not finished .*b0\.1 seed 2.*--allow_unfinished"):
    _choose(results, rows)
  out = _choose(results, rows, allow_unfinished=True)
  beta = _by_key(out)[("", "affinity.beta")]
  assert not out["complete"] and beta["seeds"] == [0, 1] and beta["chosen"] == {"affinity.beta": 0.1}
  del results["aaf_w3"][1], results["aaf_w1"][0]  # no seed finished by both AAF rows: not chosen yet
  out = _choose(results, rows, allow_unfinished=True)
  assert _by_key(out)[("aaf", "structure.aaf_weight")]["chosen"] is None
  assert "Not chosen yet" in tuning.markdown(out, "tune") and "Provisional" in tuning.markdown(out, "tune")


@pytest.mark.parametrize(
    "text,match",
    [
        ("default:affinity.beta", "is not VARIANT:KEY=ROW"),
        ("affinity.beta=b0.1,b0.3", "is not VARIANT:KEY=ROW"),
        ("default:affinity.beta=b0.1,nope", "'nope' is not a row"),
        ("aaf:structure.aaf_weight=aaf_w1,b0.1", "row 'b0.1' must train variant 'aaf'"),
        ("default:affinity.beta=b0.1,b0.1_lam3", "row 'b0.1_lam3' must train variant 'default' .it evaluates b0.1"),
        ("aaf:propagation", "needs exactly one KEY=ROWS line"),
        ("default:affinity.beta=b0.1;default:affinity.beta=b0.3", "default:affinity.beta is chosen twice"),
        ("", "no choice given"),
    ],
)
def test_a_bad_choice_line_names_itself(text, match):
  with pytest.raises(tuning.TuningError, match=match):
    tuning.parse_choices(text, _rows())


def test_rows_without_their_own_value_of_the_key_are_refused():
  rows = _rows()
  text = "default:affinity.lam=b0.1,b0.3"  # both train with the config's λ
  with pytest.raises(tuning.TuningError, match="do not each have their own value"):
    tuning.choose(tuning.parse_choices(text, rows), rows, _results(), CONFIG, OVERRIDES)


def _config_values():
  default, aaf = study.load_config(CONFIG, "", []), study.load_config(CONFIG, "aaf", [])
  return default.affinity.beta, default.affinity.iterations, aaf.structure.aaf_weight


def _tuning(beta, iterations, aaf_weight, complete=True):
  return {
      "config": CONFIG,
      "complete": complete,
      "choices": [
          {"variant": "", "key": "affinity.beta", "chosen": {"affinity.beta": beta}},
          {"variant": "", "key": "propagation", "chosen": {"affinity.iterations": iterations}},
          {"variant": "aaf", "key": "structure.aaf_weight", "chosen": {"structure.aaf_weight": aaf_weight}},
      ],
  }


def test_the_picture_has_a_panel_per_made_choice(tmp_path):
  out = _choose()
  assert tuning.plot(out, str(tmp_path / "t.png")) == [
      "default: affinity.beta",
      "aaf: structure.aaf_weight",
      "default: propagation",
  ]
  out["choices"][1]["chosen"] = None  # not chosen yet: no panel
  assert tuning.plot(out, str(tmp_path / "t.png")) == ["default: affinity.beta", "default: propagation"]


def test_check_passes_a_config_that_runs_the_choices_and_names_every_value_that_differs():
  beta, iterations, aaf_weight = _config_values()
  tuning.check(_tuning(beta, iterations, aaf_weight), "t.json")
  with pytest.raises(tuning.TuningError) as e:
    tuning.check(_tuning(beta + 1, iterations, aaf_weight + 1), "t.json")
  assert f"default: affinity.beta is {beta!r}, tune chose {beta + 1!r}" in str(e.value)
  assert f"aaf: structure.aaf_weight is {aaf_weight!r}, tune chose {aaf_weight + 1!r}" in str(e.value)
  assert "iterations" not in str(e.value)
  with pytest.raises(tuning.TuningError, match="t.json is provisional"):
    tuning.check(_tuning(beta, iterations, aaf_weight, complete=False), "t.json")


def _study_folder(tmp_path):
  w = tmp_path / "study"
  rows = _rows()
  for name, per_seed in _results().items():
    for seed, r in per_seed.items():
      d = w / name / f"seed_{seed}" / "eval" / "step_10"
      d.mkdir(parents=True)
      (d / "results.json").write_text(json.dumps(r))
  for name, per_seed in _recorded(rows).items():  # what each training run saved (λ = 6 then)
    for seed, config in per_seed.items():
      (w / name / f"seed_{seed}" / "config.json").write_text(json.dumps(config))
  study_json = {
      "config": CONFIG,
      "overrides": OVERRIDES,
      "baseline_row": "b0.1",
      "rows": [{**vars(r), "overrides": list(r.overrides), "seeds": list(r.seeds)} for r in rows],
      "comparisons": [],
  }
  (w / "study.json").write_text(json.dumps(study_json))
  return w


def test_the_command_line_writes_the_choices_and_checks_them(tmp_path):
  w = _study_folder(tmp_path)
  out = tmp_path / "tuning"
  proc = run_cli("dilaff_jax.research.tuning", f"--workdir={w}", f"--choices={CHOICES}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert "[tuning] default: {'affinity.beta': 0.1}" in proc.stdout
  md = (tmp_path / "tuning.md").read_text()
  assert "| b0.1 | 0.1 | 70.00 | 74.00 | **72.00** |" in md
  assert "| b0.1_lam3 | paper | 3.0 | 72.00 | **74.50** | 69.00 |" in md
  assert "| b0.1 | paper | 6.0 | 72.00 | 73.50 | 70.00 |" in md  # the λ its runs used
  assert "- `aaf`: `structure.aaf_weight = 1.0`" in md
  assert (tmp_path / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "tuning.json").read_text())
  assert saved["complete"] and _by_key(saved)[("", "affinity.beta")]["chosen"] == {"affinity.beta": 0.1}
  # a config that differs from the choices (here: another β chosen): one error line naming the value, status 2
  beta = _config_values()[0]
  _by_key(saved)[("", "affinity.beta")]["chosen"] = {"affinity.beta": beta + 1}
  (tmp_path / "other.json").write_text(json.dumps(saved))
  proc = run_cli("dilaff_jax.research.tuning", f"--check={tmp_path / 'other.json'}")
  assert_one_error_line(proc, f"default: affinity.beta is {beta!r}, tune chose {beta + 1!r}")
  proc = run_cli("dilaff_jax.research.tuning", f"--check={tmp_path / 'nothing.json'}")
  assert_one_error_line(proc, "does not exist: run the tune stage and choose first")
  proc = run_cli("dilaff_jax.research.tuning", f"--workdir={w}", f"--output={out}")
  assert_one_error_line(proc, "--choices is required")
  assert os.path.exists(tmp_path / "tuning.md")


def test_the_committed_choices_follow_from_the_committed_tune_runs_and_the_config_runs_them(tmp_path):
  """``results/study_synthetic/tuning.json`` is what the rule chooses from the committed tune export with the
  launcher's ``TUNE_CHOICES`` (so the evidence and the choice cannot drift apart), it is complete, and
  ``configs/synthetic.py`` runs every chosen value (what the test stage checks before it starts)."""
  import re

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(repo, "launch", "study.sh")) as f:
    choices_text = re.search(r'TUNE_CHOICES="(.*?)"', f.read(), re.S).group(1)
  out = tmp_path / "tuning"
  proc = run_cli(
      "dilaff_jax.research.tuning",
      f"--workdir={os.path.join(repo, 'results', 'study_synthetic', 'tune')}",
      f"--choices={choices_text}",
      f"--output={out}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.loads((tmp_path / "tuning.json").read_text())
  with open(os.path.join(repo, "results", "study_synthetic", "tuning.json")) as f:
    committed = json.load(f)
  assert committed["complete"] and again["complete"]
  assert [(c["variant"], c["key"], c["chosen"]) for c in committed["choices"]] == [
      (c["variant"], c["key"], c["chosen"]) for c in again["choices"]
  ]
  tuning.check(committed, "tuning.json")
  default = _by_key(committed)[("", "affinity.beta")]
  assert default["chosen"] == {"affinity.beta": study.load_config(CONFIG, "", []).affinity.beta}


def test_a_damaged_config_json_of_a_run_is_named(tmp_path):
  w = _study_folder(tmp_path)
  out = tmp_path / "tuning"
  for text, said in (('{"affinity": ', "Expecting value"), ("[1, 2]", "not a JSON object")):
    (w / "b0.3" / "seed_1" / "config.json").write_text(text)
    proc = run_cli("dilaff_jax.research.tuning", f"--workdir={w}", f"--choices={CHOICES}", f"--output={out}")
    assert_one_error_line(proc, "b0.3/seed_1/config.json cannot be read", said, "copy it again from the run's folder")
    assert not os.path.exists(f"{out}.json")
