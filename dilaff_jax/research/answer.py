r"""The study's answer: each of the paper's claims read by the rule written down before stage ``test`` ran
(``docs/reproduction.md``, "How the answer will be read"), from a study folder's per-run results.

  python -m dilaff_jax.research.answer --workdir=runs/study_test --claims="$TEST_CLAIMS" \
      --output=results/study_synthetic/answer --tuning=results/study_synthetic/tuning.json

writes answer.md, .json and .png. Both carry the answer in one paragraph (``headline``: the claims grouped by
verdict), which README and ``docs/reproduction.md`` quote word for word. ``--tuning`` (optional: the tune stage's
choices) adds to each claim the weights of its methods that the tune stage chose at the smallest or largest of the
values tried (the method may be under-tuned).

``--claims``: one claim per line (or ``;``), ``TITLE=TEST[|FRESH_TEST]``, each test in one of three forms:
  A>B[@METRIC]     row A better than row B, seed by seed over the seeds both finished (``study.compare``: against a
                   dense-CRF row, B's CRF-refined mIoU); METRIC is A's ``miou`` (default) or ``miou_propagated``
  sweep:ROW        propagation rises: ROW's predicted sweep at its last iteration count against 0 iterations
  order:A>B        an order of two rows with no fresh seeds (Tables 1 and 2): at most "suggested"

The rule. A claim **holds** when its test on the main seeds is positive with a two-sided paired t-test p < 0.05 and
its FRESH_TEST repeats it: mean difference positive and positive in at least 2 of its 3 seeds. It is **reversed**
when the main test is negative with p < 0.05 and the fresh seeds agree in the same way. Otherwise it is **not
shown**. A ``sweep:`` claim holds only if, besides, its last iteration count is the best of the mean sweep on the
main seeds. An ``order:`` claim is **suggested** (or suggested reversed) at p < 0.05, else not shown. A test whose
rows have not finished every declared seed is **unfinished**, and the whole answer is marked provisional; one whose
metric the runs do not have (``miou_propagated`` where propagation is off) is **not measured**. Where
every seed differs by the same amount the t-test is undefined (``study.paired`` gives no p): not shown.

``--alternatives=DIR``: a folder of the study's layout holding other results of some of its runs (a run trained
again on another kind of CPU gives other last bits, and another mIoU: ``docs/reproduction.md``). The answer is read
twice, with the runs as they stand and with DIR's results in place of theirs; a claim keeps its verdict only where
the two agree, and is **not shown** where they do not (unfinished where either is). ``answer.md`` names the
substituted runs and both verdicts of every claim they touch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

from dilaff_jax import errors
from dilaff_jax.process import cli, files
from dilaff_jax.research import study

ALPHA = 0.05
FRESH_AGREE = 2  # of 3 fresh seeds
METRICS = ("miou", "miou_propagated")
_TEST = re.compile(
    r"^(?:(?P<kind>sweep|order):)?(?P<a>[A-Za-z0-9_.+-]+?)(?:>(?P<b>[A-Za-z0-9_.+-]+?))?(?:@(?P<m>\w+))?$"
)


class AnswerError(errors.UserError):
  """A bad claim line or a study folder that cannot answer it."""


@dataclasses.dataclass(frozen=True)
class Test:
  """``kind`` ``better`` (``a`` > ``b`` in ``metric``), ``sweep`` (row ``a``'s sweep) or ``order``."""

  kind: str
  a: str
  b: str = ""
  metric: str = "miou"

  def text(self) -> str:
    if self.kind == "sweep":
      return f"sweep:{self.a}"
    suffix = "" if self.metric == "miou" else f"@{self.metric}"
    return ("order:" if self.kind == "order" else "") + f"{self.a}>{self.b}{suffix}"


@dataclasses.dataclass(frozen=True)
class Claim:
  title: str
  main: Test
  fresh: Test | None = None


def _parse_test(text: str, line: str, names: Sequence[str]) -> Test:
  m = _TEST.match(text.strip())
  kind = (m.group("kind") if m else None) or "better"
  if not m or (kind == "sweep") != (m.group("b") is None) or (kind != "better" and m.group("m")):
    raise AnswerError(f"--claims: {line!r}: {text.strip()!r} is not A>B[@METRIC], sweep:ROW or order:A>B")
  test = Test(kind, m.group("a"), m.group("b") or "", m.group("m") or "miou")
  for name in (test.a, test.b):
    if name and name not in names:
      raise AnswerError(f"--claims: {line!r}: {name!r} is not a row of the study ({', '.join(names)})")
  if test.metric not in METRICS:
    raise AnswerError(f"--claims: {line!r}: metric {test.metric!r} is not one of {', '.join(METRICS)}")
  return test


def parse_claims(text: str, rows: Sequence[study.Row]) -> list[Claim]:
  """``--claims`` as :class:`Claim` s (see the module doc); a bad line raises :class:`AnswerError` naming it."""
  names = [r.name for r in rows]
  claims = []
  for line in (s.strip() for s in re.split(r"[;\n]", text)):
    if not line:
      continue
    title, sep, tests = line.partition("=")
    parts = tests.split("|")
    if not sep or not title.strip() or len(parts) > 2:
      raise AnswerError(f"--claims: {line!r} is not TITLE=TEST or TITLE=TEST|FRESH_TEST")
    main = _parse_test(parts[0], line, names)
    fresh = _parse_test(parts[1], line, names) if len(parts) == 2 else None
    if (main.kind == "order") != (fresh is None) or (fresh is not None and fresh.kind != main.kind):
      raise AnswerError(f"--claims: {line!r}: an order: claim has no fresh test; every other claim has one of its kind")
    claims.append(Claim(title.strip(), main, fresh))
  if not claims:
    raise AnswerError("--claims: no claim given")
  return claims


def _sweep_at(result: dict, iterations: int) -> float | None:
  sweep = result.get("sweep") or {}
  its = sweep.get("iterations") or []
  return sweep["predicted"][its.index(iterations)] if iterations in its and "predicted" in sweep else None


def evaluate_test(test: Test, rows: Sequence[study.Row], results: dict[str, dict[int, dict]]) -> dict:
  """The test's paired statistics (``study.paired``: per-seed differences, mean, std, t, p, sign test), whether
  its rows finished every declared seed, and for a sweep the mean sweep and its best iteration count."""
  declared = {r.name: set(r.seeds) for r in rows}
  names = [test.a] + ([test.b] if test.b else [])
  finished = all(declared[n] <= set(results.get(n, {})) for n in names)
  out = {"test": test.text(), "finished": finished}
  if test.kind == "sweep":
    per_seed = results.get(test.a, {})
    sweeps = {s: r["sweep"] for s, r in per_seed.items() if (r.get("sweep") or {}).get("predicted")}
    if not sweeps:
      return {**out, "finished": False, "paired": None}
    its = next(iter(sweeps.values()))["iterations"]
    last = its[-1]
    top = {s: _sweep_at(per_seed[s], last) for s in sweeps}
    zero = {s: _sweep_at(per_seed[s], 0) for s in sweeps}
    out["paired"] = study.paired({s: v for s, v in top.items() if v is not None}, zero)
    same = [sw["predicted"] for sw in sweeps.values() if sw["iterations"] == its]
    mean = [sum(col) / len(col) for col in zip(*same)]
    out.update(iterations=its, mean_sweep=mean, best_iterations=its[max(range(len(its)), key=mean.__getitem__)])
    out["against"] = "0 iterations"
    return out
  compared = study.compare(results, test.a, test.b)["metrics"].get(test.metric)
  out["paired"] = compared
  out["against"] = compared["against"] if compared else None
  out["missing"] = finished and compared is None  # e.g. no miou_propagated where propagation is off
  return out


def _direction(paired: dict | None) -> int:
  """+1 / -1 when the paired difference is significant (p < ALPHA) in that direction, else 0."""
  if not paired or paired.get("p") is None or not paired["n"] or paired["p"] >= ALPHA:
    return 0
  return 1 if paired["mean"] > 0 else -1


def _fresh_agrees(paired: dict | None, direction: int) -> bool:
  if not paired or not paired["n"]:
    return False
  agree = sum(v * direction > 0 for v in paired["values"].values())
  return paired["mean"] * direction > 0 and agree >= FRESH_AGREE


def verdict(claim: Claim, main: dict, fresh: dict | None) -> str:
  """The rule of the module doc: holds, reversed, not shown, suggested (reversed), or unfinished."""
  if not main["finished"] or (fresh is not None and not fresh["finished"]):
    return "unfinished"
  if main.get("missing") or (fresh is not None and fresh.get("missing")):
    return f"not measured (no {claim.main.metric} in {claim.main.a}'s results)"
  direction = _direction(main["paired"])
  if claim.main.kind == "order":
    return {1: "suggested", -1: "suggested reversed", 0: "not shown"}[direction]
  if direction == 0:
    return "not shown"
  if not _fresh_agrees(fresh["paired"], direction):
    return "not shown (the fresh seeds do not repeat it)"
  if claim.main.kind == "sweep" and direction > 0 and main["best_iterations"] != main["iterations"][-1]:
    return f"not shown (rises, but {main['best_iterations']} iterations are the best of the mean sweep)"
  return "holds" if direction > 0 else "reversed"


def edge_notes(tuning: dict | None, rows: Sequence[study.Row]) -> dict[str, list[str]]:
  """Row name -> the weights the tune stage chose for its variant (an evaluation row: its source's) at the smallest
  or largest of the values tried (``tuning.json``'s ``edge``): that method may be under-tuned against the others."""
  by_variant: dict[str, list[str]] = {}
  for c in (tuning or {}).get("choices", []):
    if c.get("edge"):
      value = c["chosen"][c["key"]]
      name = c["variant"] or study.DEFAULT_VARIANT
      by_variant.setdefault(c["variant"], []).append(
          f"`{name}`: {c['key']} = {value!r} is the {c['edge']} value tried on tune"
      )
  by_name = {r.name: r for r in rows}
  out = {}
  for r in rows:
    source = by_name.get(r.evaluates, r)
    if source.variant in by_variant:
      out[r.name] = by_variant[source.variant]
  return out


def answer(
    claims: Sequence[Claim],
    rows: Sequence[study.Row],
    results: dict[str, dict[int, dict]],
    tuning: dict | None = None,
) -> dict:
  """Every claim's tests and verdict; with ``tuning`` (the tune stage's ``tuning.json``), each claim also lists
  the weights of its rows' methods that were chosen at the edge of the values tried (``edge_notes``)."""
  notes = edge_notes(tuning, rows)
  out = []
  for claim in claims:
    main = evaluate_test(claim.main, rows, results)
    fresh = evaluate_test(claim.fresh, rows, results) if claim.fresh else None
    names = [n for t in (claim.main, claim.fresh) if t for n in (t.a, t.b) if n]
    edge = list(dict.fromkeys(note for n in names for note in notes.get(n, [])))
    out.append({"claim": claim.title, "main": main, "fresh": fresh, "verdict": verdict(claim, main, fresh)})
    if edge:
      out[-1]["tuned_at_edge"] = edge
  return {"complete": all(c["verdict"] != "unfinished" for c in out), "alpha": ALPHA, "claims": out}


def substitute(results: dict[str, dict[int, dict]], others: dict[str, dict[int, dict]]) -> dict:
  """``results`` with every run that ``others`` holds replaced by ``others``' results of it."""
  out = {name: dict(per_seed) for name, per_seed in results.items()}
  for name, per_seed in others.items():
    out.setdefault(name, {}).update(per_seed)
  return out


def combine(as_they_stand: str, alternative: str) -> str:
  """One claim's verdict read with both results of its substituted runs: kept where the two agree."""
  if as_they_stand == alternative:
    return as_they_stand
  if "unfinished" in (as_they_stand, alternative):
    return "unfinished"
  return f"not shown ({as_they_stand} with the runs as they stand, {alternative} with the alternative results)"


def answer_with_alternatives(
    claims: Sequence[Claim],
    rows: Sequence[study.Row],
    results: dict[str, dict[int, dict]],
    others: dict[str, dict[int, dict]],
    source: str,
    tuning: dict | None = None,
) -> dict:
  """:func:`answer` read with the runs as they stand and with ``others`` (from ``source``) in their place: each
  claim's ``verdict`` is :func:`combine` of the two; a claim whose tests touch a substituted run keeps both readings
  (``as_they_stand``, ``alternative``: verdict and statistics)."""
  first = answer(claims, rows, results, tuning)
  if not others:
    return first
  second = answer(claims, rows, substitute(results, others), tuning)
  runs = sorted(f"{name} seed {seed}" for name, per_seed in others.items() for seed in per_seed)
  for claim, c, alt in zip(claims, first["claims"], second["claims"]):
    pairs = [(test, out) for test, out in ((claim.main, c["main"]), (claim.fresh, c["fresh"])) if test]
    touched = any(  # a substituted run that one of the claim's tests compared
        str(seed) in (out["paired"] or {}).get("values", {})
        for test, out in pairs
        for name in (test.a, test.b)
        for seed in others.get(name, {})
    )
    if touched:
      c["as_they_stand"] = {"verdict": c["verdict"]}
      c["alternative"] = {"verdict": alt["verdict"], "main": alt["main"], "fresh": alt["fresh"]}
      c["verdict"] = combine(c["verdict"], alt["verdict"])
  first["alternatives"] = {"source": source, "runs": runs}
  first["complete"] = all(c["verdict"] != "unfinished" for c in first["claims"])
  return first


VERDICT_ORDER = ("holds", "reversed", "suggested", "suggested reversed", "not shown", "not measured", "unfinished")


_ONLY_SUGGESTED = " (3 seeds, no fresh ones: not a verdict)"


def headline(result: dict) -> str:
  """The answer in one paragraph, the claims grouped by verdict (a verdict's reason in brackets left out) in the
  order of ``VERDICT_ORDER``, a suggested order marked as no verdict: the sentence README and
  ``docs/reproduction.md`` quote word for word."""
  groups: dict[str, list[str]] = {}
  for c in result["claims"]:
    groups.setdefault(c["verdict"].split(" (")[0], []).append(c["claim"])
  order = [v for v in VERDICT_ORDER if v in groups] + [v for v in groups if v not in VERDICT_ORDER]
  parts = [f"**{v}**{_ONLY_SUGGESTED * v.startswith('suggested')}: {'; '.join(groups[v])}" for v in order]
  prefix = "" if result["complete"] else "(provisional) "
  return prefix + ". ".join(parts) + "."


def _stats(paired: dict | None) -> str:
  if not paired or not paired["n"]:
    return "–"
  text = study.format_mean_std(paired, signed=True)
  extra = [f"n={paired['n']}"]
  if paired.get("p") is not None:
    extra.append(f"p = {paired['p']:.2g}")
  bounds = interval(paired)
  if bounds:  # what the seeds leave possible: a claim not shown may still hide a gain up to the high end
    extra.append(f"95% interval {100 * bounds[1]:+.2f} to {100 * bounds[2]:+.2f}")
  if paired.get("sign_p") is not None:
    extra.append(f"sign p = {paired['sign_p']:.2g}")
  per_seed = study.format_per_seed(paired["values"], signed=True)
  return f"{text} ({', '.join(extra)}; {paired['improved']}/{paired['n']} better; {per_seed})"


def markdown(result: dict, source: str) -> str:
  lines = [
      "# The study's answer" + ("" if result["complete"] else " (PROVISIONAL: some runs have not finished)"),
      "",
      f"From `{source}`, by `python -m dilaff_jax.research.answer`: every claim read by the rule written down before "
      f"the runs (paired t-test p < {result['alpha']} on the main seeds, repeated on the fresh seeds: mean positive "
      f"and positive in at least {FRESH_AGREE} of 3). Differences in mIoU points, A minus B, with the 95% t interval "
      "of their mean (what the seeds leave possible: a claim not shown may hide a difference up to its ends).",
      "",
      "In one paragraph: " + headline(result),
      "",
      "| claim | test | main seeds: Δ | fresh test | fresh seeds: Δ | verdict |",
      "|---|---|---|---|---|---|",
  ]
  for c in result["claims"]:
    main, fresh = c["main"], c["fresh"] or {}
    against = f" (against {main['against']})" if main.get("against") not in (None, "miou") else ""
    lines.append(
        f"| {c['claim']} | `{main['test']}`{against} | {_stats(main['paired'])} | "
        + (f"`{fresh['test']}` | {_stats(fresh['paired'])}" if fresh else "– | –")
        + f" | **{c['verdict']}** |"
    )
  alternatives = result.get("alternatives")
  if alternatives:
    lines += [
        "",
        f"Alternative results, from `{alternatives['source']}`: {', '.join(alternatives['runs'])}. Every claim they "
        "touch was read twice, and keeps its verdict only where the two readings agree:",
        "",
        "| claim | as they stand | with the alternative results: main Δ | fresh Δ | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in result["claims"]:
      if "alternative" in c:
        alt = c["alternative"]
        lines.append(
            f"| {c['claim']} | {c['as_they_stand']['verdict']} | {_stats(alt['main']['paired'])} | "
            f"{_stats((alt['fresh'] or {}).get('paired'))} | {alt['verdict']} |"
        )
  sweeps = [c["main"] for c in result["claims"] if "mean_sweep" in c["main"]]
  if sweeps:
    lines += ["", "Mean predicted sweeps of the sweep claims (main seeds):", ""]
    for s in sweeps:
      cells = ", ".join(f"{i} it. {100 * v:.2f}" for i, v in zip(s["iterations"], s["mean_sweep"]))
      lines.append(f"- `{s['test']}`: {cells} (best: {s['best_iterations']})")
  edged = [c for c in result["claims"] if c.get("tuned_at_edge")]
  if edged:
    lines += ["", "Weights chosen at the edge of the values tried on tune (that method may be under-tuned):", ""]
    lines += [f"- {c['claim']}: {'; '.join(c['tuned_at_edge'])}" for c in edged]
  return "\n".join(lines) + "\n"


def interval(paired: dict | None, level: float = 0.95) -> tuple[float, float, float] | None:
  """``(mean, low, high)`` of a paired difference: the mean with its two-sided ``level`` t interval, ``mean ±
  t_{n-1} · std / sqrt(n)`` (the interval the paired t-test rejects 0 outside of); None for fewer than 2 seeds."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  if not paired or not paired["n"] or paired["n"] < 2 or paired["std"] is None:
    return None
  half = float(stats.t.ppf(0.5 + level / 2, paired["n"] - 1)) * paired["std"] / paired["n"] ** 0.5
  return paired["mean"], paired["mean"] - half, paired["mean"] + half


def plot(result: dict, path: str) -> None:
  """``answer.png``: one line per claim: the main seeds' mean difference with its 95% t interval (the p < 0.05
  test is whether it excludes 0), the fresh seeds' differences as dots, the verdict at the right."""
  from dilaff_jax.engine import visualize  # pylint: disable=import-outside-toplevel  # jax: only to draw

  plt = visualize.pyplot()
  claims = result["claims"]
  fig, ax = plt.subplots(figsize=(9, 0.45 * len(claims) + 1.4), dpi=110)
  for y, c in enumerate(reversed(claims)):
    ci = interval(c["main"]["paired"])
    if ci is not None:
      mean, low, high = (100 * v for v in ci)
      ax.plot([low, high], [y, y], color="tab:blue", lw=2)
      ax.plot([mean], [y], "o", color="tab:blue", ms=5)
    fresh = (c.get("fresh") or {}).get("paired") or {}
    xs = [100 * v for v in (fresh.get("values") or {}).values()]
    ax.plot(xs, [y - 0.2] * len(xs), "^", color="tab:orange", ms=4, ls="none")
    ax.text(1.01, y, c["verdict"], transform=ax.get_yaxis_transform(), va="center", fontsize=7)
  ax.axvline(0, color="k", lw=0.8)
  ax.set_yticks(range(len(claims)))
  ax.set_yticklabels([c["claim"] for c in reversed(claims)], fontsize=7)
  ax.set_xlabel("A minus B, mIoU points (blue: main seeds, mean and 95% interval; orange: fresh seeds)", fontsize=8)
  ax.tick_params(axis="x", labelsize=7)
  ax.grid(axis="x", alpha=0.3)
  ax.set_title("The study's answer" + ("" if result["complete"] else " (PROVISIONAL)"), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def write(result: dict, output: str, source: str) -> None:
  """``OUTPUT.json`` (the verdicts with their statistics), ``OUTPUT.md`` (the table) and ``OUTPUT.png``."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  result = {**result, "headline": headline(result)}
  files.write_atomic(output + ".json", json.dumps(result, indent=1, allow_nan=False) + "\n")
  files.write_atomic(output + ".md", markdown(result, source))
  plot(result, output + ".png")


def _define(fv) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel

  flags.DEFINE_string("workdir", None, "The test stage's study folder (or its export).", flag_values=fv)
  flags.DEFINE_string("claims", None, "The claims and their tests (see the module doc).", flag_values=fv)
  flags.DEFINE_string("output", None, "Writes OUTPUT.md, OUTPUT.json and OUTPUT.png.", flag_values=fv)
  flags.DEFINE_string(
      "tuning",
      None,
      "The tune stage's tuning.json: notes the weights chosen at the edge of the values tried.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "alternatives",
      None,
      "A folder of the study's layout with other results of some runs: a claim they touch keeps its verdict only "
      "if it reads the same with them.",
      flag_values=fv,
  )


def main(argv: Sequence[str]) -> int:
  try:
    fv = cli.parse_flags(_define, argv, "dilaff_jax.research.answer", __doc__, required=("workdir", "claims", "output"))
    if fv is None:
      return 0
    _, _, rows, _, _ = study.rows_from_study_json(fv.workdir, "give the test stage's study folder or its export")
    claims = parse_claims(fv.claims, rows)
    tuning = None
    if fv.tuning:
      try:
        with open(fv.tuning) as f:
          tuning = json.load(f)
      except (OSError, ValueError) as e:
        raise AnswerError(f"--tuning={fv.tuning}: cannot read it ({e}): give the tune stage's tuning.json") from None
      if not isinstance(tuning, dict) or not isinstance(tuning.get("choices"), list):
        raise AnswerError(f"--tuning={fv.tuning}: not a tuning.json (no list of choices): give the tune stage's")
    others = {}
    if fv.alternatives:
      if not os.path.isdir(fv.alternatives):
        raise AnswerError(f"--alternatives={fv.alternatives}: no such folder: give a folder of the study's layout")
      others = study.load_results(fv.alternatives, rows)
      if not others:
        raise AnswerError(
            f"--alternatives={fv.alternatives}: holds no results of this study's runs "
            "(expected ROW/seed_N/eval/step_K/results.json)"
        )
    source = os.path.basename(os.path.normpath(fv.alternatives)) if fv.alternatives else ""
    result = answer_with_alternatives(claims, rows, study.load_results(fv.workdir, rows), others, source, tuning)
    write(result, fv.output, os.path.basename(os.path.normpath(fv.workdir)))
  except errors.UserError as e:
    cli.exit_with_error(e)
  said = [f"[answer] {c['claim']}: {c['verdict']}" for c in result["claims"]]
  said.append(f"[answer] {'' if result['complete'] else 'PROVISIONAL: '}{fv.output}.md, .json, .png")
  print("\n".join(said), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
