r"""Exports a trained model as a serialized ``jax.export`` artifact (StableHLO) that runs without this project.

  python -m dilaff_jax.export --workdir=runs/mine --output=model.jaxexport [--step=N] [--size=H,W]

The artifact is the evaluation model of the workdir's checkpoint with its weights inside: input uint8 RGB
``[B, H, W, 3]`` (``B`` symbolic: any batch size), outputs ``(mask int32 [B, H, W], probabilities float32
[B, H, W, C])`` after ``config.affinity.iterations`` steps of affinity propagation (Eq. 6, the predicted affinity
through the steep sigmoid of Eq. 7). Normalisation, DeepLab's alignment padding, the network's resizing, propagation
with the padding masked out and the crop back to ``H x W`` are inside, exactly as ``python -m dilaff_jax.predict``
computes an image of that size. ``H, W`` are ``--size`` (default ``config.dataset.eval_pad_size``).

Beside it, ``<output>.json``: classes, palette, size, iterations, λ, μ, rates, mean/std, the source checkpoint.
A plain JAX program reloads it::

  import jax, numpy as np
  exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
  mask, probs = exported.call(images_uint8)   # images [B, H, W, 3]

``--format=savedmodel`` writes the same computation as a TensorFlow SavedModel folder instead (through
``jax.experimental.jax2tf``; the weights are its variables), for TensorFlow, TF Serving or any TensorFlow runtime::

  import tensorflow as tf
  out = tf.saved_model.load("model.savedmodel").serve(images_uint8)   # {"mask", "probabilities"}

Its batch is polymorphic; height and width stay fixed (``--size``): the network's bilinear resizing and the
propagation masks are built from concrete sizes when traced. ``--format=tflite`` is refused with the reason: the TFLite
converter of TensorFlow 2.21 rejects the argmax (a variadic reduce) and crashes on propagation's loop.

Bad input (a workdir without checkpoint, a missing ``--step``, a bad ``--size``, an output that cannot be written)
ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from dilaff_jax import errors, predict  # noqa: E402
from dilaff_jax.engine import config_checks, inference, run_spec, train_state as state, visualize  # noqa: E402
from dilaff_jax.engine.run_spec import RunSpec  # noqa: E402
from dilaff_jax.method import propagation  # noqa: E402
from dilaff_jax.process import cli, files, host_memory  # noqa: E402

FORMAT = "dilaff_jax.export/1"
FORMATS = ("jaxexport", "savedmodel", "tflite")
TFLITE_UNSUPPORTED = (
    "--format=tflite: TensorFlow's TFLite converter cannot convert this model (TensorFlow 2.21 rejects the argmax, a "
    "variadic reduce, and crashes on affinity propagation's loop); export --format=savedmodel for TensorFlow "
    "runtimes, or the default --format=jaxexport for JAX"
)


class ExportError(errors.UserError, ValueError):
  """Bad input to the export; the message names the flag or file at fault."""


def parse_size(text: str) -> tuple[int, int]:
  """``"H,W"`` (or ``"HxW"``) as two positive ints."""
  parts = text.replace("x", ",").split(",")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) <= 0:
    raise ExportError(f"--size={text}: expected H,W, two positive integers (e.g. --size=513,513)")
  return size


def default_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  pad = config.dataset.get("eval_pad_size")
  if not pad:
    raise ExportError(
        "config.dataset.eval_pad_size is None (evaluation pads each image to the largest of its size group): "
        "give --size=H,W, the size of the images the model will get"
    )
  return tuple(int(v) for v in (pad if len(tuple(pad)) == 2 else (pad, pad)))


def check_output(path: str, format: str = "jaxexport") -> None:
  """Fails before the slow work when ``path`` (or its JSON) cannot be written."""
  if format == "savedmodel":
    check_savedmodel_output(path)
  elif os.path.isdir(path):
    raise ExportError(f"--output={path} is a folder: give a file name, e.g. {os.path.join(path, 'model.jaxexport')}")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise ExportError(f"--output={path}: the folder {parent} does not exist")
  read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
  for p in (path, path + ".json"):
    if read_only:
      raise ExportError(f"--output={path}: cannot write {p}: {parent} is on a read-only filesystem")
    if (os.path.exists(p) and not os.access(p, os.W_OK)) or not os.access(parent, os.W_OK):
      raise ExportError(f"--output={path}: cannot write {p} (no write permission)")


def check_savedmodel_output(path: str) -> None:
  """A SavedModel is a folder: ``path`` must be new, or a SavedModel that the export replaces (never a file or a
  folder holding anything else); its JSON goes beside it."""
  if os.path.isfile(path):
    raise ExportError(f"--output={path} is a file: a SavedModel is a folder; give a new name, e.g. model.savedmodel")
  if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
    raise ExportError(f"--output={path} is a folder that holds something else than a SavedModel: give a new name")
  check_output(path.rstrip(os.sep) + ".json")


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The dataset's class names (``classes.txt`` of an image folder, or the prepared dataset's metadata), else
  ``class_0 ...`` when the dataset is not at hand."""
  return predict.class_names_or_numbers(config, "export")


def serving_function(spec: RunSpec, variables, size: tuple[int, int]):
  """``f(images uint8 [B, H, W, 3]) -> (mask int32 [B, H, W], probabilities float32 [B, H, W, C])`` with the
  variables closed over: predict.py's computation for images of ``size``, batched."""
  config, rates = spec.config, spec.rates
  model = state.build_model(spec, axis_name=None)
  height, width = size
  os_ = int(config.eval.output_stride)
  padded = (predict.aligned_size(height, os_), predict.aligned_size(width, os_))
  mean = np.asarray(config.dataset.mean, np.float32)
  std = np.asarray(config.dataset.std, np.float32)
  iterations = int(config.affinity.iterations)

  def f(images):
    x = (images.astype(jnp.float32) - mean) / std
    x = jnp.pad(x, ((0, 0), (0, padded[0] - height), (0, padded[1] - width), (0, 0)))  # 0 = the mean pixel
    probs, aff = inference.predict(
        model.apply,
        variables,
        x,
        size=padded,
        output_stride=os_,
        scales=tuple(config.eval.scales),
        flip=bool(config.eval.flip),
        rates=rates,
        mu=config.affinity.mu,
    )
    if rates:
      inside = inference.inside_mask(jnp.array([height]), jnp.array([width]), padded, rates)
      anchor = probs if spec.anchored else None
      probs = propagation.propagate(
          probs, aff * inside, rates, lam=float(config.affinity.lam), iterations=iterations, anchor=anchor
      )
    probs = probs[:, :height, :width].astype(jnp.float32)
    return jnp.argmax(probs, -1).astype(jnp.int32), probs

  return f


def export(
    config: ml_collections.ConfigDict,
    workdir: str,
    output: str,
    size: tuple[int, int] | None = None,
    step: int | None = None,
    platforms: Sequence[str] | None = None,
    format: str = "jaxexport",
) -> dict:
  """Writes ``output`` (the serialized ``jax.export.Exported``, or with ``format="savedmodel"`` a SavedModel folder)
  and ``output + ".json"``; returns the JSON."""
  if format not in FORMATS:
    raise ExportError(f"--format={format}: choose one of {', '.join(FORMATS)}")
  if format == "tflite":
    raise ExportError(TFLITE_UNSUPPORTED)
  size = size or default_size(config)
  check_output(output, format)
  config_checks.validate(config, num_devices=1, mode="predict")
  spec = run_spec.derive(config)
  variables, step = state.restore_variables(spec, workdir, step)
  variables = jax.device_put(variables)
  fn = serving_function(spec, variables, size)
  if format == "savedmodel":
    written, exported_platforms = write_savedmodel(spec, variables, size, output, platforms)
  else:
    (batch,) = jax.export.symbolic_shape("b")
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(jax.ShapeDtypeStruct((batch, *size, 3), jnp.uint8))
    blob = exported.serialize()
    with open(output, "wb") as f:
      f.write(blob)
    written, exported_platforms = len(blob), list(exported.platforms)
  names = class_names(config)
  palette = visualize.palette_for(config.dataset.name)
  rates = spec.rates
  info = {
      "format": FORMAT if format == "jaxexport" else f"{FORMAT}+{format}",
      "artifact": os.path.basename(output.rstrip(os.sep)),
      "bytes": written,
      "jax_version": jax.__version__,
      "platforms": exported_platforms,
      "input": {"shape": ["B", *size, 3], "dtype": "uint8", "channels": "RGB"},
      "outputs": [
          {"name": "mask", "shape": ["B", *size], "dtype": "int32"},
          {"name": "probabilities", "shape": ["B", *size, len(names)], "dtype": "float32"},
      ],
      "size": list(size),
      "classes": names,
      "palette": palette[: len(names)].tolist(),
      "void_label": int(config.dataset.ignore_label),
      "void_color": palette[255].tolist(),
      "iterations": int(config.affinity.iterations) if rates else 0,
      "lam": float(config.affinity.lam),
      "mu": float(config.affinity.mu),
      "rates": [list(r) for r in rates],
      "mean": list(config.dataset.mean),
      "std": list(config.dataset.std),
      "output_stride": int(config.eval.output_stride),
      "scales": list(config.eval.scales),
      "flip": bool(config.eval.flip),
      "source_checkpoint": {"workdir": os.path.abspath(workdir), "step": step, "dataset": config.dataset.name},
  }
  files.write_atomic(output.rstrip(os.sep) + ".json", json.dumps(info, indent=1))
  return info


def write_savedmodel(
    spec: RunSpec,
    variables,
    size: tuple[int, int],
    output: str,
    platforms: Sequence[str] | None = None,
) -> tuple[int, list[str]]:
  """Writes :func:`serving_function` as a TensorFlow SavedModel folder through ``jax2tf`` (the network as StableHLO
  in an ``XlaCallModule`` op, the weights as TF variables): ``serve(images uint8 [B, H, W, 3]) -> {"mask",
  "probabilities"}``, also its ``serving_default`` signature, with any batch size. Written into a temporary folder
  beside ``output`` and renamed over it. Returns ``(bytes on disk, platforms)``."""
  import shutil

  import tensorflow as tf
  from jax.experimental import jax2tf

  height, width = size
  lowered_for = tuple(platforms) if platforms else (jax.export.default_export_platform(),)
  converted = jax2tf.convert(
      lambda v, images: serving_function(spec, v, size)(images),
      polymorphic_shapes=[None, f"(b, {height}, {width}, 3)"],
      with_gradient=False,
      native_serialization_platforms=lowered_for,
  )
  module = tf.Module()
  module.weights = tf.nest.map_structure(
      lambda a: tf.Variable(np.asarray(a), trainable=False), jax.device_get(variables)
  )

  @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")])
  def serve(images):
    mask, probabilities = converted(module.weights, images)
    return {"mask": mask, "probabilities": probabilities}

  module.serve = serve
  output = output.rstrip(os.sep)
  tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tf.saved_model.save(module, tmp, signatures={"serving_default": serve})
    if os.path.isdir(output):  # a previous SavedModel (check_savedmodel_output refused anything else)
      shutil.rmtree(output)
    os.replace(tmp, output)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise files.WriteError(f"writing {output} failed: {e} ({files.free_space(output)})") from None
  size_on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(output) for f in fs)
  return size_on_disk, [p.lower() for p in lowered_for]


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "training workdir (its config.json and checkpoints)", flag_values=fv)
  flags.DEFINE_string("output", None, "file for the serialized artifact; its JSON goes to FILE.json", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
  flags.DEFINE_string("size", None, "H,W of the input images (default: config.dataset.eval_pad_size)", flag_values=fv)
  flags.DEFINE_string("platforms", None, "comma-separated, e.g. cpu,cuda (default: this machine's)", flag_values=fv)
  flags.DEFINE_enum(
      "format",
      "jaxexport",
      list(FORMATS),
      "jaxexport: serialized jax.export (StableHLO, for JAX); savedmodel: a TensorFlow SavedModel folder (jax2tf); "
      "tflite: not supported (the message says why)",
      flag_values=fv,
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry; returns the exit status (2 for bad input, with one ``error:`` line on stderr)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    host_memory.reuse_freed_memory()
    args = cli.parse_flags(_define_flags, argv, "dilaff_jax.export", __doc__, required=("workdir", "output"))
    if args is None:  # --help
      return 0
    if args.format == "tflite":
      raise ExportError(TFLITE_UNSUPPORTED)
    size = parse_size(args.size) if args.size else None
    check_output(args.output, args.format)
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
      raise ExportError(
          f"--workdir={args.workdir}: no config.json there (not a training workdir?): point --workdir "
          "at a run of python -m dilaff_jax.main"
      )
    try:
      config = predict.load_json_config(args.workdir)
    except predict.PredictError as e:
      raise ExportError(str(e)) from None
    platforms = [s.strip() for s in args.platforms.split(",")] if args.platforms else None
    info = export(config, args.workdir, args.output, size, args.step, platforms, format=args.format)
  except errors.UserError as e:
    if cli.wants_traceback():
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR
  print(
      f"[export] step {info['source_checkpoint']['step']} of {args.workdir} -> {args.output} "
      f"({args.format}, {info['bytes'] / 2**20:.1f} MiB, platforms {','.join(info['platforms'])}): "
      f"uint8 [B, {info['size'][0]}, {info['size'][1]}, 3] -> mask, probabilities over {len(info['classes'])} "
      f"classes ({', '.join(info['classes'])}), {info['iterations']} propagation iteration(s); "
      f"{args.output.rstrip(os.sep)}.json",
      flush=True,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
