r"""The main job: train DeepLabv3+ with dilated affinity, or evaluate a workdir's checkpoints.

  python -m dilaff_jax.main --config=configs/voc.py --workdir=runs/voc
  python -m dilaff_jax.main --config=configs/voc.py:table1_sqrt --config.affinity.beta=1.5 --workdir=runs/t1
  python -m dilaff_jax.main --config=configs/voc.py --workdir=runs/voc --mode=evaluate

A rerun with the same ``--workdir`` resumes from its latest checkpoint. Multi-host: set
``--config.distributed.coordinator_address/num_processes/process_id`` (see launch/), or run under SLURM.

Exit codes: 0 done; 2 a mistake in what was given (a flag, a config key or value, a dataset archive or label, a
weights file, a checkpoint), printed as one line ``error: <message>`` on stderr naming it and what to do; 3 the
run was preempted (SIGTERM) after saving a checkpoint: rerun it, or let the scheduler requeue it, to resume.
A mistyped ``--config.KEY`` names the nearest key. The traceback of an error is shown only with ``--verbosity=1``
or the environment variable ``DILAFF_TRACEBACK=1`` (for bug reports); any other exception is a bug and keeps it.
A run that seems stuck: ``kill -USR1 <pid>`` prints the stack of each of its threads to stderr, and it goes on.
"""

from __future__ import annotations

import contextlib
import os
import sys

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dilaff_jax import errors  # noqa: E402
from dilaff_jax.process import cli, host_memory, run_log  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, statistics and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "print_config"],
    "train: train (resuming from the workdir), then evaluate if config.train.eval_at_end; "
    "evaluate: evaluate the latest checkpoint of the workdir; print_config: print the validated config and exit "
    "(no --workdir needed).",
)
flags.DEFINE_integer("step", None, "With --mode=evaluate: the checkpoint step (default: the latest).")
flags.DEFINE_bool(
    "watch",
    False,
    "With --mode=evaluate: evaluate every new checkpoint as a training run writes it, "
    "until the one at config.train.num_steps.",
)
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "With --mode=train: resume a run with a config that trains differently (e.g. another learning rate); the "
    "change and its step are recorded in <workdir>/config_history.json.",
)
flags.DEFINE_float("watch_timeout", 3600.0, "With --watch: stop after this many seconds without a new checkpoint.")
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/voc.py or configs/voc.py:table1_sqrt.", lock_config=True
)
flags.mark_flags_as_required(["config"])  # --workdir too, except with --mode=print_config (checked in main)


def maybe_initialize_distributed(config) -> None:
  """Calls ``jax.distributed.initialize`` when the config or the environment (SLURM, JAX_COORDINATOR_ADDRESS)
  asks for a multi-process run."""
  import jax

  d = config.distributed
  if d.initialize == "no":
    return
  if d.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=d.coordinator_address,
        num_processes=d.num_processes or None,
        process_id=d.process_id if d.process_id >= 0 else None,
    )
  elif (
      d.initialize == "yes" or os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1
  ):
    jax.distributed.initialize()
  else:
    return
  logging.info(
      "jax.distributed: process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake (a missing or failing config file, an unknown variant or
  ``--config.KEY``, a bad value) ending as one ``error:`` line and exit code 2."""
  argv = [argv[0], *cli.with_config_found(argv[1:])]
  spec = cli.config_spec(argv[1:])
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):  # ml_collections would defer this error
    cli.exit_with_error(f"--config={spec}: no such config file")
  try:
    return FLAGS(argv)
  except BrokenPipeError:  # --help | head
    cli.exit_reader_gone()
  except Exception as e:  # noqa: BLE001  (everything here comes from the command line)
    cli.exit_with_error(cli.flag_error(e, argv[1:]), show_traceback=cli.wants_traceback(_verbosity(argv)))


def _verbosity(argv: list[str]) -> int:
  """``--verbosity``/``-v`` from ``argv`` when the flags could not be parsed (0 if absent or unreadable)."""
  for arg in reversed(argv):
    for prefix in ("--verbosity=", "-v="):
      if arg.startswith(prefix):
        try:
          return int(arg[len(prefix) :])
        except ValueError:
          return 0
  return 0


def print_config(config) -> None:
  """Prints ``config`` as the run would use it, after the same validation (on this machine's devices; the
  dataset's class count is taken from an image folder's classes.txt when it says 0), then returns."""
  import jax
  from dilaff_jax import datasets
  from dilaff_jax.engine import config_checks

  try:
    datasets.resolve_num_classes(config.dataset)
    config_checks.validate(config, num_devices=jax.device_count(), mode="evaluate")
  except (errors.UserError, FileNotFoundError) as e:
    cli.exit_with_error(e, show_traceback=cli.wants_traceback(FLAGS.verbosity))
  print(config.to_json_best_effort(indent=1, sort_keys=False), flush=True)


def _make_workdir(workdir: str) -> None:
  """Creates a training's workdir so that its log starts with the run (a path that cannot be a folder is left to
  the training's own error)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError:
    pass


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.print_stacks_on_sigusr1()
  if not FLAGS["verbosity"].present:  # progress goes to stdout; library INFO logs only with --verbosity=0
    logging.set_verbosity(logging.WARNING)
  try:
    host_memory.reuse_freed_memory()  # before the backend starts its threads
  except errors.UserError as e:
    cli.exit_with_error(e)
  config = FLAGS.config
  if FLAGS.mode == "print_config":
    print_config(config)
    return
  if FLAGS.workdir is None:
    cli.exit_with_error("--workdir is required (a folder for checkpoints and results; new or of this run)")
  maybe_initialize_distributed(config)

  # imported only now: jax.distributed.initialize (above) must come before anything touches the backend
  import jax
  from dilaff_jax import datasets, evaluate, train
  from dilaff_jax.engine import config_checks

  logging.info(
      "JAX %s: process %d/%d, devices %s", jax.__version__, jax.process_index(), jax.process_count(), jax.devices()
  )
  try:
    datasets.resolve_num_classes(config.dataset)  # image_folder: 0 = as many as its classes.txt lists
    if FLAGS.mode == "train":  # a config that cannot train leaves no folder behind
      config_checks.validate(config, num_devices=jax.device_count())
  except (errors.UserError, FileNotFoundError) as e:
    cli.exit_with_error(e, show_traceback=cli.wants_traceback(FLAGS.verbosity))
  if FLAGS.mode == "train":
    _make_workdir(FLAGS.workdir)
  chief = jax.process_index() == 0  # one log for the run: the other processes print the same lines
  with run_log.tee(FLAGS.workdir, sys.argv[1:]) if chief else contextlib.nullcontext() as log_path:
    try:
      if FLAGS.mode == "train":
        result = train.train_and_evaluate(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
        if result.get("preempted_at") is not None:
          sys.exit(errors.EXIT_PREEMPTED)
        evaluated = [result["eval"]] if "eval" in result else []
      else:
        evaluated = evaluate.evaluate_checkpoints(
            config,
            FLAGS.workdir,
            steps=[FLAGS.step] if FLAGS.step is not None else None,
            watch=FLAGS.watch,
            timeout_seconds=FLAGS.watch_timeout,
        )
    except (errors.UserError, FileNotFoundError) as e:  # FileNotFoundError: a missing checkpoint or workdir
      cli.exit_with_error(e, show_traceback=cli.wants_traceback(FLAGS.verbosity))
    dirs = [os.path.join(evaluate.results_dir(config, FLAGS.workdir), f"step_{r['step']}") for r in evaluated]
    print(run_log.closing_line(FLAGS.workdir, dirs, log_path), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
