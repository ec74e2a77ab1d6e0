"""The study's answer: claim lines, and each verdict of the declared rule on fabricated results whose outcome is
known by hand (holds; reversed; not shown on the main seeds; not repeated on the fresh ones; a sweep that rises but
peaks early; a Table order; unfinished runs), and the launcher's claims against its rows."""

import json
import os
import subprocess
import sys

import pytest

from dilaff_jax.research import answer
from dilaff_jax.research.study import Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN, FRESH, THREE = (0, 1, 2, 3, 4), (5, 6, 7), (0, 1, 2)
ROWS = [
    Row("baseline", "baseline", seeds=MAIN),
    Row("default", "", seeds=MAIN),
    Row("aaf", "aaf", seeds=MAIN),
    Row("baseline+crf", "", seeds=MAIN, evaluates="baseline"),
    Row("default+paper", "", seeds=MAIN, evaluates="default"),
    Row("baseline_fresh", "baseline", seeds=FRESH),
    Row("default_fresh", "", seeds=FRESH),
    Row("aaf_fresh", "aaf", seeds=FRESH),
    Row("baseline_fresh+crf", "", seeds=FRESH, evaluates="baseline_fresh"),
    Row("default_fresh+paper", "", seeds=FRESH, evaluates="default_fresh"),
    Row("t1_a", "x", seeds=THREE),
    Row("t1_b", "y", seeds=THREE),
]
BASE = {0: 0.70, 1: 0.72, 2: 0.71, 3: 0.73, 4: 0.69, 5: 0.70, 6: 0.71, 7: 0.72}


def _results(default_gain, fresh_gain, aaf_gain=None, sweep=None, t1=(0.01, 0.02, 0.015)):
  """``{row: {seed: results}}``: default = baseline + gain seed by seed; aaf = default + aaf_gain; the CRF rows
  refine the baseline by 1 point; the sweep rows' predicted sweeps (0, 1, 3, 10 iterations) start at default's."""
  gains = {**dict(zip(MAIN, default_gain)), **dict(zip(FRESH, fresh_gain))}
  aaf_gain = aaf_gain or {s: -0.01 - 0.002 * (s % 3) for s in BASE}
  out = {name: {} for name in (r.name for r in ROWS)}
  for s, b in BASE.items():
    fresh = "_fresh" if s in FRESH else ""
    d = b + gains[s]
    out["baseline" + fresh][s] = {"miou": b}
    out["default" + fresh][s] = {"miou": d, "miou_propagated": d + 0.005}
    out["aaf" + fresh][s] = {"miou": d + aaf_gain[s]}
    out[f"baseline{fresh}+crf"][s] = {"miou": b, "miou_crf": b + 0.01}
    rise = sweep or (0.0, 0.01, 0.02, 0.03)
    out[f"default{fresh}+paper"][s] = {
        "miou": d,
        "sweep": {"iterations": [0, 1, 3, 10], "predicted": [d + r + 0.001 * s * (i > 0) for i, r in enumerate(rise)]},
    }
  for s, g in zip(THREE, t1):
    out["t1_b"][s] = {"miou": BASE[s]}
    out["t1_a"][s] = {"miou": BASE[s] + g}
  return out


CLAIMS = """
joint training helps=default>baseline|default_fresh>baseline_fresh
beats AAF=default>aaf|default_fresh>aaf_fresh
beats CRF=default>baseline+crf|default_fresh>baseline_fresh+crf
beats CRF, propagated=default>baseline+crf@miou_propagated|default_fresh>baseline_fresh+crf@miou_propagated
propagation rises=sweep:default+paper|sweep:default_fresh+paper
order=order:t1_a>t1_b
"""
SIGNIFICANT = (0.02, 0.03, 0.025, 0.02, 0.03)  # mean +2.5 points, p ~ 1e-4


def _verdicts(results):
  got = answer.answer(answer.parse_claims(CLAIMS, ROWS), ROWS, results)
  return {c["claim"]: c["verdict"] for c in got["claims"]}, got


def test_a_gain_on_the_main_seeds_repeated_on_the_fresh_ones_holds():
  verdicts, got = _verdicts(_results(SIGNIFICANT, (0.01, -0.005, 0.02)))
  assert verdicts == {
      "joint training helps": "holds",
      "beats AAF": "holds",  # aaf is default - 1 to 1.4 points in every seed
      # default against the CRF's refined mIoU (baseline + 1): +1.5 points on average, every main seed > 0
      "beats CRF": "not shown (the fresh seeds do not repeat it)",  # fresh: 0, -1.5, +1 points: 1 of 3
      "beats CRF, propagated": "holds",  # fresh +0.5, -1, +1.5: mean +0.33, 2 of 3
      "propagation rises": "holds",
      "order": "suggested",
  }
  assert got["complete"]
  crf = got["claims"][2]["main"]
  assert crf["against"] == "miou_crf"
  assert crf["paired"]["values"] == pytest.approx({str(s): g - 0.01 for s, g in zip(MAIN, SIGNIFICANT)})


def test_the_fresh_seeds_must_repeat_it_in_mean_and_in_two_of_three():
  assert _verdicts(_results(SIGNIFICANT, (0.03, -0.01, -0.01)))[0]["joint training helps"] == (
      "not shown (the fresh seeds do not repeat it)"  # mean positive, but 1 of 3
  )
  assert _verdicts(_results(SIGNIFICANT, (0.001, 0.001, -0.01)))[0]["joint training helps"] == (
      "not shown (the fresh seeds do not repeat it)"  # 2 of 3, but the mean negative
  )


def test_a_significant_loss_repeated_is_reversed_and_noise_is_not_shown():
  losses = tuple(-g for g in SIGNIFICANT)
  assert _verdicts(_results(losses, (-0.01, -0.02, 0.01)))[0]["joint training helps"] == "reversed"
  noise = (0.02, -0.01, 0.03, -0.02, 0.0)  # p ~ 0.6
  verdicts, _ = _verdicts(_results(noise, (0.01, 0.02, 0.03)))
  assert verdicts["joint training helps"] == "not shown"


def test_a_sweep_that_rises_but_peaks_early_is_not_shown_and_one_that_falls_is_reversed():
  verdicts, got = _verdicts(_results(SIGNIFICANT, (0.01, 0.01, 0.01), sweep=(0.0, 0.02, 0.03, 0.01)))
  assert verdicts["propagation rises"] == "not shown (rises, but 3 iterations are the best of the mean sweep)"
  assert got["claims"][4]["main"]["best_iterations"] == 3
  verdicts, _ = _verdicts(_results(SIGNIFICANT, (0.01, 0.01, 0.01), sweep=(0.0, 0.01, -0.02, -0.05)))
  assert verdicts["propagation rises"] == "reversed"


def test_orders_are_at_most_suggested_and_unfinished_runs_say_so():
  verdicts, _ = _verdicts(_results(SIGNIFICANT, (0.01, 0.01, 0.01), t1=(-0.01, -0.02, -0.015)))
  assert verdicts["order"] == "suggested reversed"
  verdicts, _ = _verdicts(_results(SIGNIFICANT, (0.01, 0.01, 0.01), t1=(0.01, -0.02, 0.015)))
  assert verdicts["order"] == "not shown"
  results = _results(SIGNIFICANT, (0.01, 0.01, 0.01))
  del results["default_fresh"][7]
  verdicts, got = _verdicts(results)
  assert verdicts["joint training helps"] == "unfinished" and verdicts["order"] == "suggested"
  assert not got["complete"] and "PROVISIONAL" in answer.markdown(got, "x")


def test_the_headline_groups_the_claims_by_verdict_in_a_fixed_order():
  _, got = _verdicts(_results(SIGNIFICANT, (0.01, -0.005, 0.02)))
  assert answer.headline(got) == (
      "**holds**: joint training helps; beats AAF; beats CRF, propagated; propagation rises. "
      "**suggested** (3 seeds, no fresh ones: not a verdict): order. **not shown**: beats CRF."
  )
  results = _results(tuple(-g for g in SIGNIFICANT), (-0.01, -0.02, 0.01), t1=(-0.01, -0.02, -0.015))
  del results["aaf_fresh"][7]
  _, got = _verdicts(results)
  assert answer.headline(got) == (  # provisional: aaf_fresh seed 7 missing
      "(provisional) **holds**: propagation rises. **reversed**: joint training helps; beats CRF; beats CRF, "
      "propagated. **suggested reversed** (3 seeds, no fresh ones: not a verdict): order. **unfinished**: beats AAF."
  )
  assert "In one paragraph: " + answer.headline(got) in answer.markdown(got, "x")


def _squeezed(path):
  with open(os.path.join(REPO, path)) as f:
    return " ".join(f.read().split())


def _launcher_claims(rows):
  with open(os.path.join(REPO, "launch", "study.sh")) as f:
    text = f.read()
  return answer.parse_claims(text.split('TEST_CLAIMS="', 1)[1].split('"', 1)[0], rows)


def test_the_committed_answer_is_the_committed_exports_and_readme_quotes_it():
  """results/study_synthetic/answer.json, where committed, is what STAGE=answer reads from the committed export of
  stage test (its claims, tuning.json and the first machine's results): not stale. README and docs/reproduction.md
  quote its headline word for word (line breaks aside; provisional while runs are unfinished); before it is
  committed, README says the question is open."""
  from dilaff_jax.research import study  # pylint: disable=import-outside-toplevel

  readme, page = _squeezed("README.md"), _squeezed("docs/reproduction.md")
  base = os.path.join(REPO, "results", "study_synthetic")
  if not os.path.exists(os.path.join(base, "answer.json")):
    assert "Does the method work? Not answered yet" in readme
    return
  with open(os.path.join(base, "answer.json")) as f:
    committed = json.load(f)
  with open(os.path.join(base, "tuning.json")) as f:
    tuning = json.load(f)
  export = os.path.join(base, "test")
  _, _, rows, _, _ = study.rows_from_study_json(export, "")
  others = study.load_results(os.path.join(base, "test_first_machine"), rows)
  got = answer.answer_with_alternatives(
      _launcher_claims(rows), rows, study.load_results(export, rows), others, "test_first_machine", tuning
  )
  assert [(c["claim"], c["verdict"]) for c in committed["claims"]] == [
      (c["claim"], c["verdict"]) for c in got["claims"]
  ]
  assert committed["headline"] == answer.headline(got) and committed["complete"] == got["complete"]
  assert committed["headline"] in readme and committed["headline"] in page
  assert "Not answered yet" not in readme


@pytest.mark.parametrize(
    "line, match",
    [
        ("no tests", "is not TITLE=TEST"),
        ("t=default>nope|default_fresh>baseline_fresh", "'nope' is not a row"),
        ("t=default>baseline", "has no fresh test"),
        ("t=order:t1_a>t1_b|order:t1_a>t1_b", "has no fresh test"),
        ("t=default>baseline@miou_crf|default_fresh>baseline_fresh", "metric 'miou_crf'"),
        ("t=sweep:default>baseline|sweep:default_fresh", "is not A>B"),
        ("t=default>baseline|sweep:default_fresh+paper", "of its kind"),
    ],
)
def test_a_bad_claim_line_names_itself(line, match):
  with pytest.raises(answer.AnswerError, match=match):
    answer.parse_claims(line, ROWS)


def test_a_metric_the_runs_lack_is_not_measured():
  results = _results(SIGNIFICANT, (0.01, 0.01, 0.01))
  for name in ("default", "default_fresh"):  # propagation off: no miou_propagated
    for r in results[name].values():
      del r["miou_propagated"]
  verdicts, got = _verdicts(results)
  assert verdicts["beats CRF, propagated"] == "not measured (no miou_propagated in default's results)"
  assert verdicts["beats CRF"] != verdicts["beats CRF, propagated"] and got["complete"]


def test_the_interval_is_the_t_interval_whose_exclusion_of_zero_is_the_t_test():
  # differences 1, 2, 3: mean 2, std 1, n 3; t_{2, 0.975} = 4.302653 (tables): 2 ± 4.302653 / sqrt(3)
  paired = {"n": 3, "mean": 2.0, "std": 1.0}
  mean, low, high = answer.interval(paired)
  assert (
      mean == 2.0 and low == pytest.approx(2 - 2.4841377, abs=1e-6) and high == pytest.approx(2 + 2.4841377, abs=1e-6)
  )
  assert answer.interval({"n": 1, "mean": 2.0, "std": None}) is None
  # the rule's p < 0.05 and the interval excluding 0 agree on the fabricated claims
  got = answer.answer(answer.parse_claims(CLAIMS, ROWS), ROWS, _results(SIGNIFICANT, (0.01, 0.01, 0.01)))
  for c in got["claims"]:
    p, ci = c["main"]["paired"], answer.interval(c["main"]["paired"])
    if p and p.get("p") is not None:
      assert (p["p"] < 0.05) == (ci[1] > 0 or ci[2] < 0), c["claim"]


def test_identical_differences_have_no_t_test_and_are_not_shown():
  """The paired t-test is undefined when every seed differs by the same amount (``study.paired``: p None)."""
  results = _results(SIGNIFICANT, (0.01, 0.01, 0.01), aaf_gain={s: -0.01 for s in BASE})
  assert _verdicts(results)[0]["beats AAF"] == "not shown"


def test_the_launchers_claims_name_its_test_rows_with_fresh_seeds_apart(tmp_path):
  """launch/study.sh's TEST_CLAIMS parse against its TEST_ROWS; every fresh test reads only seeds 5-7, every main
  test none of them."""
  from tests.test_study import _launcher_stages  # pylint: disable=import-outside-toplevel

  from dilaff_jax.research import study  # pylint: disable=import-outside-toplevel

  stages, _ = _launcher_stages()
  rows_text, _, seeds = stages["test"]
  rows = study.parse_rows([], rows_text, seeds)
  claims = _launcher_claims(rows)
  seeds_of = {r.name: set(r.seeds) for r in rows}
  assert len(claims) >= 7
  for c in claims:
    for t in (c.main, c.fresh):
      if t is None:
        continue
      used = seeds_of[t.a] | (seeds_of[t.b] if t.b else set())
      assert (used <= {5, 6, 7}) == (t is c.fresh), c.title


def test_weights_chosen_at_the_edge_of_the_grid_are_noted_beside_the_claims_of_their_methods():
  """tuning.json's ``edge`` marks reach every claim whose rows (or the rows an evaluation row evaluates) run that
  variant, once per claim; the verdicts are unchanged; a choice without an edge adds nothing."""
  tuning = {
      "choices": [
          {"variant": "", "key": "affinity.beta", "chosen": {"affinity.beta": 0.1}, "edge": "smallest"},
          {"variant": "aaf", "key": "structure.aaf_weight", "chosen": {"structure.aaf_weight": 1.0}, "edge": None},
          {"variant": "x", "key": "affinity.beta", "chosen": {"affinity.beta": 1.0}, "edge": "largest"},
          {"variant": "", "key": "propagation", "chosen": {"affinity.iterations": 1}},
      ]
  }
  results = _results(SIGNIFICANT, (0.01, -0.005, 0.02))
  claims = answer.parse_claims(CLAIMS, ROWS)
  plain = answer.answer(claims, ROWS, results)
  got = answer.answer(claims, ROWS, results, tuning)
  beta = "`default`: affinity.beta = 0.1 is the smallest value tried on tune"
  notes = {c["claim"]: c.get("tuned_at_edge") for c in got["claims"]}
  assert notes == {
      "joint training helps": [beta],
      "beats AAF": [beta],  # AAF's weight is inside its grid
      "beats CRF": [beta],  # baseline+crf evaluates the baseline, whose variant was not tuned
      "beats CRF, propagated": [beta],
      "propagation rises": [beta],  # default+paper evaluates default's runs
      "order": ["`x`: affinity.beta = 1.0 is the largest value tried on tune"],
  }
  assert [c["verdict"] for c in got["claims"]] == [c["verdict"] for c in plain["claims"]]
  assert not any("tuned_at_edge" in c for c in plain["claims"])
  md = answer.markdown(got, "w")
  assert "Weights chosen at the edge of the values tried on tune" in md and f"- beats AAF: {beta}" in md
  assert "edge of the values" not in answer.markdown(plain, "w")


def test_the_command_line_writes_the_answer(tmp_path):
  """From a study folder's study.json and per-run results; a bad claim is one error line, exit 2."""
  from dilaff_jax.research import study  # pylint: disable=import-outside-toplevel

  w = str(tmp_path / "study")
  results = _results(SIGNIFICANT, (0.01, -0.005, 0.02))
  rows = [Row(r.name, r.variant, r.overrides, r.seeds, r.evaluates, final_step=10) for r in ROWS]
  for row in rows:
    for seed, res in results[row.name].items():
      d = os.path.join(w, row.name, f"seed_{seed}", "eval", "step_10")
      os.makedirs(d)
      with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)
  study.write_aggregates(w, "configs/synthetic.py", [], rows, "baseline", [])
  cmd = [sys.executable, "-m", "dilaff_jax.research.answer", f"--workdir={w}", f"--output={tmp_path}/out/answer"]
  proc = subprocess.run(cmd + [f"--claims={CLAIMS}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "[answer] joint training helps: holds" in proc.stdout
  md = open(tmp_path / "out" / "answer.md").read()
  assert "| joint training helps | `default>baseline` | +2.50 ± 0.50 (n=5, p = " in md and "**holds**" in md
  # the t interval by hand: 2.776 (t_4 at 0.975) x 0.50 / sqrt(5) = 0.62 points either side of +2.50
  assert "p = 0.00036, 95% interval +1.88 to +3.12, sign p = " in md
  written = json.load(open(tmp_path / "out" / "answer.json"))
  assert written["complete"] is True and written["headline"].startswith("**holds**: joint training helps; ")
  assert os.path.getsize(tmp_path / "out" / "answer.png") > 10_000
  proc = subprocess.run(cmd + ["--claims=t=default>x|y>z"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
  (tmp_path / "bad.json").write_text("[1, 2]")
  for bad in ("bad.json", "none.json"):  # not a tuning.json; no file
    proc = subprocess.run(
        cmd + [f"--claims={CLAIMS}", f"--tuning={tmp_path / bad}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --tuning={tmp_path / bad}: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1
  os.makedirs(tmp_path / "empty")
  for folder, said in (("empty", "holds no results of this study's runs"), ("none", "no such folder")):
    alt = tmp_path / folder
    proc = subprocess.run(
        cmd + [f"--claims={CLAIMS}", f"--alternatives={alt}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --alternatives={alt}: {said}"), proc.stderr


def test_alternative_results_of_a_run_keep_a_verdict_only_where_both_readings_agree(tmp_path):
  """A fresh seed with another result (the same run computed on another CPU): a claim it touches holds only if it
  holds with either result; claims it does not touch are unchanged; both readings are written down."""
  claims, results = answer.parse_claims(CLAIMS, ROWS), _results(SIGNIFICANT, (0.01, -0.005, 0.02))
  # default_fresh seed 7 two points lower: fresh gains +1, -0.5, 0 -> 1 of 3 positive: not repeated
  seven = results["default_fresh"][7]
  lower = {"default_fresh": {7: {**seven, "miou": seven["miou"] - 0.02}}}
  got = answer.answer_with_alternatives(claims, ROWS, results, lower, "first_machine")
  verdicts = {c["claim"]: c["verdict"] for c in got["claims"]}
  assert verdicts["joint training helps"] == (
      "not shown (holds with the runs as they stand, not shown (the fresh seeds do not repeat it) with the "
      "alternative results)"
  )
  joint = got["claims"][0]
  assert joint["alternative"]["fresh"]["paired"]["values"] == pytest.approx({"5": 0.01, "6": -0.005, "7": 0.0})
  assert joint["as_they_stand"] == {"verdict": "holds"}
  # untouched: the main-seed-only order, and the sweep claim (its rows are default_fresh+paper, not default_fresh)
  assert verdicts["order"] == "suggested" and "alternative" not in got["claims"][-1]
  assert verdicts["propagation rises"] == "holds" and "alternative" not in got["claims"][4]
  assert got["alternatives"] == {"source": "first_machine", "runs": ["default_fresh seed 7"]}
  md = answer.markdown(got, "w")
  assert "Alternative results, from `first_machine`: default_fresh seed 7." in md
  assert "| joint training helps | holds | +2.50 ± 0.50 (n=5" in md
  # an alternative that agrees changes nothing but the record; none at all is the plain answer
  same = {"default_fresh": {7: {**seven, "miou": seven["miou"] + 0.01}}}
  agreeing = answer.answer_with_alternatives(claims, ROWS, results, same, "m")
  assert {c["claim"]: c["verdict"] for c in agreeing["claims"]} == {
      c["claim"]: c["verdict"] for c in answer.answer(claims, ROWS, results)["claims"]
  }
  assert answer.answer_with_alternatives(claims, ROWS, results, {}, "") == answer.answer(claims, ROWS, results)
  assert answer.combine("holds", "unfinished") == "unfinished"
