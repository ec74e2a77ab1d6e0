r"""The curves of a run as a picture: its TensorBoard scalars (``train/loss``, ``validation/miou``, ...) read from
the workdir's event files and drawn one panel per scalar, for a README or a report where TensorBoard is not at hand.

  python -m dilaff_jax.research.curves --workdir=runs/mine --output=runs/mine/curves.png
  python -m dilaff_jax.research.curves --workdir=runs/mine --tags=train/loss,validation/miou --output=curves.png
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

from dilaff_jax import errors  # noqa: E402
from dilaff_jax.engine import visualize  # noqa: E402
from dilaff_jax.process import cli, files  # noqa: E402

DEFAULT_TAGS = ("train/loss", "train/pixel_accuracy", "validation/miou", "validation/miou_propagated")


class CurvesError(errors.UserError):
  """No event file, or none of the asked scalars in it."""


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the event files directly in ``workdir`` (the training's; evaluations write theirs under
  ``eval/``): tag -> ``[(step, value)]`` sorted by step, the last value kept where a resumed run wrote a step twice."""
  import tensorflow as tf
  from tensorflow.core.util import event_pb2

  paths = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  if not paths:
    raise CurvesError(f"--workdir={workdir}: no TensorBoard event file there (is it a training's workdir?)")
  # the value written last wins, by the events' own wall times: file names do not order two files of one second
  # (their per-process counter sorts "10" before "9")
  scalars: dict[str, dict[int, tuple[float, float]]] = {}
  for path in paths:
    for event in _events(tf, event_pb2, path):
      for value in event.summary.value:
        if value.HasField("simple_value"):
          number = value.simple_value
        elif value.HasField("tensor") and not value.tensor.tensor_shape.dim:
          number = float(tf.make_ndarray(value.tensor))
        else:
          continue
        points = scalars.setdefault(value.tag, {})
        step = int(event.step)
        if step not in points or event.wall_time >= points[step][0]:
          points[step] = (event.wall_time, float(number))
  return {tag: sorted((step, v) for step, (_, v) in points.items()) for tag, points in scalars.items()}


def _events(tf, event_pb2, path: str):
  """The events of one file, in order (tf.data rather than tf.compat.v1.train.summary_iterator, which prints a
  deprecation warning on every use). A file that cannot be read to its end, as a run killed while writing leaves
  its last record, yields the events before the damage, with a note on stderr."""
  count = 0
  records = iter(tf.data.TFRecordDataset(path))
  while True:
    try:
      record = next(records)
    except StopIteration:
      return
    except tf.errors.DataLossError:
      print(
          f"[curves] note: {path}: the record after its first {count} events is truncated or damaged (a run killed "
          "while writing?); those events are used",
          file=sys.stderr,
      )
      return
    count += 1
    yield event_pb2.Event.FromString(record.numpy())


def plot(scalars: dict[str, list[tuple[int, float]]], tags: Sequence[str], path: str, title: str) -> list[str]:
  """One panel per tag of ``tags`` found in ``scalars`` (points marked where there are few); returns the tags drawn."""
  drawn = [t for t in tags if scalars.get(t)]
  if not drawn:
    raise CurvesError(f"none of the scalars {', '.join(tags)} was written (found: {', '.join(sorted(scalars))})")
  plt = visualize.pyplot()
  fig, axes = plt.subplots(1, len(drawn), figsize=(3.2 * len(drawn), 2.6), squeeze=False)
  for ax, tag in zip(axes[0], drawn):
    steps, values = zip(*scalars[tag])
    ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  files.write_atomic(path, _png(fig))
  plt.close(fig)
  return drawn


def _png(fig) -> bytes:
  import io

  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  return buffer.getvalue()


def _define(fv) -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "A training's workdir (its TensorBoard event files).", flag_values=fv)
  flags.DEFINE_string("output", None, "The PNG to write.", flag_values=fv)
  flags.DEFINE_list("tags", list(DEFAULT_TAGS), "The scalars to draw, one panel each.", flag_values=fv)


def main(argv: Sequence[str]) -> int:
  try:
    fv = cli.parse_flags(_define, argv, "dilaff_jax.research.curves", __doc__, required=("workdir", "output"))
    if fv is None:
      return 0
    drawn = plot(read_scalars(fv.workdir), fv.tags, fv.output, os.path.basename(os.path.normpath(fv.workdir)))
  except errors.UserError as e:
    cli.exit_with_error(e)
  print(f"[curves] {', '.join(drawn)} -> {fv.output}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
