r"""Prediction on your own images: colourised masks blended over each image, before and after affinity
propagation (paper §3.3, Eq. 6, with the predicted affinity through the steep sigmoid of Eq. 7).

  python -m dilaff_jax.predict --workdir=runs/voc --input=photos/ --output=out/
  python -m dilaff_jax.predict --workdir=runs/voc --input=cat.jpg --output=out/ --config.affinity.iterations=3
  python -m dilaff_jax.predict --workdir=runs/t1 --input=photos/ --output=out/ --config=configs/voc.py:table1_sqrt

``--input`` is one image or a folder (its .jpg/.jpeg/.png/.bmp/.webp files, sorted, not recursive). For every image
``<name>`` it writes, at the image's exact size:
  <name>_seg.png      the raw prediction (argmax of the softmax), colourised and blended over the image;
  <name>_refined.png  the prediction after ``config.affinity.iterations`` steps of propagation (affinity runs only);
  <name>_mask.png     the final class-index mask (refined when there is affinity), a single-channel PNG.
The config is ``--config`` (a config file, as for the main job) or else the ``config.json`` that training wrote into
the workdir; either takes ``--config.KEY=VALUE`` overrides (a mistyped key is named with the nearest one). Inference
follows ``config.eval`` (output stride, scales, flip).

Memory: an image whose longer side exceeds ``--max_size`` (default 2048 pixels; 0 = no limit) is downscaled to that
side for inference, and its masks are scaled back to the image's size with nearest-neighbour (the blends and the
mask keep the exact input size). The network's memory grows with the pixels it sees, so this bounds it: a 6000x4000
photo is inferred at 2048x1365. Raise the limit for finer masks if the device has the memory.

Bad input (a missing path, a folder without images, a workdir without checkpoint, an output folder that is a file,
cannot be created or is not writable) ends with one line ``error: <message>`` naming it and exit code 2, before the
model is loaded. Unreadable images in a folder are skipped: the others are predicted, then the skipped ones are
listed and the exit code is 2. A traceback is shown only with ``DILAFF_TRACEBACK=1`` (for bug reports).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from dilaff_jax.process import tf_env

tf_env.set_defaults()  # before anything loads TensorFlow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from dilaff_jax import errors  # noqa: E402
from dilaff_jax.engine import config_checks, inference, run_spec, train_state as state, visualize  # noqa: E402
from dilaff_jax.engine.run_spec import RunSpec  # noqa: E402
from dilaff_jax.method import conventions, propagation  # noqa: E402
from dilaff_jax.process import cli, host_memory  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LEGEND_NAME = "legend.png"
OUTPUT_SUFFIXES = ("_seg.png", "_refined.png", "_mask.png")
DEFAULT_MAX_SIZE = conventions.MAX_INFERENCE_SIDE


class PredictError(errors.UserError, ValueError):
  """Bad input to prediction; the message names the path or flag at fault."""


# ----------------------------------------------------------------------------------------------- inputs and outputs


def list_images(path: str, output_dir: str | None = None) -> list[str]:
  """``[path]`` for a file; for a folder its image files (by extension, any case), sorted. Files this tool wrote
  are left out when ``output_dir`` is that same folder (a rerun must not predict on its own outputs)."""
  if not os.path.exists(path):
    raise PredictError(f"--input={path}: no such file or folder")
  if not os.path.isdir(path):
    return [path]
  same = output_dir is not None and os.path.isdir(output_dir) and os.path.samefile(path, output_dir)
  names = sorted(
      n
      for n in os.listdir(path)
      if n.lower().endswith(IMAGE_EXTENSIONS)
      and os.path.isfile(os.path.join(path, n))
      and not (same and n.endswith(OUTPUT_SUFFIXES))
  )
  if not names:
    raise PredictError(f"--input={path}: the folder has no images ({'/'.join(IMAGE_EXTENSIONS)})")
  return [os.path.join(path, n) for n in names]


def skipped_inputs(path: str, output_dir: str | None = None) -> list[str]:
  """The files of an input folder that :func:`list_images` leaves out for their extension (this tool's own
  outputs aside), sorted: listed to the user, never skipped silently."""
  if not os.path.isdir(path):
    return []
  kept = {os.path.basename(p) for p in list_images(path, output_dir)}
  same = output_dir is not None and os.path.isdir(output_dir) and os.path.samefile(path, output_dir)
  return sorted(
      n
      for n in os.listdir(path)
      if os.path.isfile(os.path.join(path, n))
      and n not in kept
      and not (same and (n.endswith(OUTPUT_SUFFIXES) or n == LEGEND_NAME))
  )


def class_names_or_numbers(config: ml_collections.ConfigDict, tool: str) -> list[str]:
  """The dataset's class names (:func:`dilaff_jax.datasets.config_class_names`), else ``class_0 ...`` with a
  warning naming why, when the dataset is not at hand on this machine."""
  from dilaff_jax import datasets  # TensorFlow Datasets: only once the predictions are written

  try:
    return list(datasets.config_class_names(config.dataset))
  except (errors.UserError, ValueError, OSError) as e:
    print(f"[{tool}] class names not found ({e}); using class_0 ...", file=sys.stderr, flush=True)
  return [f"class_{i}" for i in range(config.dataset.num_classes)]


def output_names(paths: Sequence[str]) -> list[str]:
  """The ``<name>`` of each input's outputs: its file name without extension, or ``<stem>_<ext>`` where two
  inputs share a stem (``a.jpg`` and ``a.png`` become ``a_jpg`` and ``a_png``)."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  exts = [os.path.splitext(p)[1].lstrip(".").lower() for p in paths]
  return [f"{s}_{e}" if stems.count(s) > 1 else s for s, e in zip(stems, exts)]


def check_output_dir(path: str) -> None:
  """Fails unless ``path`` is a writable folder or can be created (its nearest existing parent is a writable
  folder); checked by writing a temporary file, before the model is loaded, without creating ``path``."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise PredictError(f"--output={path} is a file, not a folder: give a folder for the outputs")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise PredictError(f"--output={path}: cannot create the folder, {existing} is a file")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    where = "the folder" if existing == os.path.abspath(path) else f"its parent {existing}"
    raise PredictError(
        f"--output={path}: {where} is not writable ({e.strerror}): give a folder you can write to"
    ) from None


def make_output_dir(path: str) -> None:
  check_output_dir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise PredictError(f"--output={path}: cannot create the folder ({e})") from None


def check_readable(path: str) -> None:
  """Fails fast on a file that is no image Pillow knows (reads the header only)."""
  try:
    with Image.open(path):
      pass
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise PredictError(f"cannot read image {path}: {e}") from None


def unreadable(paths: Sequence[str]) -> dict[str, str]:
  """``{path: message}`` of the files whose header Pillow cannot read (the others are predicted)."""
  failed = {}
  for path in paths:
    try:
      check_readable(path)
    except PredictError as e:
      failed[path] = str(e)
  return failed


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """An RGB uint8 image resized to ``(height, width)`` (Pillow's antialiased bilinear)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A class-index mask resized to ``(height, width)`` with nearest-neighbour (class indices are never mixed)."""
  if mask.shape[:2] == tuple(size):
    return mask
  return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _to_rgb(img: Image.Image) -> np.ndarray:
  if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16-bit / integer greyscale
    grey = np.asarray(img, np.float32)
    if not np.isfinite(grey).all():
      raise ValueError(
          f"a floating-point image with {int(np.sum(~np.isfinite(grey)))} NaN or infinite pixels; save it as an "
          "8-bit RGB or greyscale image (PNG or JPEG)"
      )
    if grey.max(initial=0) > 255:
      grey = grey * (255.0 / 65535.0)
    grey = np.clip(grey + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
    rgba = img.convert("RGBA")  # transparent pixels show the white they would be displayed on
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return np.asarray(img.convert("RGB"), np.uint8)


def read_image(path: str) -> np.ndarray:
  """An image as RGB uint8 ``[H, W, 3]``, upright (EXIF orientation applied): greyscale is replicated, alpha is
  composited over white, 16-bit greyscale is scaled to 8 bits."""
  try:
    with Image.open(path) as img:
      return _to_rgb(ImageOps.exif_transpose(img))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise PredictError(f"cannot read image {path}: {e}") from None


def aligned_size(n: int, output_stride: int) -> int:
  """The smallest ``k · output_stride + 1 >= n`` (DeepLab's aligned sizes: feature ``i`` sits on pixel
  ``i · stride``)."""
  return -(-(n - 1) // output_stride) * output_stride + 1


def normalise_and_pad(image: np.ndarray, mean, std, output_stride: int) -> np.ndarray:
  """``[1, H', W', 3]`` float32 ``(image - mean) / std``, padded at the bottom/right with zeros (the mean pixel,
  as the evaluation pipeline pads) to the aligned size of each side."""
  h, w = image.shape[:2]
  x = (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  pad = ((0, aligned_size(h, output_stride) - h), (0, aligned_size(w, output_stride) - w), (0, 0))
  return np.pad(x, pad)[None]


def write_outputs(
    output_dir: str, name: str, image: np.ndarray, raw: np.ndarray, refined: np.ndarray | None, palette: np.ndarray
) -> list[str]:
  """Writes the blends and the class-index mask of one image; returns the paths."""
  outs = {"seg": visualize.blend(image, visualize.colorize(raw, palette))}
  if refined is not None:
    outs["refined"] = visualize.blend(image, visualize.colorize(refined, palette))
  outs["mask"] = (raw if refined is None else refined).astype(np.uint8)  # single channel ("L")
  paths = []
  for kind, pixels in outs.items():
    path = os.path.join(output_dir, f"{name}_{kind}.png")
    Image.fromarray(pixels).save(path)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class Prediction:
  """Class-index masks ``[H, W]`` (uint8) of one image, and the seconds spent (compilation apart)."""

  raw: np.ndarray
  refined: np.ndarray | None
  network_s: float
  propagation_s: float
  compile_s: float


def _network(variables, x, *, apply_fn, spec: RunSpec):
  """Raw class-index mask, probabilities and steep-sigmoid affinities (Eq. 7) of a padded image ``[1, H', W', 3]``,
  as the evaluation computes them (``config.eval``: output stride, scales, flip)."""
  probs, aff = inference.predict_as_configured(apply_fn, variables, x, spec)
  return jnp.argmax(probs[0], -1).astype(jnp.uint8), probs, aff


def _refine(probs, aff, height, width, *, rates, lam, iterations, anchored=False):
  """Eq. 6 on the padded prediction; a neighbour in the padding weighs nothing (it is outside the image)."""
  inside = inference.inside_mask(height[None], width[None], probs.shape[1:3], rates)
  anchor = probs if anchored else None
  p = propagation.propagate(probs, aff * inside, rates, lam=lam, iterations=iterations, anchor=anchor)
  return jnp.argmax(p[0], -1).astype(jnp.uint8)


def make_predictor(spec: RunSpec, variables):
  """``predict_one(image uint8 [H, W, 3]) -> Prediction``. The network and the propagation are compiled once per
  padded shape (ahead of time, so that their compilation is timed apart) and cached in the returned closure."""
  config, rates = spec.config, spec.rates
  model = state.build_model(spec, axis_name=None)
  variables = jax.device_put(variables)
  network = jax.jit(functools.partial(_network, apply_fn=model.apply, spec=spec))
  refine = (
      jax.jit(
          functools.partial(
              _refine,
              rates=rates,
              lam=float(config.affinity.lam),
              iterations=int(config.affinity.iterations),
              anchored=spec.anchored,
          )
      )
      if rates
      else None
  )
  compiled = {}  # padded shape -> (network, refine) executables
  os_ = int(config.eval.output_stride)

  def predict_one(image: np.ndarray) -> Prediction:
    h, w = image.shape[:2]
    x = jnp.asarray(normalise_and_pad(image, config.dataset.mean, config.dataset.std, os_))
    hw = (jnp.int32(h), jnp.int32(w))
    compile_s = 0.0
    if x.shape not in compiled:
      t = time.perf_counter()
      net = network.lower(variables, x).compile()
      ref = None
      if refine is not None:
        shapes = jax.eval_shape(network, variables, x)
        ref = refine.lower(shapes[1], shapes[2], *hw).compile()
      compiled[x.shape] = (net, ref)
      compile_s = time.perf_counter() - t
    net, ref = compiled[x.shape]
    t = time.perf_counter()
    raw, probs, aff = jax.block_until_ready(net(variables, x))
    network_s = time.perf_counter() - t
    refined, propagation_s = None, 0.0
    if ref is not None:
      t = time.perf_counter()
      refined = jax.block_until_ready(ref(probs, aff, *hw))
      propagation_s = time.perf_counter() - t
      refined = np.asarray(refined)[:h, :w]
    return Prediction(np.asarray(raw)[:h, :w], refined, network_s, propagation_s, compile_s)

  return predict_one


# ----------------------------------------------------------------------------------------------- driver


def _progress(i: int, total: int, path: str, image: np.ndarray, pred: Prediction) -> str:
  line = f"[predict] {i}/{total} {path} ({image.shape[0]}x{image.shape[1]}): network {1e3 * pred.network_s:.0f} ms"
  if pred.refined is not None:
    line += (
        f", propagation {1e3 * pred.propagation_s:.0f} ms, "
        f"{np.mean(pred.refined != pred.raw):.1%} of the pixels changed"
    )
  return line + (f" (+{pred.compile_s:.1f} s compilation)" if pred.compile_s else "")


def _timing_summary(timings: Sequence[Prediction]) -> dict:
  """Mean and median seconds per image of the network and of propagation, compilation apart."""
  out = {"compile_s": float(sum(t.compile_s for t in timings)), "compilations": sum(1 for t in timings if t.compile_s)}
  for key in ("network_s", "propagation_s"):
    values = [getattr(t, key) for t in timings] or [0.0]
    out[key] = float(np.mean(values))
    out[key.replace("_s", "_median_s")] = float(np.median(values))
  return out


def run(
    config: ml_collections.ConfigDict, workdir: str, input_path: str, output_dir: str, max_size: int = DEFAULT_MAX_SIZE
) -> dict:
  """Predicts every image of ``input_path`` into ``output_dir``, one at a time, at most ``max_size`` pixels on the
  longer side (see the module doc). Returns ``{"written": {input: [paths]}, "failed": {input: message}}`` and the
  times of :func:`_timing_summary`. Unreadable images are skipped and listed in ``failed``; if none is readable,
  or the output folder cannot be written, it raises :class:`PredictError` before loading the model."""
  paths = list_images(input_path, output_dir)
  others = skipped_inputs(input_path, output_dir)
  if others:
    print(
        f"[predict] skipping {len(others)} file(s) of --input={input_path} that are not images of a known type "
        f"({'/'.join(IMAGE_EXTENSIONS)}): {', '.join(others)}",
        file=sys.stderr,
        flush=True,
    )
  failed = unreadable(paths)
  if len(failed) == len(paths):
    raise PredictError(
        "; ".join(failed.values())
        if len(paths) == 1
        else f"none of the {len(paths)} images of --input={input_path} can be read: " + "; ".join(failed.values())
    )
  check_output_dir(output_dir)
  if not isinstance(max_size, int) or max_size < 0:
    raise PredictError(f"--max_size={max_size}: expected 0 (no limit) or a positive number of pixels")
  config_checks.validate(config, num_devices=1, mode="predict")
  spec = run_spec.derive(config)
  variables, step = state.restore_variables(spec, workdir)
  make_output_dir(output_dir)
  rates = spec.rates
  print(
      f"[predict] checkpoint step {step} of {workdir} on {jax.devices()[0].platform}; {len(paths)} image(s); "
      + (
          f"propagation: {config.affinity.iterations} iteration{'' if config.affinity.iterations == 1 else 's'}, λ={config.affinity.lam}, μ={config.affinity.mu}"
          if rates
          else "no affinity head (baseline): raw predictions only"
      ),
      flush=True,
  )
  predict_one = make_predictor(spec, variables)
  palette = visualize.palette_for(config.dataset.name)
  written, timings, shown = {}, [], set()
  for i, (path, name) in enumerate(zip(paths, output_names(paths)), start=1):
    try:
      if path in failed:
        raise PredictError(failed[path])
      image = read_image(path)
    except PredictError as e:  # found while decoding: reported, and the other images go on
      failed[path] = str(e)
      print(f"[predict] {i}/{len(paths)} {path}: SKIPPED ({e})", file=sys.stderr, flush=True)
      continue
    size = image.shape[:2]
    small = conventions.inference_size(*size, max_size)
    pred = predict_one(resize_image(image, small))
    if small != size:
      pred = dataclasses.replace(
          pred,
          raw=resize_mask(pred.raw, size),
          refined=None if pred.refined is None else resize_mask(pred.refined, size),
      )
    written[path] = write_outputs(output_dir, name, image, pred.raw, pred.refined, palette)
    shown.update(np.unique(pred.raw).tolist() + ([] if pred.refined is None else np.unique(pred.refined).tolist()))
    timings.append(pred)
    print(
        _progress(i, len(paths), path, image, pred)
        + (f" [inferred at {small[0]}x{small[1]}, --max_size={max_size}]" if small != size else ""),
        flush=True,
    )
  times = _timing_summary(timings)
  print(
      f"[predict] {len(written)} image(s) -> {output_dir}; per image (mean / median): network "
      f"{1e3 * times['network_s']:.1f} / {1e3 * times['network_median_s']:.1f} ms"
      + (
          f", propagation {1e3 * times['propagation_s']:.1f} / {1e3 * times['propagation_median_s']:.1f} ms"
          if rates
          else ""
      )
      + f"; compilation {times['compile_s']:.1f} s for {times['compilations']} padded size(s)",
      flush=True,
  )
  legend = None
  if shown:
    names = class_names_or_numbers(config, "predict")
    legend = os.path.join(output_dir, LEGEND_NAME)
    Image.fromarray(visualize.legend_image([(names[c], palette[c]) for c in sorted(shown)])).save(legend)
    print(f"[predict] the colours of the {len(shown)} class(es) predicted: {legend}", flush=True)
  return {"written": written, "failed": failed, "skipped": others, "legend": legend, **times}


def load_json_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` training wrote into ``workdir``. JSON turned the config's tuples into lists; they are
  tuples again, as in the config files (so that ``--config.eval.scales='(0.5, 1.0)'`` overrides work). Keys that
  older versions wrote and that no longer exist (``config_checks.RETIRED_KEYS``) are dropped."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise PredictError(
        f"--workdir={workdir}: no config.json there (not a training workdir?); pass --config=FILE "
        "with the config the run was trained with"
    )
  try:
    config, dropped = config_checks.read_json_config(path)
  except (OSError, ValueError) as e:
    raise PredictError(f"cannot read the config {path}: {e}") from None
  if dropped:
    logging.info("%s: ignoring keys older versions wrote: %s", path, dropped)
  return config


def _flags(config: str | ml_collections.ConfigDict | None, argv: Sequence[str] = ()) -> flags.FlagValues:
  """A fresh flag set (no global state, so ``main`` can run several times in one process). ``config``: a config
  file flag (str), the workdir's config with overrides (ConfigDict), or a plain string (first pass); ``argv`` is
  where the config flag looks for its ``--config.KEY=VALUE`` overrides."""
  fv = flags.FlagValues()
  flags.DEFINE_string(
      "workdir", None, "Training workdir: its latest checkpoint (and config.json) are used.", flag_values=fv
  )
  flags.DEFINE_string("input", None, "An image, or a folder of images (.jpg .jpeg .png .bmp .webp).", flag_values=fv)
  flags.DEFINE_string("output", None, "Folder for the outputs (created if missing).", flag_values=fv)
  flags.DEFINE_integer(
      "max_size",
      DEFAULT_MAX_SIZE,
      "Longest image side the network sees: larger images are "
      "downscaled for inference and their masks scaled back (bounds memory); 0 = no limit.",
      flag_values=fv,
  )
  help_text = "Config file (default: <workdir>/config.json); --config.KEY=VALUE overrides either."
  if isinstance(config, str):
    config_flags.DEFINE_config_file("config", None, help_text, flag_values=fv, sys_argv=list(argv))
  elif config is not None:
    config_flags.DEFINE_config_dict("config", config, help_text, flag_values=fv, sys_argv=list(argv))
  else:
    flags.DEFINE_string("config", None, help_text, flag_values=fv)
  return fv


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str, str, str, int]:
  """``(config, workdir, input, output, max_size)`` from the command line (without the program name)."""
  argv = ["predict", *argv]
  first = _flags(None)
  try:
    first(argv, known_only=True)  # --config.KEY=... overrides are left for the second pass
  except flags.Error as e:
    raise PredictError(str(e)) from None
  for name in ("workdir", "input", "output"):
    if not first[name].value:
      raise PredictError(
          f"--{name} is required (python -m dilaff_jax.predict --workdir=DIR --input=FILE_OR_DIR "
          "--output=DIR [--config=FILE])"
      )
  list_images(first.input)  # input errors before config errors: the cheaper mistake first
  check_output_dir(first.output)
  if first.config and not os.path.isfile(first.config.split(":")[0]):
    raise PredictError(f"--config={first.config}: no such config file")
  config = first.config if first.config else load_json_config(first.workdir)
  try:
    fv = _flags(config, argv)  # a config given as a ConfigDict takes its overrides here
    fv(argv)
    config = fv.config
  except Exception as e:  # noqa: BLE001  (a bad value, a --config.KEY naming no key, a failing config file)
    error = cli.flag_error(e, argv[1:], config=None if isinstance(config, str) else config)
    raise PredictError(str(error)) from None
  return config, fv.workdir, fv.input, fv.output, fv.max_size


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry; returns the exit status (2 for bad input, with the message on stderr)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(__doc__ + "\nFlags:\n" + _flags(None).get_help())
    return 0
  logging.set_verbosity(logging.WARNING)
  try:
    host_memory.reuse_freed_memory()
    config, workdir, input_path, output_dir, max_size = parse_args(argv)
    summary = run(config, workdir, input_path, output_dir, max_size)
  except errors.UserError as e:  # only the user's mistakes are turned into exit code 2; a bug keeps its traceback
    if cli.wants_traceback():
      raise
    print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR
  if summary["failed"]:
    print(
        f"error: {len(summary['failed'])} image(s) could not be read (the others were written): "
        + "; ".join(summary["failed"].values()),
        file=sys.stderr,
        flush=True,
    )
    return errors.EXIT_USER_ERROR
  return 0


if __name__ == "__main__":
  sys.exit(main())
