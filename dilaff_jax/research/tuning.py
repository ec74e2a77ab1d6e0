r"""The tune stage's choices, made by one rule fixed before its runs: the settings a study's tune stage
(``launch/study.sh``, ``STAGE=tune``) scores on the tune split are chosen here, written down with their evidence, and
checked against the config that the test stage will run.

  python -m dilaff_jax.research.tuning --workdir=runs/study_tune --choices="$TUNE_CHOICES" \
      --output=results/study_synthetic/tuning                    # writes tuning.md, .json and .png
  python -m dilaff_jax.research.tuning --check=results/study_synthetic/tuning.json    # the config agrees with it

``--choices``: one choice per line (or ``;``), in one of two forms:
  VARIANT:KEY=ROW,ROW,...   the value of config KEY for config variant VARIANT (``default``: none), from the
                            trained rows ROW (each a run of VARIANT with its own value of KEY): the row with the
                            highest mean mIoU without post-processing wins, and its KEY is the choice
  VARIANT:propagation       propagation's reading of Eq. 6 (``affinity.propagation_reading``), λ (Eq. 7,
                            ``affinity.lam``) and iteration count (``affinity.iterations``), on the runs of the row
                            chosen for VARIANT by its ``KEY=`` line: that row and every row that evaluates it again
                            (with another λ or reading) are the candidates, each at every iteration count of its
                            sweep; the (row, count) with the highest mean mIoU of the predicted sweep wins. If 0
                            iterations win, propagation does not help on tune: only ``affinity.iterations = 0`` is
                            chosen.

The rule. Means are taken over the seeds that every candidate of the choice has finished (paired, so one lucky seed
of one candidate does not decide). A tie goes to the candidate listed first (rows in the order given, iteration
counts in increasing order), so list weights from small to large. Every declared seed of every candidate must be
finished; ``--allow_unfinished`` makes a provisional choice from the seeds there are, marked as such, which
``--check`` refuses. Each candidate's values are the ones its runs used, read from the ``config.json`` every training
run saves (an evaluate row: its own overrides over its source's), not from the config file, which the choices are
written into after the runs (a value the runs left at the file's default would otherwise change under them).

``--check`` loads each choice's variant of the config named in ``tuning.json`` (the study's, e.g.
``configs/synthetic.py``) and exits with an ``error:`` line (status 2) naming every key whose value differs from the
choice: the test stage starts only when the config runs what tune chose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

from dilaff_jax import errors
from dilaff_jax.engine import config_checks
from dilaff_jax.process import cli, files
from dilaff_jax.research import study

PROPAGATION = "propagation"
PROPAGATION_KEYS = ("affinity.propagation_reading", "affinity.lam", "affinity.iterations")


class TuningError(errors.UserError):
  """A bad choice line, a tune stage that lacks runs, or a config that disagrees with the choices."""


@dataclasses.dataclass(frozen=True)
class Choice:
  """One line of ``--choices``: ``key`` of config ``variant`` ('' = none) among ``rows``; or, with ``key`` =
  ``propagation``, the propagation settings on the row chosen for ``variant``."""

  variant: str
  key: str
  rows: tuple[str, ...] = ()


def parse_choices(text: str, rows: Sequence[study.Row]) -> list[Choice]:
  """``--choices`` (grammar in the module doc), checked against the study's rows."""
  by_name = {r.name: r for r in rows}
  out: list[Choice] = []
  for line in re.split(r"[;\n]", text):
    line = line.strip()
    if not line:
      continue
    variant, sep, rest = line.partition(":")
    if not sep or not variant or not rest:
      raise TuningError(f"--choices: {line!r} is not VARIANT:KEY=ROW,ROW,... or VARIANT:propagation")
    variant = "" if variant == study.DEFAULT_VARIANT else variant
    if rest == PROPAGATION:
      out.append(Choice(variant, PROPAGATION))
      continue
    key, sep, names = rest.partition("=")
    names = tuple(n.strip() for n in names.split(",") if n.strip())
    if not sep or not key or not names:
      raise TuningError(f"--choices: {line!r} is not VARIANT:KEY=ROW,ROW,... (e.g. aaf:structure.aaf_weight=a,b,c)")
    for name in names:
      row = by_name.get(name)
      if row is None:
        raise TuningError(f"--choices: {line!r}: {name!r} is not a row of the study")
      if row.evaluates or row.variant != variant:
        raise TuningError(
            f"--choices: {line!r}: row {name!r} must train variant {variant or study.DEFAULT_VARIANT!r} "
            f"(it {'evaluates ' + row.evaluates if row.evaluates else 'trains ' + (row.variant or 'default')})"
        )
    out.append(Choice(variant, key.strip(), names))
  for c in out:
    weights = [w for w in out if w.variant == c.variant and w.key != PROPAGATION]
    if c.key == PROPAGATION and len(weights) != 1:
      raise TuningError(
          f"--choices: {c.variant or study.DEFAULT_VARIANT}:propagation needs exactly one KEY=ROWS line of the same "
          f"variant (the row whose runs it tunes); found {len(weights)}"
      )
  seen = [(c.variant, c.key) for c in out]
  for item in seen:
    if seen.count(item) > 1:
      raise TuningError(f"--choices: {item[0] or study.DEFAULT_VARIANT}:{item[1]} is chosen twice")
  if not out:
    raise TuningError("--choices: no choice given")
  return out


def _value(config, key: str):
  node = config_checks.get(config, key)
  return node.to_dict() if hasattr(node, "to_dict") else node


def recorded_configs(workdir: str, rows: Sequence[study.Row]) -> dict[str, dict[int, dict]]:
  """``{trained row: {seed: the config its run saved}}`` (each run's ``config.json``) of the runs that saved one.

  The values a run used are these, not what the config file says now: the choices are written into the config file
  after the runs, so a key the tune stage left at its default (λ of the row that is not re-evaluated) has changed."""
  out = {}
  for row in rows:
    if row.evaluates:
      continue  # an evaluation saves no config of its own: its source's plus its own overrides
    for seed in row.seeds:
      path = os.path.join(study.run_dir(workdir, row, seed), "config.json")
      if not os.path.exists(path):
        continue
      try:
        config = files.read_json(path, dict, "a JSON object")
      except (OSError, ValueError) as e:
        raise TuningError(f"{path} cannot be read ({cli.one_line(e)}): copy it again from the run's folder") from None
      out.setdefault(row.name, {})[seed] = config
  return out


def _recorded_value(config: dict, key: str, where: str):
  try:
    return config_checks.get(config, key)  # a saved config.json is the ConfigDict's nesting as plain dicts
  except (config_checks.ConfigError, TypeError):
    raise TuningError(f"{where} has no {key}: it is not a config of this project") from None


def _run_values(row, rows, keys, seeds, config_of, recorded):
  """The values of ``keys`` that ``row``'s runs of ``seeds`` used: what the evaluate row itself overrides, else what
  its source's (or its own) runs recorded in ``config.json`` (``recorded``; None: the config file as it is now)."""
  now = config_of(row)
  own = {o.split("=", 1)[0] for o in row.overrides} if row.evaluates else set()
  src = study.source_row(row, rows)
  out = {}
  for key in keys:
    if recorded is None or key in own:
      out[key] = json.loads(json.dumps(_value(now, key)))
      continue
    values = []
    for seed in seeds:
      if seed not in recorded.get(src.name, {}):
        raise TuningError(
            f"{src.name}/seed_{seed}/config.json is missing: which {key} that run used cannot be told (the config file "
            "may have changed since); copy the run's folder whole, or train it again"
        )
      values.append(_recorded_value(recorded[src.name][seed], key, f"{src.name}/seed_{seed}/config.json"))
    if any(v != values[0] for v in values):
      raise TuningError(f"row {row.name}: its seeds' runs used different {key} ({values}): one value per row")
    out[key] = values[0]
  return out


def _common_seeds(
    candidates: Sequence[study.Row], results: dict[str, dict[int, dict]], allow_unfinished: bool
) -> tuple[list[int], bool]:
  """The seeds every candidate has finished, and whether every declared seed is finished."""
  missing = [f"{r.name} seed {s}" for r in candidates for s in r.seeds if s not in results.get(r.name, {})]
  if missing and not allow_unfinished:
    raise TuningError(
        f"the tune stage has not finished {len(missing)} run(s) ({', '.join(missing[:4])}"
        f"{', ...' if len(missing) > 4 else ''}): let it finish, or pass --allow_unfinished for a provisional choice"
    )
  seeds = sorted(set.intersection(*(set(results.get(r.name, {})) for r in candidates)))
  return seeds, not missing


def choose(
    choices: Sequence[Choice],
    rows: Sequence[study.Row],
    results: dict[str, dict[int, dict]],
    config_path: str,
    overrides: Sequence[str],
    allow_unfinished: bool = False,
    recorded: dict[str, dict[int, dict]] | None = None,
) -> dict:
  """Every choice by the module's rule: ``{"complete", "choices": [{variant, key, value(s), seeds, candidates}]}``
  (``candidates``: per row its values of the chosen keys, per-seed scores and mean; the winner marked).
  ``recorded``: the configs the runs saved (:func:`recorded_configs`), where each candidate's values are read; None
  reads them from the config file as it is now, right only while it is unchanged since the runs."""
  by_name = {r.name: r for r in rows}
  config_of = lambda row: study.load_config(
      config_path, study.source_row(row, rows).variant, study.run_overrides(row, rows, overrides)
  )
  out, complete, winner = [], True, {}
  for c in [c for c in choices if c.key != PROPAGATION] + [c for c in choices if c.key == PROPAGATION]:
    if c.key == PROPAGATION and c.variant not in winner:  # (provisional) its row is not chosen yet
      complete = False
      out.append({"variant": c.variant, "key": c.key, "chosen": None, "seeds": [], "candidates": []})
      continue
    candidates = [by_name[n] for n in c.rows] if c.key != PROPAGATION else [winner[c.variant]]
    candidates += [r for r in rows if c.key == PROPAGATION and r.evaluates == candidates[0].name]
    seeds, done = _common_seeds(candidates, results, allow_unfinished)
    if not seeds:  # (provisional) no seed finished by every candidate yet
      complete = False
      out.append({"variant": c.variant, "key": c.key, "chosen": None, "seeds": [], "candidates": []})
      continue
    if c.key != PROPAGATION:
      entries = []
      for row in candidates:
        scores = [results[row.name][s]["miou"] for s in seeds]
        values = _run_values(row, rows, [c.key], seeds, config_of, recorded)
        entries.append({"row": row.name, "values": values, "scores": scores})
      values = [e["values"][c.key] for e in entries]
      if len(set(map(repr, values))) != len(values):
        raise TuningError(f"--choices: the rows of {c.key} ({', '.join(c.rows)}) do not each have their own value")
    else:
      entries = []
      for row in candidates:
        used = _run_values(row, rows, PROPAGATION_KEYS[:2], seeds, config_of, recorded)
        sweeps = [results[row.name][s].get("sweep") for s in seeds]
        if any(not sw or "predicted" not in sw for sw in sweeps):
          raise TuningError(f"row {row.name}: a run without a propagation sweep (eval.iterations) cannot tune it")
        counts = sweeps[0]["iterations"]
        if any(sw["iterations"] != counts for sw in sweeps):
          raise TuningError(f"row {row.name}: its seeds' sweeps have different iteration counts")
        for i, n in enumerate(counts):
          entries.append({"row": row.name, "values": {**used, "affinity.iterations": n}, "scores": []})
          entries[-1]["scores"] = [sw["predicted"][i] for sw in sweeps]
      entries.sort(key=lambda e: e["values"]["affinity.iterations"])  # ties: fewer iterations, then row order
    for e in entries:
      e["mean"] = sum(e["scores"]) / len(e["scores"])
    best = max(range(len(entries)), key=lambda i: (entries[i]["mean"], -i))  # the first of equal means
    entries[best]["chosen"] = True
    value = dict(entries[best]["values"])
    if c.key != PROPAGATION:
      winner[c.variant] = by_name[entries[best]["row"]]  # the runs its propagation choice is made on
    elif value["affinity.iterations"] == 0:
      value = {"affinity.iterations": 0}  # no iteration helps: λ and the reading are not chosen
    complete &= done
    choice = {"variant": c.variant, "key": c.key, "chosen": value, "seeds": seeds, "candidates": entries}
    if c.key != PROPAGATION:
      choice["edge"] = grid_edge(value[c.key], [e["values"][c.key] for e in entries])
    out.append(choice)
  return {"config": config_path, "complete": complete, "choices": out}


def grid_edge(chosen, values: Sequence) -> str | None:
  """``"smallest"`` or ``"largest"`` when a numeric ``chosen`` is the smallest or largest of the (at least 3)
  ``values`` tried: the best value may then lie outside them. None otherwise (or for non-numeric values)."""
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  if not numeric or len(values) < 3:
    return None
  return "smallest" if chosen == min(values) else "largest" if chosen == max(values) else None


def markdown(tuning: dict, source: str) -> str:
  """``tuning.md``: per choice, the evidence (a table of the candidates) and the value; then what the config says."""
  lines = [
      "# Choices of the tune stage",
      "",
      f"From `{source}` (scored on the tune split), by the rule of `dilaff_jax/research/tuning.py`: the highest mean "
      "mIoU over the seeds every candidate finished (ties: the one listed first). mIoU in %.",
      "",
  ]
  if not tuning["complete"]:
    lines += ["**Provisional**: some declared runs are not finished; the test stage does not start from this.", ""]
  for c in tuning["choices"]:
    name = c["variant"] or study.DEFAULT_VARIANT
    seeds = c["seeds"]
    lines += [f"## `{name}`: {c['key']}", ""]
    if c["chosen"] is None:
      lines += ["Not chosen yet: no seed is finished by every candidate.", ""]
      continue
    lines += [f"Seeds {', '.join(map(str, seeds))}.", ""]
    if c["key"] == PROPAGATION:
      lines += _sweep_table(c["candidates"])
    else:
      lines += _weight_table(c["candidates"], seeds)
    chosen = ", ".join(f"`{k} = {v!r}`" for k, v in c["chosen"].items())
    edge = c.get("edge")
    beyond = {"smallest": "below", "largest": "above"}.get(edge)
    note = f", the {edge} value tried: the best may lie {beyond} the values tried" if edge else ""
    lines += ["", f"Chosen: {chosen}{note}.", ""]
  lines += [f"## In `{tuning['config']}`", ""]
  for c in tuning["choices"]:
    for k, v in (c["chosen"] or {}).items():
      lines += [f"- `{c['variant'] or study.DEFAULT_VARIANT}`: `{k} = {v!r}`"]
  return "\n".join(lines) + "\n"


def _bold(text: str, chosen: bool) -> str:
  return f"**{text}**" if chosen else text


def _weight_table(candidates: Sequence[dict], seeds: Sequence[int]) -> list[str]:
  """One line per candidate row: its value, its score per seed and their mean (the chosen one in bold)."""
  (key,) = candidates[0]["values"]
  lines = [f"| row | `{key}` | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"]
  lines += ["| --- " * (3 + len(seeds)) + "|"]
  for e in candidates:
    cells = [e["row"], str(e["values"][key]), *(f"{100 * v:.2f}" for v in e["scores"])]
    mean = _bold(f"{100 * e['mean']:.2f}", e.get("chosen", False))
    lines += ["| " + " | ".join(cells) + f" | {mean} |"]
  return lines


def _sweep_table(candidates: Sequence[dict]) -> list[str]:
  """One line per candidate row (its reading and λ), one column per iteration count: the mean over the seeds."""
  counts = sorted({e["values"]["affinity.iterations"] for e in candidates})
  rows = list(dict.fromkeys(e["row"] for e in candidates))
  lines = ["| row | reading | λ | " + " | ".join(f"{n} it." for n in counts) + " |"]
  lines += ["| --- " * (3 + len(counts)) + "|"]
  for name in rows:
    cells = {e["values"]["affinity.iterations"]: e for e in candidates if e["row"] == name}
    first = next(iter(cells.values()))["values"]
    means = [_bold(f"{100 * cells[n]['mean']:.2f}", cells[n].get("chosen", False)) for n in counts]
    lines += [f"| {name} | {first['affinity.propagation_reading']} | {first['affinity.lam']} | " + " | ".join(means)]
    lines[-1] += " |"
  return lines


def plot(tuning: dict, path: str) -> list[str]:
  """``tuning.png``: one panel per made choice: the score against the weight (mean as a line, seeds as dots), or
  for propagation the mean sweep of every candidate row; the choice starred. Returns the panels' titles."""
  from dilaff_jax.engine import visualize  # pylint: disable=import-outside-toplevel  # jax: only to draw

  plt = visualize.pyplot()
  made = [c for c in tuning["choices"] if c["chosen"] is not None]
  if not made:
    return []
  cols = min(4, len(made))
  rows = -(-len(made) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows + 0.4), dpi=110, squeeze=False)
  for ax in axes.flat[len(made) :]:
    ax.set_visible(False)
  titles = []
  for ax, c in zip(axes.flat, made):
    titles.append(f"{c['variant'] or study.DEFAULT_VARIANT}: {c['key']}")
    if c["key"] == PROPAGATION:
      for name in dict.fromkeys(e["row"] for e in c["candidates"]):
        line = sorted((e["values"]["affinity.iterations"], e) for e in c["candidates"] if e["row"] == name)
        first = line[0][1]["values"]
        label = f"{first['affinity.propagation_reading']}, λ {first['affinity.lam']:g}"
        ax.plot([n for n, _ in line], [100 * e["mean"] for _, e in line], marker="o", ms=3, label=label)
      ax.set_xlabel("iterations", fontsize=8)
      ax.legend(fontsize=6)
    else:
      xs = [e["values"][c["key"]] for e in c["candidates"]]
      ax.plot(xs, [100 * e["mean"] for e in c["candidates"]], marker="o", ms=3)
      for x, e in zip(xs, c["candidates"]):
        ax.plot([x] * len(e["scores"]), [100 * v for v in e["scores"]], "k.", ms=3)
      ax.set_xscale("log")
      ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the values tried, not the log axis's own (crowded) labels
      ax.xaxis.set_minor_formatter(plt.NullFormatter())
      ax.set_xlabel(c["key"], fontsize=8)
    best = next(e for e in c["candidates"] if e.get("chosen"))
    bx = best["values"]["affinity.iterations"] if c["key"] == PROPAGATION else best["values"][c["key"]]
    ax.plot([bx], [100 * best["mean"]], "r*", ms=12)
    ax.set_title(titles[-1], fontsize=9)
    ax.set_ylabel("mIoU on tune (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.suptitle(
      "Tune stage: " + ("" if tuning["complete"] else "PROVISIONAL, ") + "the chosen value starred", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return titles


def check(tuning: dict, path: str) -> None:
  """Raises :class:`TuningError` naming every chosen value the config (each choice's variant) does not have."""
  if not tuning.get("complete"):
    raise TuningError(f"{path} is provisional (the tune stage had unfinished runs): finish it and choose again")
  wrong = []
  for c in tuning["choices"]:
    config = study.load_config(tuning["config"], c["variant"], [])
    for key, value in c["chosen"].items():
      has = json.loads(json.dumps(_value(config, key)))  # as tuning.json holds it (a tuple as a list)
      if has != value:
        wrong.append(f"{c['variant'] or study.DEFAULT_VARIANT}: {key} is {has!r}, tune chose {value!r}")
  if wrong:
    raise TuningError(f"{tuning['config']} does not run what {path} chose ({'; '.join(wrong)}): write the choices in")


def _define(fv) -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "The tune stage's study folder (or its export).", flag_values=fv)
  flags.DEFINE_string("choices", None, "What to choose, from which rows (see the module doc).", flag_values=fv)
  flags.DEFINE_string("output", None, "Writes OUTPUT.md, OUTPUT.json and OUTPUT.png.", flag_values=fv)
  flags.DEFINE_bool("allow_unfinished", False, "A provisional choice from the finished seeds.", flag_values=fv)
  flags.DEFINE_string("check", None, "A tuning.json to check the config against (nothing else runs).", flag_values=fv)


def main(argv: Sequence[str]) -> int:
  try:
    fv = cli.parse_flags(_define, argv, "dilaff_jax.research.tuning", __doc__)
    if fv is None:
      return 0
    if fv.check:
      if not os.path.exists(fv.check):
        raise TuningError(f"--check={fv.check} does not exist: run the tune stage and choose first (STAGE=choose)")
      try:
        with open(fv.check) as f:
          chosen = json.load(f)
        check(chosen, fv.check)
      except errors.UserError:
        raise  # check's own verdict
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TuningError(
            f"--check={fv.check} is not a readable tuning.json ({cli.one_line(e)}): choose again (STAGE=choose)"
        ) from None
      print(f"[tuning] the config runs what {fv.check} chose", flush=True)
      return 0
    for name in ("workdir", "choices", "output"):
      if not getattr(fv, name):
        raise TuningError(f"--{name} is required (or --check=tuning.json)")
    config_path, overrides, rows, _, _ = study.rows_from_study_json(
        fv.workdir, "give the tune stage's study folder or its export (STAGE=tune of launch/study.sh)"
    )
    choices = parse_choices(fv.choices, rows)
    results = study.load_results(fv.workdir, rows)
    recorded = recorded_configs(fv.workdir, rows)
    tuning = choose(choices, rows, results, config_path, overrides, fv.allow_unfinished, recorded)
    files.write_atomic(fv.output + ".json", json.dumps(tuning, indent=1) + "\n")
    files.write_atomic(fv.output + ".md", markdown(tuning, os.path.basename(os.path.normpath(fv.workdir))))
    plot(tuning, fv.output + ".png")
  except errors.UserError as e:
    cli.exit_with_error(e)
  for c in tuning["choices"]:
    print(f"[tuning] {c['variant'] or study.DEFAULT_VARIANT}: {c['chosen']}", flush=True)
  print(f"[tuning] {'' if tuning['complete'] else 'PROVISIONAL: '}{fv.output}.md, .json, .png", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
