r"""A study over seeds: trains and evaluates every (row, seed) in its own process, resumes where it stopped, and
aggregates the mIoU over seeds into ``<workdir>/study.json``, ``study.md`` and ``study.png``.

  python -m dilaff_jax.research.study --config=configs/synthetic.py --variants=baseline,default --seeds=0,1,2 --workdir=DIR
  python -m dilaff_jax.research.study --config=configs/synthetic.py --seeds=0,1,2 --workdir=DIR --baseline_row=plain \
      --rows='plain=baseline#0,1,2,3,4; plain+crf=evaluate:plain@eval.crf=True; affinity=default'
  python -m dilaff_jax.research.study --workdir=DIR --aggregate_only                     # rows from DIR/study.json
  python -m dilaff_jax.research.study --workdir=DIR --aggregate_only --export=DIR2      # copy the small files only

Rows. ``--variants=a,b`` makes one row per config variant, named after it (``default`` is the config without a
variant). ``--rows`` adds rows separated by ``;`` or newlines, each ``NAME=SOURCE[@KEY=VALUE]...[#SEEDS]``:
  SOURCE      a config variant (``default``: none) to train; or ``evaluate:ROW`` to evaluate the final checkpoint of
              an earlier row's run of the same seed again, with this row's overrides (e.g. ``eval.crf=True``)
  @KEY=VALUE  config overrides of this row (``--config.KEY=VALUE`` of ``dilaff_jax.main``)
  #SEEDS      this row's seeds instead of ``--seeds`` (e.g. more seeds for the pair that matters most)
Other ``--config.KEY=VALUE`` arguments apply to every run (e.g. ``--config.dataset.data_dir=...``).

Runs. Run ``(row, seed)`` is ``python -m dilaff_jax.main --config=CONFIG:VARIANT --config.seed=SEED ...`` in
``DIR/<row>/seed_<seed>/`` (log: ``log.txt`` there), seed by seed (so every row has its first seeds early; a row
that evaluates another follows it at once; ``--first=ROW,...`` runs those rows' seeds before all others), one at a
time on every core, or ``--jobs=N`` at a time, each pinned to
its own ``cores // N`` cores (Linux; an ``evaluate:`` row waits for its source run). Several single-core runs get
more done than one run on all cores (XLA:CPU does not scale linearly: ``benchmarks/study_jobs.py``), but a run's
last bits depend on how many cores it computes with (XLA's sums are split by thread), so a study is reproduced bit
for bit with the same ``cores // N`` on the same kind of CPU (``dilaff_jax.process.machine``); ``run.json`` records
them as ``cores`` and ``machines`` (each kind a run computed on; a run resumed on another kind is reported), and
as ``seconds`` the time the run has computed (summed over the invocations it was resumed in; one killed outright,
with SIGKILL, cannot add its part): the ETA printed before every run starts from the finished runs' seconds on the
same core count, so a resumed study has one at once. A run is finished when
``eval/step_<num_steps>/results.json`` exists in its folder; finished runs are skipped and unfinished ones resume
from their checkpoints. A study resumes from its export too (copy it as ``DIR``): a run that an ``evaluate:`` row
needs and whose checkpoints are gone is trained again first (on the same kind of machine it gives the recorded
mIoU to the last digit; on another it does not: the difference is reported, the new results replace the old and
the old stay beside them as ``results.first.json``, exported too). An ``evaluate:`` row writes there too (through
``eval.output_dir``) and keeps no checkpoints; one whose overrides leave its source's config as it was (e.g.
``affinity.propagation_reading=paper`` on a config that reads Eq. 6 that way already) runs nothing: the source's
own final evaluation is that row's, copied into its folder once the source has finished, and ``run.json`` names
where it came from (evaluation is deterministic). A failed run is reported (with the tail of its log) and the
study goes on; the exit status is then 1. SIGTERM stops the running runs (each saves a checkpoint) and the study
(exit 3). The aggregate is rewritten after every run, so a
partial study always has an up-to-date ``study.md``.

Aggregates (per row, over the seeds that finished): mIoU without post-processing, with propagation
(``affinity.iterations``) and with the dense CRF when evaluated: mean ± sample standard deviation (ddof=1), min–max
and n; the propagation sweeps (predicted and ground-truth affinity) as mean ± std per iteration count; and the
paired difference to ``--baseline_row``'s mIoU seed by seed (mean ± std, how many seeds improved, and the paired
t-test: t and its two-sided p, for two or more seeds that do not all differ by the same amount). ``--compare=A:B,...``
adds the same paired statistics of row A against row B for every metric of A: against B's mIoU with dense CRF where
B has one (``--compare=affinity:plain+crf``: A's mIoU, and with propagation, against the CRF's), else against B's
same metric where B has it, else against B's mIoU without post-processing (as against the baseline).

What to keep (commit): ``study.{json,md,png}`` and, per run, ``config.json``, ``run.json`` and
``eval/step_<N>/results.{json,md}``; ``--export=DIR2`` copies exactly those with the same layout (so
``--aggregate_only --workdir=DIR2`` works on the copy). Checkpoints, logs and summaries stay in ``DIR``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from dilaff_jax import errors
from dilaff_jax.process import cli, files, machine, workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file of every run, e.g. configs/synthetic.py (no variant).")
flags.DEFINE_list("variants", [], "Config variants, one row each, named after them; 'default' = no variant.")
flags.DEFINE_string(
    "rows", "", "Rows 'NAME=SOURCE[@KEY=VALUE]...[#SEEDS]' separated by ';' or newlines (see the " "module doc)."
)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every row (unless the row gives its own).")
flags.DEFINE_string("workdir", None, "Study folder: one subfolder per row and seed, and the aggregates.")
flags.DEFINE_string(
    "baseline_row",
    None,
    "Row the paired differences are taken against (default: 'baseline' if a " "row has that name, else the first row).",
)
flags.DEFINE_list(
    "compare", [], "Paired comparisons 'A:B' of two rows (A minus B, seed by seed), besides the one to the baseline."
)
flags.DEFINE_bool("aggregate_only", False, "Only aggregate the finished runs (rows from the flags or study.json).")
flags.DEFINE_integer(
    "jobs", 1, "Runs at once, each pinned to cores // jobs of this process's cores (Linux); 1: one run on every core."
)
flags.DEFINE_list(
    "first", [], "Rows run before all others (all their seeds, with the rows evaluating them), e.g. the headline rows."
)
flags.DEFINE_string("export", None, "Copy the small outputs (aggregates, per-run results and configs) to this folder.")
flags.mark_flags_as_required(["workdir"])

DEFAULT_VARIANT = "default"
EVALUATE_PREFIX = "evaluate:"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
METRICS = (("miou", "mIoU"), ("miou_propagated", "mIoU with propagation"), ("miou_crf", "mIoU with dense CRF"))
LOG_TAIL_LINES = 25
STUDY_LOCK = ".study.lock"


class StudyError(errors.UserError):
  """A mistake in the study's flags or folder."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the study: a config variant trained with ``overrides`` (``evaluates`` empty), or the evaluation of
  row ``evaluates``'s runs with ``overrides`` added to that row's. ``final_step``: ``train.num_steps`` of its runs;
  ``same_config``: an evaluate row whose config is its source's (its runs reuse the source's evaluation)."""

  name: str
  variant: str = ""
  overrides: tuple[str, ...] = ()
  seeds: tuple[int, ...] = ()
  evaluates: str = ""
  final_step: int = 0
  same_config: bool = False


# ----------------------------------------------------------------------------------------------- the study's rows


def _seeds(text: Sequence[str] | str, where: str) -> tuple[int, ...]:
  items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
  try:
    seeds = tuple(int(s) for s in items)
  except ValueError:
    raise StudyError(f"{where}: seeds {','.join(items)!r} must be integers, e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise StudyError(f"{where}: give distinct seeds, e.g. 0,1,2 (got {','.join(items)!r})")
  return seeds


def parse_rows(variants: Sequence[str], rows: str, seeds: Sequence[int]) -> list[Row]:
  """Rows of ``--variants`` then ``--rows`` (grammar in the module doc), without their ``final_step``."""
  out = [Row(name=v, variant="" if v == DEFAULT_VARIANT else v, seeds=tuple(seeds)) for v in variants]
  for text in re.split(r"[;\n]", rows):
    text = text.strip()
    if not text:
      continue
    if "=" not in text:
      raise StudyError(f"--rows: {text!r} is not NAME=SOURCE[@KEY=VALUE]...[#SEEDS]")
    name, rest = (s.strip() for s in text.split("=", 1))
    row_seeds = tuple(seeds)
    if "#" in rest:
      rest, seed_text = rest.rsplit("#", 1)
      row_seeds = _seeds(seed_text, f"--rows row {name!r}")
    source, *overrides = (s.strip() for s in rest.split("@"))
    for o in overrides:
      if "=" not in o:
        raise StudyError(f"--rows row {name!r}: override {o!r} is not KEY=VALUE (e.g. eval.crf=True)")
    if source.startswith(EVALUATE_PREFIX):
      out.append(Row(name=name, overrides=tuple(overrides), seeds=row_seeds, evaluates=source[len(EVALUATE_PREFIX) :]))
    else:
      out.append(
          Row(
              name=name,
              variant="" if source == DEFAULT_VARIANT else source,
              overrides=tuple(overrides),
              seeds=row_seeds,
          )
      )
  names = set()
  for row in out:
    if not NAME_PATTERN.match(row.name):
      raise StudyError(f"row name {row.name!r}: use letters, digits and _ . + - only (it names a folder)")
    if row.name in names:
      raise StudyError(f"row name {row.name!r} is given twice: rename one (--rows NAME=...)")
    if row.evaluates and row.evaluates not in names:
      raise StudyError(f"row {row.name!r} evaluates {row.evaluates!r}, which is not an earlier row")
    if row.evaluates and next(r for r in out if r.name == row.evaluates).evaluates:
      raise StudyError(f"row {row.name!r} evaluates {row.evaluates!r}, itself an evaluate: row; name a trained row")
    names.add(row.name)
  if not out:
    raise StudyError("no rows: give --variants=a,b,... and/or --rows=...")
  return out


def load_config(config_path: str, variant: str, overrides: Sequence[str]):
  """The config exactly as ``dilaff_jax.main`` will parse it from the same flags."""
  from ml_collections import config_flags

  argv = [
      "study",
      f"--config={config_path}" + (f":{variant}" if variant else ""),
      *(f"--config.{o}" for o in overrides),
  ]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, FileNotFoundError, ImportError) as e:
    named = cli.flag_error(e, argv[1:])  # a --config.KEY that names no key: the nearest key, as the main job says
    if "no such key" in str(named):
      raise StudyError(f"{' '.join(argv[1:])}: {named}") from None
    if isinstance(e, KeyError):
      e = ValueError(f"no config key {e} (see configs/default.py)")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[-1] if lines else type(e).__name__  # a config file's exception: its last line, not the traceback
    raise StudyError(f"{' '.join(argv[1:])}: {message}") from None


def _check_config(row: Row, config) -> None:
  """The main job's start-up checks of ``row``'s config, as a :class:`StudyError` naming the row (the device count
  is each run's own: checked when it starts)."""
  from dilaff_jax.engine import config_checks  # noqa: PLC0415 (imports JAX, which --aggregate_only does without)

  try:
    config_checks.validate(config, num_devices=1, mode="evaluate" if row.evaluates else "train")
  except config_checks.ConfigError as e:
    raise StudyError(f"row {row.name!r}: {e}") from None


def source_row(row: Row, rows: Sequence[Row]) -> Row:
  """The trained row whose checkpoints ``row`` evaluates (``row`` itself when it trains)."""
  return next(r for r in rows if r.name == row.evaluates) if row.evaluates else row


def run_overrides(row: Row, rows: Sequence[Row], overrides: Sequence[str]) -> list[str]:
  """The config overrides of ``row``'s runs: the study's, then (for an evaluate row) its source's, then its own."""
  return [*overrides, *(source_row(row, rows).overrides if row.evaluates else ()), *row.overrides]


def resolve(rows: Sequence[Row], config_path: str, overrides: Sequence[str], check: bool = True) -> list[Row]:
  """Rows with ``final_step`` from their configs and ``same_config`` for an evaluate row whose config equals its
  source's; checks every config loads and (``check``: the study will run them) passes the main job's start-up checks
  (values, files, optional packages such as the dense CRF's) before anything runs, so that no row fails hours into a
  study for a reason known at its start."""
  out = []
  configs = {}  # trained row -> its config as a dict
  for row in rows:
    src = source_row(row, out)
    config = load_config(config_path, src.variant, run_overrides(row, out, overrides))
    if check:
      _check_config(row, config)
    same = bool(row.evaluates) and config.to_dict() == configs[src.name]
    if not row.evaluates:
      configs[row.name] = config.to_dict()
    out.append(dataclasses.replace(row, final_step=int(config.train.num_steps), same_config=same))
  return out


# ----------------------------------------------------------------------------------------------- running


def run_dir(workdir: str, row: Row, seed: int) -> str:
  return os.path.join(workdir, row.name, f"seed_{seed}")


def results_path(workdir: str, row: Row, seed: int) -> str:
  return os.path.join(run_dir(workdir, row, seed), "eval", f"step_{row.final_step}", "results.json")


# A run trained again (its checkpoints lost) whose mIoU came out other than recorded: its first results, kept.
FIRST_RESULTS = "results.first.json"


def first_results_path(workdir: str, row: Row, seed: int) -> str:
  return os.path.join(os.path.dirname(results_path(workdir, row, seed)), FIRST_RESULTS)


def command(
    config_path: str, overrides: Sequence[str], rows: Sequence[Row], row: Row, seed: int, workdir: str
) -> list[str]:
  """The ``dilaff_jax.main`` command line of run ``(row, seed)``."""
  src = source_row(row, rows)
  cmd = [
      sys.executable,
      "-m",
      "dilaff_jax.main",
      f"--config={config_path}" + (f":{src.variant}" if src.variant else ""),
      f"--config.seed={seed}",
      *(f"--config.{o}" for o in run_overrides(row, rows, overrides)),
  ]
  if row.evaluates:
    return cmd + [
        f"--config.eval.output_dir={os.path.abspath(os.path.join(run_dir(workdir, row, seed), 'eval'))}",
        "--mode=evaluate",
        f"--step={row.final_step}",
        f"--workdir={os.path.abspath(run_dir(workdir, src, seed))}",
    ]
  return cmd + [f"--workdir={os.path.abspath(run_dir(workdir, row, seed))}"]


def plan(rows: Sequence[Row], first: Sequence[str] = ()) -> list[tuple[Row, int]]:
  """Every (row, seed), seed by seed in increasing order; within a seed the trained rows in their order, each
  followed at once by the rows that evaluate it (so its checkpoints are used while they are on this disk). The rows
  named in ``first`` (with the rows that evaluate them) are planned like that before all the others, e.g. the
  headline rows of a study before its ablations."""
  unknown = [n for n in first if n not in {r.name for r in rows}]
  if unknown:
    raise StudyError(f"--first: {', '.join(unknown)} not a row of the study ({', '.join(r.name for r in rows)})")
  evaluated = [r.name for r in rows if r.evaluates and r.name in first]
  if evaluated:
    raise StudyError(f"--first: {', '.join(evaluated)} evaluate another row: name the row they evaluate instead")

  def seed_major(part: Sequence[Row]) -> list[tuple[Row, int]]:
    seeds = sorted({s for row in part for s in row.seeds})
    ordered = []
    for row in part:
      if not row.evaluates:
        ordered += [row, *(r for r in part if r.evaluates == row.name)]
    return [(row, s) for s in seeds for row in ordered if s in row.seeds]

  early = [r for r in rows if r.name in first or r.evaluates in first]
  return seed_major(early) + seed_major([r for r in rows if r not in early])


def has_final_checkpoint(workdir: str, row: Row, seed: int) -> bool:
  """Whether run ``(row, seed)`` still holds its final checkpoint (Orbax names a finished one by its step)."""
  return os.path.isdir(os.path.join(run_dir(workdir, row, seed), "checkpoints", str(row.final_step)))


def reuse_evaluation(workdir: str, row: Row, src: Row, seed: int) -> None:
  """Run ``(row, seed)`` of a ``same_config`` row: the finished source run's ``results.json`` (and ``results.md``)
  copied into the row's folder, with a ``run.json`` that names it (no command: nothing ran)."""
  source_step = os.path.dirname(results_path(workdir, src, seed))
  _read_results(os.path.join(source_step, "results.json"))  # a damaged one is named, not copied
  step = os.path.dirname(results_path(workdir, row, seed))
  os.makedirs(step, exist_ok=True)
  run = {
      "row": dataclasses.asdict(row),
      "seed": seed,
      "command": None,
      "evaluation_of": os.path.relpath(source_step, workdir),
      "why": f"its config is {src.name}'s: that run's final evaluation, not run again",
  }
  files.write_atomic(os.path.join(run_dir(workdir, row, seed), "run.json"), json.dumps(run, indent=1))
  if os.path.exists(os.path.join(source_step, "results.md")):
    shutil.copyfile(os.path.join(source_step, "results.md"), os.path.join(step, "results.md"))
  with open(os.path.join(source_step, "results.json")) as f:
    text = f.read()
  files.write_atomic(os.path.join(step, "results.json"), text)  # last: it marks the run finished


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return "(no log)\n"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def eta_seconds(durations: dict[str, list[float]], remaining: Sequence[str]) -> float | None:
  """Expected seconds of the ``remaining`` runs' kinds (``train``/``evaluate``) from the mean duration of the runs of
  that kind done so far (of the other kind when none of it ran yet); None before any run finished."""
  every = [d for ds in durations.values() for d in ds]
  if not every:
    return None
  mean_all = sum(every) / len(every)
  means = {k: sum(ds) / len(ds) for k, ds in durations.items() if ds}
  return sum(means.get(kind, mean_all) for kind in remaining)


def allowed_cores() -> tuple[int, ...] | None:
  """The cores this process may run on (Linux), None where the system cannot tell or pin (macOS)."""
  return tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else None


def slot_cores(allowed: Sequence[int], jobs: int) -> list[tuple[int, ...]]:
  """The cores of each of ``jobs`` runs at once: ``len(allowed) // jobs`` each, in order. Cores left over stay
  unused, so that every run computes with the same number of threads (XLA:CPU's sums, hence a run's last bits,
  depend on it: a run is reproduced bit for bit with the same number of cores)."""
  if jobs < 1:
    raise StudyError(f"--jobs={jobs}: expected a positive number of runs at once")
  if jobs > len(allowed):
    raise StudyError(f"--jobs={jobs}: this process may use {len(allowed)} core(s); give at most that many jobs")
  cores, per = sorted(allowed), len(allowed) // jobs
  return [tuple(cores[k * per : (k + 1) * per]) for k in range(jobs)]


def study_slots(jobs: int) -> list[tuple[int, ...] | None]:
  """The cores of each run slot of ``--jobs=jobs``: one slot of every allowed core (None where unknown) for 1."""
  if jobs < 1:
    raise StudyError(f"--jobs={jobs}: expected a positive number of runs at once")
  allowed = allowed_cores()
  if jobs == 1:
    return [allowed]
  if allowed is None:
    raise StudyError(f"--jobs={jobs}: this system cannot pin a process to cores (no sched_setaffinity); use --jobs=1")
  return slot_cores(allowed, jobs)


def _cores_text(cores: Sequence[int]) -> str:
  if len(cores) == 1:
    return f"core {cores[0]}"
  if list(cores) == list(range(cores[0], cores[-1] + 1)):
    return f"cores {cores[0]}-{cores[-1]}"
  return "cores " + ",".join(str(c) for c in cores)


class _Stop:
  """SIGTERM/SIGINT: forwards SIGTERM to the running ``dilaff_jax.main`` processes (which checkpoint and exit) and
  asks the study to start nothing more."""

  def __init__(self):
    self.requested = False
    self.processes = set()
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(f"[study] signal {signum}: stopping after the running run(s) save their checkpoints", flush=True)
    for process in list(self.processes):
      if process.poll() is None:
        process.send_signal(signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Job:
  """A running ``dilaff_jax.main``: run ``(row, seed)`` of kind ``train``, ``evaluate`` or ``train again`` (a
  finished run whose checkpoints an ``evaluate:`` row needs; ``before``: its recorded results)."""

  row: Row
  seed: int
  kind: str
  process: subprocess.Popen
  log: object
  start: float
  before: dict | None = None


def _recorded_machines(run: dict) -> list[dict]:
  """A run.json's ``machines`` (the kinds it computed on), its damaged entries left out; none when absent."""
  recorded = run.get("machines")
  return [m for m in recorded if isinstance(m, dict)] if isinstance(recorded, list) else []


def _start(
    config_path: str,
    overrides: Sequence[str],
    rows: Sequence[Row],
    row: Row,
    seed: int,
    workdir: str,
    cores: Sequence[int] | None,
    pin: bool,
) -> tuple[subprocess.Popen, object]:
  """Starts ``(row, seed)``'s command in its folder (``run.json``; output appended to ``log.txt``), pinned to
  ``cores`` when ``pin``; the process and its open log."""
  folder = run_dir(workdir, row, seed)
  os.makedirs(folder, exist_ok=True)
  cmd = command(config_path, overrides, rows, row, seed, workdir)
  n_cores = len(cores) if cores is not None else os.cpu_count()
  run = {"row": dataclasses.asdict(row), "seed": seed, "command": cmd[1:], "cores": n_cores}
  before = _run_json(folder)  # a run resumed from its checkpoints: the seconds it computed before
  if before.get("cores") == n_cores and isinstance(before.get("seconds"), (int, float)):
    run["seconds"] = before["seconds"]
  here = machine.describe()
  machines = _recorded_machines(before)
  moved = machine.difference(machines[-1], here) if machines else ""
  if moved:
    print(
        f"[study] {row.name} seed {seed}: computed before on another kind of machine ({moved}); its last bits, "
        "and its mIoU, will differ from a run made on one",
        flush=True,
    )
  run["machines"] = machines + ([here] if here not in machines else [])
  files.write_atomic(os.path.join(folder, "run.json"), json.dumps(run, indent=1))
  log = open(os.path.join(folder, "log.txt"), "a")
  log.write(f"\n[study] {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
  log.flush()
  pin_to = tuple(cores) if pin and cores is not None else None
  # The study runs no threads of its own, so a function between fork and exec is safe here.
  preexec = (lambda: os.sched_setaffinity(0, pin_to)) if pin_to else None
  try:
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec)
  except BaseException:
    log.close()
    raise
  return process, log


def _run_json(folder: str) -> dict:
  """A run folder's ``run.json`` ({} when missing or unreadable: it is only rewritten, never trusted for results)."""
  try:
    with open(os.path.join(folder, "run.json")) as f:
      run = json.load(f)
  except (OSError, ValueError):
    return {}
  return run if isinstance(run, dict) else {}


def add_seconds(folder: str, seconds: float) -> float:
  """Adds ``seconds`` to the computing time recorded in the run folder's ``run.json``; returns the new total."""
  run = _run_json(folder)
  if not run:
    return seconds
  run["seconds"] = round(float(run.get("seconds") or 0.0) + seconds, 1)
  files.write_atomic(os.path.join(folder, "run.json"), json.dumps(run, indent=1))
  return run["seconds"]


def recorded_durations(workdir: str, todo: Sequence[tuple[Row, int]], cores: int) -> dict[str, list[float]]:
  """The computing times (``seconds`` of run.json) of the finished runs among ``todo`` that ran on ``cores`` cores,
  by kind: what a resumed study's ETA starts from."""
  durations: dict[str, list[float]] = {"train": [], "evaluate": []}
  for row, seed in todo:
    run = _run_json(run_dir(workdir, row, seed))
    if row.same_config or run.get("cores") != cores or not os.path.exists(results_path(workdir, row, seed)):
      continue
    if isinstance(run.get("seconds"), (int, float)) and run["seconds"] > 0:
      durations["evaluate" if row.evaluates else "train"].append(float(run["seconds"]))
  return durations


def _wait_any(running: dict[int, _Job]) -> int:
  """The slot of a job that has ended (blocking; one job: its own wait, several: polled twice a second)."""
  if len(running) == 1:
    slot, job = next(iter(running.items()))
    job.process.wait()
    return slot
  while True:
    for slot, job in running.items():
      if job.process.poll() is not None:
        return slot
    time.sleep(0.5)


def run_study(
    config_path: str,
    overrides: Sequence[str],
    rows: Sequence[Row],
    workdir: str,
    baseline: str,
    comparisons: Sequence[tuple[str, str]] = (),
    jobs: int = 1,
    first: Sequence[str] = (),
) -> int:
  """Runs every unfinished (row, seed) in plan order (:func:`plan`, ``first`` rows first), ``jobs`` at a time
  (more than one: each pinned to its own equal share of the cores; an ``evaluate:`` row waits for its source run),
  aggregating after each; returns the exit status (0: all finished, 1: some failed, 3: stopped by a signal)."""
  slots = study_slots(jobs)
  todo = plan(rows, first)
  os.makedirs(workdir, exist_ok=True)
  lock = contextlib.ExitStack()  # two studies in one folder would train the same run twice
  lock.enter_context(workdir_lock.hold(workdir, name=STUDY_LOCK, holder="study"))
  pending = list(range(len(todo)))  # indices into todo, not started yet
  running: dict[int, _Job] = {}  # slot -> job
  busy: set[tuple[str, int]] = set()  # (row, seed) of the running jobs
  retrain_failed: set[tuple[str, int]] = set()
  n_cores = len(slots[0]) if slots[0] is not None else os.cpu_count()
  durations = recorded_durations(workdir, todo, n_cores)  # the finished runs' times, for the ETA
  failed = []

  def head(i: int) -> str:
    return f"[study] run {i + 1}/{len(todo)}: {todo[i][0].name} seed {todo[i][1]}"

  def next_ready() -> tuple[int, str] | None:
    """The first pending run that can start now and its kind; reports (and drops) finished and failed ones."""
    for i in list(pending):
      row, seed = todo[i]
      if os.path.exists(results_path(workdir, row, seed)):
        print(f"{head(i)}: finished, skipped", flush=True)
        pending.remove(i)
        continue
      if not row.evaluates:
        return i, "train"
      src = source_row(row, rows)
      if (src.name, seed) in busy:  # its source is still running: later
        continue
      if (src.name, seed) in retrain_failed or not os.path.exists(results_path(workdir, src, seed)):
        print(f"{head(i)}: FAILED, run {src.name} seed {seed} (its checkpoints) did not finish", flush=True)
        failed.append((row.name, seed))
        pending.remove(i)
        continue
      if row.same_config:  # nothing to run: the source's final evaluation is this row's
        reuse_evaluation(workdir, row, src, seed)
        print(f"{head(i)}: the same config as {src.name}: its evaluation taken, nothing run", flush=True)
        pending.remove(i)
        write_aggregates(workdir, config_path, overrides, rows, baseline, comparisons)
        continue
      if not has_final_checkpoint(workdir, src, seed):
        return i, "train again"
      return i, "evaluate"
    return None

  def start(i: int, kind: str, slot: int) -> None:
    row, seed = todo[i]
    before = None
    if kind == "train again":  # the source first; row i stays pending until it has its checkpoint
      row = source_row(row, rows)
      path = results_path(workdir, row, seed)
      before = _read_results(path)
      print(
          f"[study] {row.name} seed {seed}: its final checkpoint is gone (a study resumed from an export keeps "
          "none); training it again" + (f" on {_cores_text(slots[slot])}" if len(slots) > 1 else ""),
          flush=True,
      )
      os.rename(path, path + ".before_training_again")
    else:
      pending.remove(i)
      remaining = [kind] + [
          "evaluate" if todo[j][0].evaluates else "train"
          for j in pending
          if j > i and not todo[j][0].same_config and not os.path.exists(results_path(workdir, *todo[j]))
      ]
      eta = eta_seconds(durations, remaining)
      print(
          f"{head(i)} ({kind})"
          + (f" on {_cores_text(slots[slot])}" if len(slots) > 1 else "")
          + f", {len(remaining)} left"
          + (f", ETA {_duration(eta / len(slots))}" if eta is not None else ", ETA after the first run"),
          flush=True,
      )
    process, log = _start(config_path, overrides, rows, row, seed, workdir, slots[slot], pin=len(slots) > 1)
    running[slot] = _Job(row, seed, kind, process, log, time.time(), before)
    busy.add((row.name, seed))
    stop.processes.add(process)

  def train_again_ended(job: _Job, rc: int) -> None:
    """A run trained again: runs are deterministic, so its new mIoU must equal the recorded one; a difference is
    reported, never hidden (the new results replace the old)."""
    path = results_path(workdir, job.row, job.seed)
    if rc != 0 or not os.path.exists(path) or not has_final_checkpoint(workdir, job.row, job.seed):
      os.replace(path + ".before_training_again", path)  # the recorded results stay the run's
      print(
          f"[study] {job.row.name} seed {job.seed}: training it again FAILED (exit {rc}); its recorded results kept",
          flush=True,
      )
      if not stop.requested:
        retrain_failed.add((job.row.name, job.seed))
      return
    with open(path) as f:
      after = json.load(f)
    same = after.get("miou") == job.before.get("miou")
    if same:
      os.remove(path + ".before_training_again")
      print(
          f"[study] {job.row.name} seed {job.seed}: trained again, mIoU {after.get('miou')!r} (the same as recorded)",
          flush=True,
      )
      return
    first = first_results_path(workdir, job.row, job.seed)  # kept and exported: a replaced result stays visible
    os.replace(path + ".before_training_again", first)
    machines = _recorded_machines(_run_json(run_dir(workdir, job.row, job.seed)))
    moved = machine.difference(machines[-2], machines[-1]) if len(machines) > 1 else ""
    why = (
        f"computed first on another kind of machine ({moved})"
        if moved
        else "not deterministic, or computed first on a machine its run.json does not name"
    )
    print(
        f"[study] {job.row.name} seed {job.seed}: trained again, mIoU {after.get('miou')!r} DIFFERS from the "
        f"recorded {job.before.get('miou')!r}: {why}; the new results replace the old, kept as {first}",
        flush=True,
    )

  def ended(job: _Job, rc: int) -> None:
    elapsed = time.time() - job.start
    kind, row, seed = job.kind, job.row, job.seed
    total = add_seconds(run_dir(workdir, row, seed), elapsed)  # a resumed run: its earlier seconds too
    if rc == 0 and os.path.exists(results_path(workdir, row, seed)):
      durations[kind].append(total)
      print(
          f"[study] {row.name} seed {seed}: done in {_duration(elapsed)}"
          + (f" ({_duration(total)} in all)" if total > elapsed + 1 else ""),
          flush=True,
      )
    elif stop.requested:
      print(f"[study] {row.name} seed {seed}: stopped (exit {rc}); rerun the study to resume", flush=True)
    else:
      failed.append((row.name, seed))
      log_path = os.path.join(run_dir(workdir, row, seed), "log.txt")
      print(
          f"[study] {row.name} seed {seed}: FAILED (exit {rc}) after {_duration(elapsed)}; end of {log_path}:\n"
          + _tail(log_path),
          flush=True,
      )
    write_aggregates(workdir, config_path, overrides, rows, baseline, comparisons)

  with lock, _Stop() as stop:
    while True:
      for slot in range(len(slots)):
        if slot in running or stop.requested:
          continue
        ready = next_ready()
        if ready is None:
          break
        start(*ready, slot)
      if not running:
        break
      slot = _wait_any(running)
      job = running.pop(slot)
      rc = job.process.wait()
      job.log.close()
      busy.discard((job.row.name, job.seed))
      stop.processes.discard(job.process)
      if job.kind == "train again":
        train_again_ended(job, rc)
      else:
        ended(job, rc)
  if stop.requested:
    return errors.EXIT_PREEMPTED
  if failed:
    print(f"[study] {len(failed)} run(s) failed: " + ", ".join(f"{n} seed {s}" for n, s in failed), flush=True)
    return 1
  return 0


# ----------------------------------------------------------------------------------------------- aggregation


def summarize(values: dict[int, float]) -> dict:
  """``{n, mean, std, min, max, values}`` of per-seed values; ``std`` is the sample standard deviation (ddof=1),
  None for fewer than two seeds."""
  xs = list(values.values())
  n = len(xs)
  mean = sum(xs) / n if n else None
  std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else None
  return {
      "n": n,
      "mean": mean,
      "std": std,
      "min": min(xs) if n else None,
      "max": max(xs) if n else None,
      "values": {str(k): v for k, v in sorted(values.items())},
  }


def paired(values: dict[int, float], baseline: dict[int, float]) -> dict:
  """The paired difference ``values[s] - baseline[s]`` over the seeds both have: :func:`summarize` of it plus
  ``improved``, the number of seeds where it is > 0; the paired t-test of it (``scipy.stats.ttest_rel``:
  ``t = mean / (std / sqrt(n))`` with n - 1 degrees of freedom, two-sided ``p``; both None for fewer than two seeds
  or a zero std); and the sign test (``sign_p``: the two-sided exact binomial p of ``improved`` among the seeds
  whose difference is not 0, which assumes nothing about the differences' distribution; None for fewer than two
  such seeds)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  seeds = [s for s in values if s in baseline]
  diffs = {s: values[s] - baseline[s] for s in seeds}
  out = summarize(diffs)
  out["improved"] = sum(d > 0 for d in diffs.values())
  out["t"] = out["p"] = None
  if out["n"] >= 2 and out["std"] > 0:
    test = stats.ttest_rel([values[s] for s in seeds], [baseline[s] for s in seeds])
    out["t"], out["p"] = float(test.statistic), float(test.pvalue)
  nonzero = sum(d != 0 for d in diffs.values())
  out["sign_p"] = float(stats.binomtest(out["improved"], nonzero, 0.5).pvalue) if nonzero >= 2 else None
  return out


def parse_comparisons(items: Sequence[str], rows: Sequence[Row]) -> list[tuple[str, str]]:
  """``--compare``'s ``A:B`` items as ``(A, B)``, both rows of the study."""
  names = [r.name for r in rows]
  out = []
  for item in items:
    a, sep, b = item.strip().partition(":")
    if not sep or not a or not b:
      raise StudyError(f"--compare: {item!r} is not A:B (two row names, e.g. affinity:plain)")
    for name in (a, b):
      if name not in names:
        raise StudyError(f"--compare: {name!r} (in {item!r}) is not a row of the study ({', '.join(names)})")
    if a == b:
      raise StudyError(f"--compare: {item!r} compares a row with itself")
    out.append((a, b))
  return out


def _metric(per_seed: dict[int, dict], key: str) -> dict[int, float]:
  """``{seed: value}`` of one metric over the seeds whose results have it."""
  return {s: r[key] for s, r in per_seed.items() if r.get(key) is not None}


def compare(results: dict[str, dict[int, dict]], a: str, b: str) -> dict:
  """Row ``a`` against row ``b``, seed by seed: per metric of ``a``, :func:`paired` against ``b``'s mIoU with dense
  CRF where ``b`` has one (a CRF row stands for its refined result: ``b``'s unrefined mIoU is another row's),
  else against ``b``'s same metric where ``b`` has it, else against ``b``'s mIoU (``against`` names which)."""
  out = {"a": a, "b": b, "metrics": {}}
  b_crf = bool(_metric(results.get(b, {}), "miou_crf"))
  for key, _ in METRICS:
    values = _metric(results.get(a, {}), key)
    if not values:
      continue
    against = "miou_crf" if b_crf else key if _metric(results.get(b, {}), key) else "miou"
    out["metrics"][key] = {**paired(values, _metric(results.get(b, {}), against)), "against": against}
  return out


def _sweep_summary(per_seed: dict[int, dict]) -> dict | None:
  """Mean ± std per iteration count of the seeds' sweeps (those with the first seed's iteration counts)."""
  sweeps = {s: r["sweep"] for s, r in per_seed.items() if r.get("sweep")}
  if not sweeps:
    return None
  iterations = next(iter(sweeps.values()))["iterations"]
  out = {"iterations": iterations}
  for name in ("predicted", "oracle"):
    rows = {s: sw[name] for s, sw in sweeps.items() if sw["iterations"] == iterations and name in sw}
    if rows:
      columns = [summarize({s: v[j] for s, v in rows.items()}) for j in range(len(iterations))]
      out[name] = {"n": len(rows), "mean": [c["mean"] for c in columns], "std": [c["std"] for c in columns]}
  return out


def aggregate(rows: Sequence[Row], results: dict[str, dict[int, dict]], baseline: str) -> dict:
  """Per row: the metrics over its finished seeds, the sweeps and the paired differences to ``baseline``'s mIoU."""
  base = {s: r["miou"] for s, r in results.get(baseline, {}).items()}
  out = {}
  for row in rows:
    per_seed = results.get(row.name, {})
    entry = {"seeds": list(row.seeds), "finished": sorted(per_seed), "metrics": {}, "vs_baseline": {}}
    for key, _ in METRICS:
      values = _metric(per_seed, key)
      if values:
        entry["metrics"][key] = summarize(values)
        if base and not (row.name == baseline and key == "miou"):
          entry["vs_baseline"][key] = paired(values, base)
    finals = {r["final_iterations"] for r in per_seed.values() if "final_iterations" in r}
    if finals:
      entry["final_iterations"] = sorted(finals)[0]
    sweep = _sweep_summary(per_seed)
    if sweep:
      entry["sweep"] = sweep
    out[row.name] = entry
  return out


def load_results(workdir: str, rows: Sequence[Row]) -> dict[str, dict[int, dict]]:
  """``{row: {seed: results.json}}`` of the finished runs."""
  out = {}
  for row in rows:
    for seed in row.seeds:
      path = results_path(workdir, row, seed)
      if os.path.exists(path):
        out.setdefault(row.name, {})[seed] = _read_results(path)
  return out


def _read_results(path: str) -> dict:
  """A run's results.json, or a :class:`StudyError` naming a damaged one and how to make it again."""
  redo = (
      "delete it and rerun the study: the run resumes from its last checkpoint (or trains again) and is evaluated again"
  )
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError) as e:
    raise StudyError(f"{path} cannot be read ({cli.one_line(e)}): {redo}") from None
  if not isinstance(results, dict) or not isinstance(results.get("miou"), (int, float)):
    raise StudyError(f"{path} is not a run's results (no mIoU in it): {redo}")
  return results


def _pct(v: float | None, signed: bool = False) -> str:
  if v is None:
    return "n/a"
  return f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def format_mean_std(s: dict, signed: bool = False) -> str:
  """A summary's (or paired difference's) mean ± std in percent points, e.g. ``+1.50 ± 3.54``."""
  return _pct(s["mean"], signed) + ("" if s["std"] is None else f" ± {100 * s['std']:.2f}")


def format_per_seed(values: dict[str, float], signed: bool = False) -> str:
  """Per-seed values in percent points, e.g. ``0: +4.00, 1: -1.00``."""
  return ", ".join(f"{s}: {_pct(v, signed)}" for s, v in values.items())


def _delta(d: dict) -> str:
  """A paired difference as ``+1.50 ± 3.54 (n=2, t = 0.60, p = 0.66; sign p = 1)``."""
  fmt = lambda p: "< 0.001" if p < 0.001 else "= " + format(p, ".2g")
  test = ""
  if d.get("t") is not None:
    test = f", t = {d['t']:.2f}, p {fmt(d['p'])}"
  if d.get("sign_p") is not None:
    test += f"; sign p {fmt(d['sign_p'])}"
  return f"{format_mean_std(d, True)} (n={d['n']}{test})"


def _describe(row: Row) -> str:
  what = f"evaluates `{row.evaluates}`" if row.evaluates else f"`:{row.variant or DEFAULT_VARIANT}`"
  same = f" (no change to `{row.evaluates}`'s config: its own evaluation)" if row.same_config else ""
  return what + "".join(f" `{o}`" for o in row.overrides) + same


def markdown(study: dict) -> str:
  """``study.md``: one table per metric, the sweeps, the missing runs."""
  rows = [Row(**{**r, "overrides": tuple(r["overrides"]), "seeds": tuple(r["seeds"])}) for r in study["rows"]]
  agg, baseline = study["aggregate"], study["baseline_row"]
  lines = [
      f"# Study: `{study['config']}`" + "".join(f" `--config.{o}`" for o in study["overrides"]),
      "",
      "mIoU in %, over the finished seeds: mean ± sample standard deviation (ddof=1), min–max, n seeds. "
      f"Δ: the paired difference to `{baseline}`'s mIoU (no post-processing), seed by seed, as mean ± std, with "
      "the paired t-test (t, two-sided p; n - 1 degrees of freedom) and the sign test (sign p: two-sided, exact "
      "binomial, over the seeds where Δ ≠ 0); improved: the seeds where Δ > 0.",
      "",
  ]
  for key, title in METRICS:
    have = [r for r in rows if key in agg[r.name]["metrics"]]
    if not have:
      continue
    lines += [
        f"## {title}",
        "",
        f"| row | run | n | mean ± std | min–max | Δ vs {baseline} | improved | per seed |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in have:
      m = agg[r.name]["metrics"][key]
      d = agg[r.name]["vs_baseline"].get(key)
      label = r.name + (
          f" ({agg[r.name]['final_iterations']} it.)"
          if key == "miou_propagated" and "final_iterations" in agg[r.name]
          else ""
      )
      lines.append(
          f"| {label} | {_describe(r)} | {m['n']} | {format_mean_std(m)} | {_pct(m['min'])}–{_pct(m['max'])} | "
          + (f"{_delta(d)} | {d['improved']}/{d['n']} | " if d and d["n"] else "– | – | ")
          + format_per_seed(m["values"])
          + " |"
      )
    lines.append("")
  swept = [r for r in rows if "sweep" in agg[r.name]]
  if swept:
    its = agg[swept[0].name]["sweep"]["iterations"]
    lines += [
        "## Propagation sweeps (Tables 3–4)",
        "",
        "mIoU after each number of propagation iterations with the "
        "predicted affinity and with the ground-truth affinity (oracle), mean ± std over seeds.",
        "",
        "| row | affinity | n | " + " | ".join(f"{it} it." for it in its) + " |",
        "|---|---|---:|" + "---:|" * len(its),
    ]
    for r in swept:
      sw = agg[r.name]["sweep"]
      for name in ("predicted", "oracle"):
        if name in sw:
          cells = [format_mean_std({"mean": m, "std": s}) for m, s in zip(sw[name]["mean"], sw[name]["std"])]
          if sw["iterations"] != its:
            cells = [f"{it} it.: {c}" for it, c in zip(sw["iterations"], cells)]
          lines.append(f"| {r.name} | {name} | {sw[name]['n']} | " + " | ".join(cells) + " |")
    lines.append("")
  titles = dict(METRICS)
  comparisons = [c for c in study.get("comparisons", []) if c["metrics"]]
  if comparisons:
    lines += [
        "## Paired comparisons",
        "",
        "Row A minus row B, seed by seed over the seeds both finished, with the paired t-test; against a dense-CRF "
        "row every metric of A is compared with B's mIoU with dense CRF; otherwise a metric B lacks is compared with "
        "B's mIoU (no post-processing).",
        "",
        "| A | B | metric (A against B) | Δ (mean ± std, paired t-test) | A better | per seed |",
        "|---|---|---|---:|---:|---|",
    ]
    for c in comparisons:
      for key, d in c["metrics"].items():
        if not d["n"]:
          continue
        metric = titles[key] + ("" if d["against"] == key else f" against {titles[d['against']]}")
        lines.append(
            f"| {c['a']} | {c['b']} | {metric} | {_delta(d)} | {d['improved']}/{d['n']} | "
            + format_per_seed(d["values"], signed=True)
            + " |"
        )
    lines.append("")
  missing = [f"{r.name} seed {s}" for r in rows for s in r.seeds if s not in agg[r.name]["finished"]]
  if missing:
    lines += ["## Not finished", "", ", ".join(missing), ""]
  return "\n".join(lines)


def plot(study: dict, path: str) -> None:
  """``study.png``: mIoU per row and metric with ±std error bars and the seeds as dots; the sweeps with ±std bands."""
  from dilaff_jax.engine import visualize  # pylint: disable=import-outside-toplevel  # jax: only to draw

  plt = visualize.pyplot()
  import numpy as np

  agg = study["aggregate"]
  names = [r["name"] for r in study["rows"]]
  swept = [n for n in names if "sweep" in agg[n]]
  bars_width = max(6.0, 0.5 * len(names) + 1.5)  # inches: the row labels must not overlap
  fig, axes = plt.subplots(
      1,
      2 if swept else 1,
      figsize=(bars_width + (8.5 if swept else 0), 5.2),
      dpi=110,
      squeeze=False,
      gridspec_kw={"width_ratios": [bars_width, 8.5] if swept else [1]},
  )
  ax = axes[0, 0]
  keys = [(k, t) for k, t in METRICS if any(k in agg[n]["metrics"] for n in names)]
  width = 0.8 / max(len(keys), 1)
  x = np.arange(len(names))
  for j, (key, title) in enumerate(keys):
    pos = x + (j - (len(keys) - 1) / 2) * width
    means = [100 * agg[n]["metrics"][key]["mean"] if key in agg[n]["metrics"] else np.nan for n in names]
    stds = [100 * (agg[n]["metrics"][key]["std"] or 0) if key in agg[n]["metrics"] else 0 for n in names]
    ax.bar(pos, means, width, yerr=stds, capsize=3, label=title, alpha=0.8)
    for p, n in zip(pos, names):
      vals = list(agg[n]["metrics"].get(key, {}).get("values", {}).values())
      ax.plot([p] * len(vals), [100 * v for v in vals], "k.", ms=4)
  finite = [100 * v for n in names for m in agg[n]["metrics"].values() for v in m["values"].values()]
  if finite:  # headroom above the highest seed for the legend
    ax.set_ylim(max(0, min(finite) - 5), min(100, max(finite) + 8))
  ax.set_xticks(x)
  ax.set_xticklabels(
      [f"{n} (n={agg[n]['metrics'].get('miou', {}).get('n', 0)})" for n in names],
      fontsize=8,
      rotation=40 if len(names) > 3 else 0,
      ha="right" if len(names) > 3 else "center",
  )
  ax.set_ylabel("mIoU (%)")
  ax.set_title("mIoU per row: mean ± std over seeds (dots: seeds)", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  if keys:
    ax.legend(fontsize=8, loc="upper left", ncol=len(keys))
  if swept:
    ax = axes[0, 1]
    colors = plt.get_cmap("tab10" if len(swept) <= 10 else "tab20")
    for i, n in enumerate(swept):
      sw = agg[n]["sweep"]
      color = colors(i % colors.N)
      for name, style in (("predicted", "-"), ("oracle", "--")):
        if name in sw:
          m = 100 * np.asarray(sw[name]["mean"], float)
          s = 100 * np.asarray([v or 0.0 for v in sw[name]["std"]], float)
          label = f"{n} (n={sw[name]['n']})" if name == "predicted" or "predicted" not in sw else None
          ax.plot(sw["iterations"], m, style, marker="o", ms=4, color=color, label=label)
          ax.fill_between(sw["iterations"], m - s, m + s, color=color, alpha=0.12)
    ax.set_xlabel("propagation iterations")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Propagation sweeps: mean ± std (solid: predicted, dashed: oracle)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="row (one colour each)", title_fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_aggregates(
    workdir: str,
    config_path: str,
    overrides: Sequence[str],
    rows: Sequence[Row],
    baseline: str,
    comparisons: Sequence[tuple[str, str]] = (),
) -> dict:
  """Writes ``study.json``, ``study.md`` and ``study.png`` of the finished runs in ``workdir``; returns the study.
  ``comparisons``: ``(A, B)`` row pairs compared seed by seed (:func:`compare`)."""
  results = load_results(workdir, rows)
  study = {
      "config": config_path,
      "overrides": list(overrides),
      "baseline_row": baseline,
      "rows": [dataclasses.asdict(r) for r in rows],
      "aggregate": aggregate(rows, results, baseline),
      "comparisons": [compare(results, a, b) for a, b in comparisons],
  }
  files.write_atomic(os.path.join(workdir, "study.json"), json.dumps(study, indent=1))
  files.write_atomic(os.path.join(workdir, "study.md"), markdown(study))
  plot(study, os.path.join(workdir, "study.png"))
  return study


def export(workdir: str, rows: Sequence[Row], destination: str) -> list[str]:
  """Copies the small outputs (module doc) to ``destination`` with the same layout; returns the copied paths. Paths
  under ``workdir`` in the JSON files (a run's ``--workdir``, an evaluation's output folder) become relative to it,
  so that an export names no folder of the machine it ran on."""
  names = ["study.json", "study.md", "study.png"]
  for row in rows:
    for seed in row.seeds:
      rel = os.path.relpath(run_dir(workdir, row, seed), workdir)
      step = os.path.join(rel, "eval", f"step_{row.final_step}")
      names += [
          os.path.join(rel, "config.json"),
          os.path.join(rel, "run.json"),
          os.path.join(step, "results.json"),
          os.path.join(step, "results.md"),
          os.path.join(step, FIRST_RESULTS),
      ]
  copied = []
  prefix = os.path.abspath(workdir) + os.sep
  for name in names:
    if os.path.exists(os.path.join(workdir, name)):
      os.makedirs(os.path.dirname(os.path.join(destination, name)) or destination, exist_ok=True)
      if name.endswith(".json"):  # the runs' commands and configs name the study folder: keep paths inside it
        with open(os.path.join(workdir, name)) as f:
          text = f.read()
        files.write_atomic(os.path.join(destination, name), text.replace(prefix, ""))
      else:
        shutil.copyfile(os.path.join(workdir, name), os.path.join(destination, name))
      copied.append(name)
  return copied


# ----------------------------------------------------------------------------------------------- command line


def rows_from_study_json(
    workdir: str, advice: str = "give --config and --variants/--rows, or point --workdir at a study"
) -> tuple[str, list[str], list[Row], str, list[str]]:
  """A study folder's ``(config, overrides of every run, rows, baseline row, comparisons)`` from its study.json;
  without one, a :class:`StudyError` naming ``--workdir`` and what to do (``advice``, in the calling tool's words)."""
  path = os.path.join(workdir, "study.json")
  if not os.path.exists(path):
    raise StudyError(f"--workdir={workdir}: no study.json there: {advice}")
  again = "rerun the study's own command to write it again (its finished runs are skipped)"
  try:
    with open(path) as f:
      study = json.load(f)
  except (OSError, ValueError) as e:
    raise StudyError(f"{path} cannot be read ({cli.one_line(e)}): {again}") from None
  try:
    rows = [Row(**{**r, "overrides": tuple(r["overrides"]), "seeds": tuple(r["seeds"])}) for r in study["rows"]]
    compared = [f"{c['a']}:{c['b']}" for c in study.get("comparisons", [])]
    return study["config"], study["overrides"], rows, study["baseline_row"], compared
  except (KeyError, TypeError, AttributeError) as e:
    raise StudyError(f"{path} is not a study's study.json (at {cli.one_line(e)}): {again}") from None


def main(argv) -> None:
  overrides = [a[len("--config.") :] for a in argv[1:]]
  workdir = FLAGS.workdir
  try:
    if FLAGS.aggregate_only and not (FLAGS.variants or FLAGS.rows):
      config_path, overrides, rows, baseline, compared = rows_from_study_json(workdir)
      baseline = FLAGS.baseline_row or baseline
      compared = FLAGS.compare or compared
    else:
      if not FLAGS.config:
        raise StudyError("--config is required (e.g. --config=configs/synthetic.py)")
      if ":" in FLAGS.config:
        raise StudyError(
            f"--config={FLAGS.config}: give the file without a variant; variants are rows "
            "(--variants=... or --rows=...)"
        )
      config_path = FLAGS.config
      if any(o.split("=", 1)[0] == "seed" for o in overrides):
        raise StudyError("--config.seed: the study sets each run's seed; give --seeds=... instead")
      parsed = parse_rows(FLAGS.variants, FLAGS.rows, _seeds(FLAGS.seeds, "--seeds"))
      rows = resolve(parsed, config_path, overrides, check=not FLAGS.aggregate_only)
      names = [r.name for r in rows]
      baseline = FLAGS.baseline_row or ("baseline" if "baseline" in names else names[0])
      compared = FLAGS.compare
    if baseline not in [r.name for r in rows]:
      raise StudyError(f"--baseline_row={baseline}: not a row of the study ({', '.join(r.name for r in rows)})")
    comparisons = parse_comparisons(compared, rows)
    if FLAGS.aggregate_only:
      if not os.path.isdir(workdir):
        raise StudyError(f"--workdir={workdir} does not exist")
      write_aggregates(workdir, config_path, overrides, rows, baseline, comparisons)
      status = 0
    else:
      at_once = ""
      if FLAGS.jobs != 1:
        slots = study_slots(FLAGS.jobs)
        at_once = f", {len(slots)} at a time on {len(slots[0])} core(s) each"
      print(f"[study] {len(rows)} rows, {len(plan(rows, FLAGS.first))} runs in {workdir}{at_once}", flush=True)
      status = run_study(
          config_path, overrides, rows, workdir, baseline, comparisons, jobs=FLAGS.jobs, first=FLAGS.first
      )
      write_aggregates(workdir, config_path, overrides, rows, baseline, comparisons)
    print(f"[study] aggregates: {os.path.join(workdir, 'study.md')} (.json, .png)", flush=True)
    if FLAGS.export:
      copied = export(workdir, rows, FLAGS.export)
      print(f"[study] exported {len(copied)} files to {FLAGS.export}", flush=True)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing of the study's flags; the ``--config.KEY=VALUE`` overrides of every run are passed on to ``main``
  as its arguments."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  see = "(see python -m dilaff_jax.research.study --help)"
  try:
    rest = FLAGS([argv[0], *(a for a in argv[1:] if not a.startswith("--config."))])
    if len(rest) > 1:
      raise StudyError(f"unexpected argument {rest[1]!r}: every option is a --flag=VALUE")
  except (flags.Error, StudyError) as e:  # an unknown flag, a bad value (--jobs=two), a missing --workdir
    print(f"error: {cli.one_line(e)} {see}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  return [argv[0], *overrides]


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
