r"""The main job: train DeepLabv3+ with dilated affinity, or evaluate a workdir's checkpoints.

  python -m dilaff_jax.main --config=configs/voc.py --workdir=runs/voc
  python -m dilaff_jax.main --config=configs/voc.py:table1_sqrt --config.affinity.beta=1.5 --workdir=runs/t1
  python -m dilaff_jax.main --config=configs/voc.py --workdir=runs/voc --mode=evaluate

A rerun with the same ``--workdir`` resumes from its latest checkpoint. Multi-host: set
``--config.distributed.coordinator_address/num_processes/process_id`` (see launch/), or run under SLURM.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, statistics and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                  "train: train (resuming from the workdir), then evaluate if config.train.eval_at_end; "
                  "evaluate: evaluate the latest checkpoint of the workdir.")
flags.DEFINE_integer("step", None, "With --mode=evaluate: the checkpoint step (default: the latest).")
flags.DEFINE_bool("watch", False, "With --mode=evaluate: evaluate every new checkpoint as a training run writes it, "
                  "until the one at config.train.num_steps.")
flags.DEFINE_float("watch_timeout", 3600.0, "With --watch: stop after this many seconds without a new checkpoint.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/voc.py or configs/voc.py:table1_sqrt.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed(config) -> None:
  """Calls ``jax.distributed.initialize`` when the config or the environment (SLURM, JAX_COORDINATOR_ADDRESS)
  asks for a multi-process run."""
  import jax

  d = config.distributed
  if d.initialize == "no":
    return
  if d.coordinator_address:
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes or None,
                               process_id=d.process_id if d.process_id >= 0 else None)
  elif d.initialize == "yes" or os.environ.get("JAX_COORDINATOR_ADDRESS") or int(
      os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # progress goes to stdout; library INFO logs only with --verbosity=0
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  maybe_initialize_distributed(config)

  import jax
  from dilaff_jax import datasets, errors, evaluate, train

  logging.info("JAX %s: process %d/%d, devices %s", jax.__version__, jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    datasets.resolve_num_classes(config.dataset)  # image_folder: 0 = as many as its classes.txt lists
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, FLAGS.workdir)
    else:
      evaluate.evaluate_checkpoints(config, FLAGS.workdir, steps=[FLAGS.step] if FLAGS.step is not None else None,
                                    watch=FLAGS.watch, timeout_seconds=FLAGS.watch_timeout)
  except (errors.UserError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
