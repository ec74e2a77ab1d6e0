"""Prediction on user images: outputs at each input's exact size that equal an independent computation (pad to
aligned sizes, normalise, predict, propagate with the padding masked out, crop), the workdir's config.json, the
baseline, and every bad input giving exit code 2 with a message naming it."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dilaff_jax import predict, train
from dilaff_jax.engine import checkpoints, config_checks, inference, run_spec, visualize
from dilaff_jax.method import affinity, conventions, propagation
from dilaff_jax.engine import train_state as state_lib
from test_train import REPO, tiny_config

# name -> (size, Pillow mode, file type); the first two and the last two share a padded size (41x57, 65x33)
IMAGES = {
    "a_rgb": ((37, 50), "RGB", "png"),
    "c_rgba": ((38, 52), "RGBA", "png"),
    "b_grey": ((64, 29), "L", "png"),
    "d_photo": ((60, 30), "RGB", "jpg"),
}


def scene(h, w, seed):
  """Two coloured shapes on a noisy background."""
  rng = np.random.default_rng(seed)
  img = np.full((h, w, 3), 40, np.int32)
  img[h // 4 : 3 * h // 4, w // 5 : w // 2] = (220, 30, 30)
  img[h // 3 :, 2 * w // 3 :] = (30, 200, 60)
  return np.clip(img + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)


def write_image(folder, name, size, mode, ext, seed=0):
  rgb = scene(*size, seed)
  if mode == "L":
    img = Image.fromarray(rgb[..., 0])
  elif mode == "RGBA":
    alpha = np.full(size, 160, np.uint8)
    alpha[:5] = 0  # fully transparent rows: the colour there must not matter
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
  else:
    img = Image.fromarray(rgb)
  path = os.path.join(folder, f"{name}.{ext}")
  img.save(path, **({"quality": 90} if ext == "jpg" else {}))
  return path


def save_as_latest(workdir, config, step):
  """Saves the workdir's state (or a fresh one) with :func:`scramble_heads` applied as checkpoint ``step``."""
  spec = run_spec.derive(config)
  compat = checkpoints.compat_record(spec)
  model = state_lib.build_model(spec, axis_name=None)
  state = state_lib.create_train_state(spec, model, jax.random.key(0))
  with checkpoints.opened(workdir, config, write=True) as mngr:
    if mngr.latest_step() is not None:
      state, _ = checkpoints.restore_checkpoint(mngr, state, compat, mngr.latest_step())
    params = scramble_heads(model, {"params": state.params, "batch_stats": state.batch_stats}, config)
    state = state.replace(step=jnp.int32(step), params=params)
    checkpoints.save_checkpoint(mngr, state, {"compat": compat, "step": step})
  return {"params": state.params, "batch_stats": state.batch_stats}


def scramble_heads(model, variables, config):
  """Random classifier and affinity heads on the decoder's features centred on their mean over a scene: a 2-step
  model predicts one class everywhere, which would make every comparison of masks trivially true."""
  mean, std = np.asarray(config.dataset.mean), np.asarray(config.dataset.std)
  x = jnp.asarray(((scene(41, 57, seed=99) - mean) / std)[None], jnp.float32)
  _, inter = model.apply(
      variables, x, train=False, output_stride=8, capture_intermediates=lambda module, method: module.name == "decoder"
  )
  features = np.asarray(inter["intermediates"]["decoder"]["__call__"][0])
  centre, spread = features.mean((0, 1, 2)), features.std((0, 1, 2)).mean()
  rng = np.random.default_rng(7)
  params = jax.tree.map(np.asarray, variables["params"])
  for head in [h for h in ("classifier", "affinity") if h in params]:
    k = params[head]["kernel"]
    kernel = (rng.normal(size=k.shape) * 2 / (spread * np.sqrt(k.shape[-2]))).astype(np.float32)
    params[head]["kernel"] = kernel
    params[head]["bias"] = (-centre @ kernel[0, 0]).astype(np.float32)  # restores check each array's dtype
  return params


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A workdir trained for 2 steps (its config.json and checkpoint), then given scrambled heads (step 3)."""
  workdir = str(tmp_path_factory.mktemp("predict_run"))
  config = tiny_config(data_dir, **{"train.num_steps": 2})
  train.train_and_evaluate(config, workdir)
  variables = save_as_latest(workdir, config, step=3)
  return {"workdir": workdir, "config": config, "variables": variables}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("images"))
  for seed, (name, (size, mode, ext)) in enumerate(IMAGES.items()):
    write_image(folder, name, size, mode, ext, seed)
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not an image: ignored")
  return folder


def read(path):
  return np.asarray(Image.open(path))


def as_rgb(path):
  """The RGB the model must see: grey replicated, alpha composited over white (as Pillow would display it)."""
  img = Image.open(path)
  if img.mode == "RGBA":
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  return np.asarray(img.convert("RGB"))


def reference(config, variables, image):
  """Independent prediction of one image: pad to the next 8k+1 with the mean pixel, predict, propagate with the
  padding's neighbours weighed 0 (brute-force mask), crop. Returns raw/refined probabilities ``[h, w, C]``."""
  h, w = image.shape[:2]
  hp, wp = 8 * -(-(h - 1) // 8) + 1, 8 * -(-(w - 1) // 8) + 1
  mean, std = np.asarray(config.dataset.mean, np.float32), np.asarray(config.dataset.std, np.float32)
  padded = np.broadcast_to(mean, (hp, wp, 3)).copy()
  padded[:h, :w] = image
  x = jnp.asarray(((padded - mean) / std)[None])
  rates = config_checks.rates_of(config)
  model = state_lib.build_model(run_spec.derive(config), axis_name=None)
  probs, aff = inference.predict(
      model.apply,
      variables,
      x,
      size=(hp, wp),
      output_stride=8,
      scales=(1.0,),
      flip=False,
      rates=rates,
      mu=config.affinity.mu,
  )
  inside = np.zeros(aff.shape, np.float32)
  for c, (s, t) in enumerate(affinity.neighbor_offsets(rates)):
    for i in range(hp):
      for j in range(wp):
        inside[0, i, j, c] = 0 <= i + s < h and 0 <= j + t < w
  refined = propagation.propagate(
      probs, aff * inside, rates, lam=config.affinity.lam, iterations=config.affinity.iterations
  )
  return np.asarray(probs)[0, :h, :w], np.asarray(refined)[0, :h, :w]


def assert_same_labels(mask, probs, what):
  """``mask`` is the argmax of ``probs`` wherever the top two classes are not within float noise of each other."""
  top2 = np.sort(probs, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4
  assert clear.mean() > 0.95, what
  np.testing.assert_array_equal(mask[clear], probs.argmax(-1)[clear], err_msg=what)


# ---------------------------------------------------------------------------------------------- units


def test_aligned_sizes_and_output_names():
  assert [predict.aligned_size(n, 8) for n in (1, 2, 9, 10, 33, 37, 50)] == [1, 9, 9, 17, 33, 41, 57]
  assert predict.aligned_size(513, 16) == 513 and predict.aligned_size(514, 16) == 529
  assert predict.output_names(["x/a.jpg", "x/b.png", "x/a.PNG"]) == ["a_jpg", "b", "a_png"]


def test_read_image_gives_upright_rgb_for_every_mode(tmp_path):
  rgb = scene(5, 7, seed=1)
  cases = {
      "grey.png": (Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1)),
      "deep.png": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), np.repeat(rgb[..., :1], 3, -1)),
      "half.png": (
          Image.fromarray(np.dstack([rgb, np.full((5, 7), 51, np.uint8)]), "RGBA"),
          np.round(0.2 * rgb + 0.8 * 255).astype(np.uint8),
      ),
  }
  rotated = Image.fromarray(rgb)
  exif = rotated.getexif()
  exif[0x0112] = 6  # orientation: the camera was turned, show the picture rotated by 90° clockwise
  rotated.save(tmp_path / "turned.png", exif=exif)
  for name, (img, want) in cases.items():
    img.save(tmp_path / name)
    got = predict.read_image(str(tmp_path / name))
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3), name
    np.testing.assert_allclose(got, want, atol=1, err_msg=name)
  np.testing.assert_array_equal(predict.read_image(str(tmp_path / "turned.png")), np.rot90(rgb, -1))


def test_refine_on_padded_arrays_equals_propagation_of_the_cropped_image():
  rates = affinity.expand_rates([1, (2, 3)])
  rng = np.random.default_rng(0)
  h, w, hp, wp, c = 13, 19, 17, 25, 4
  probs = rng.dirichlet(np.ones(c), size=(1, hp, wp)).astype(np.float32)
  probs[:, h:], probs[:, :, w:] = np.eye(c)[0], np.eye(c)[0]  # the padding screams class 0
  aff = rng.uniform(size=(1, hp, wp, 8 * len(rates))).astype(np.float32)
  kw = dict(rates=rates, lam=1.0, iterations=4)
  got = np.asarray(predict._refine(jnp.asarray(probs), jnp.asarray(aff), jnp.int32(h), jnp.int32(w), **kw))[:h, :w]
  want = np.asarray(propagation.propagate(probs[:, :h, :w], aff[:, :h, :w], rates, lam=1.0, iterations=4))[0]
  assert_same_labels(got, want, "masked padding")
  unmasked = np.asarray(propagation.propagate(probs, aff, rates, lam=1.0, iterations=4))[0, :h, :w].argmax(-1)
  assert np.sum(unmasked != want.argmax(-1)) > 5  # the padding would have pulled pixels to class 0


# ---------------------------------------------------------------------------------------------- end to end


def test_predict_folder_matches_independent_prediction(trained, images, tmp_path, capsys):
  out = str(tmp_path / "out")  # created by predict; no --config: <workdir>/config.json is used
  assert predict.main([f"--workdir={trained['workdir']}", f"--input={images}", f"--output={out}"]) == 0
  stdout = capsys.readouterr().out
  assert "checkpoint step 3" in stdout and "propagation: 3 iterations" in stdout
  assert stdout.count("[predict] ") == 3 + len(IMAGES)  # header, one line per image, summary, legend
  summary = stdout.strip().splitlines()[-2]
  assert "4 image(s)" in summary and "network" in summary and "propagation" in summary, summary
  assert "compilation" in summary and "for 2 padded size(s)" in summary, summary  # 41x57 and 65x33
  want_files = sorted(f"{n}_{k}.png" for n in IMAGES for k in ("seg", "refined", "mask"))
  assert sorted(os.listdir(out)) == sorted(want_files + [predict.LEGEND_NAME])
  palette = visualize.palette_for(trained["config"].dataset.name)
  in_masks = set().union(*(np.unique(read(os.path.join(out, f"{n}_mask.png"))).tolist() for n in IMAGES))
  legend = read(os.path.join(out, predict.LEGEND_NAME))
  rows = legend.shape[0] // 20
  assert legend.shape[0] == 20 * rows and f"{rows} class(es) predicted" in stdout.splitlines()[-1]
  swatches = [legend[20 * row + 10, 10] for row in range(rows)]  # one swatch per class predicted, in class order
  listed = [next(c for c in range(len(palette)) if np.array_equal(palette[c], s)) for s in swatches]
  assert listed == sorted(listed) and in_masks <= set(listed), (listed, in_masks)  # raw predictions may add some
  changed = varied = 0
  for name, (size, _, ext) in IMAGES.items():
    image = as_rgb(os.path.join(images, f"{name}.{ext}"))
    mask = read(os.path.join(out, f"{name}_mask.png"))
    assert Image.open(os.path.join(out, f"{name}_mask.png")).mode == "L"
    assert mask.shape == size
    raw_probs, refined_probs = reference(trained["config"], trained["variables"], image)
    assert_same_labels(mask, refined_probs, name)
    for kind, probs in (("seg", raw_probs), ("refined", refined_probs)):
      blend = read(os.path.join(out, f"{name}_{kind}.png"))
      assert blend.shape == (*size, 3), (name, kind)
      want = visualize.blend(image, visualize.colorize(probs.argmax(-1), palette))
      assert np.mean(np.all(blend == want, -1)) > 0.95, (name, kind)
    # scrambled heads: the comparisons above are not trivial, and propagation changed some pixels
    assert len(np.unique(raw_probs.argmax(-1))) >= 3, name
    varied += len(np.unique(mask)) >= 2
    changed += np.sum(refined_probs.argmax(-1) != raw_probs.argmax(-1))
  assert varied >= 3 and changed > 100, (varied, changed)


def test_config_file_with_overrides_and_zero_iterations(trained, images, tmp_path, capsys):
  out = str(tmp_path / "out")
  rgb = os.path.join(images, "a_rgb.png")
  argv = [
      f"--workdir={trained['workdir']}",
      f"--input={rgb}",
      f"--output={out}",
      f"--config={os.path.join(REPO, 'configs', 'synthetic.py')}:tiny",
      "--config.affinity.iterations=0",
  ]
  assert predict.main(argv) == 0
  assert "propagation: 0 iterations" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["a_rgb_mask.png", "a_rgb_refined.png", "a_rgb_seg.png", predict.LEGEND_NAME]
  np.testing.assert_array_equal(read(os.path.join(out, "a_rgb_refined.png")), read(os.path.join(out, "a_rgb_seg.png")))
  raw_probs, _ = reference(trained["config"], trained["variables"], as_rgb(rgb))
  assert_same_labels(read(os.path.join(out, "a_rgb_mask.png")), raw_probs, "iterations=0")


def test_workdir_config_json_round_trips(trained):
  config = predict.load_json_config(trained["workdir"])
  assert config.to_dict() == trained["config"].to_dict()  # every key, tuples included (JSON wrote them as lists)
  assert config_checks.rates_of(config) == ((4, 4), (6, 12), (12, 6), (8, 8))
  config_checks.validate(config, num_devices=1, mode="predict")


def test_config_json_of_an_older_version_loads_without_its_retired_keys(trained, tmp_path):
  with open(os.path.join(trained["workdir"], "config.json")) as f:
    old = json.load(f)
  old["model"]["eval_output_stride"] = 8  # written by versions before 2026-11-26, never read
  workdir = tmp_path / "old_run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(old))
  config = predict.load_json_config(str(workdir))
  assert config.to_dict() == trained["config"].to_dict()
  state_lib.build_model(run_spec.derive(config))  # refuses unknown model keys


def test_baseline_writes_raw_outputs_only(data_dir, images, tmp_path):
  config = tiny_config(data_dir, **{"affinity.enabled": False})
  workdir = str(tmp_path / "baseline")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  save_as_latest(workdir, config, step=1)
  out = str(tmp_path / "out")
  grey = os.path.join(images, "b_grey.png")
  assert predict.main([f"--workdir={workdir}", f"--input={grey}", f"--output={out}"]) == 0
  assert sorted(os.listdir(out)) == ["b_grey_mask.png", "b_grey_seg.png", predict.LEGEND_NAME]
  mask = read(os.path.join(out, "b_grey_mask.png"))
  assert mask.shape == IMAGES["b_grey"][0] and len(np.unique(mask)) >= 2
  palette = visualize.palette_for(config.dataset.name)
  want = visualize.blend(as_rgb(grey), visualize.colorize(mask, palette))
  np.testing.assert_array_equal(read(os.path.join(out, "b_grey_seg.png")), want)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_exit_2_naming_the_culprit(trained, images, tmp_path, capsys):
  workdir = trained["workdir"]
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images here")
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"this is not a PNG")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  empty_ckpt = tmp_path / "empty_ckpt"
  (empty_ckpt / "checkpoints").mkdir(parents=True)
  cfg = f"--config={os.path.join(REPO, 'configs', 'synthetic.py')}:tiny"
  rgb = os.path.join(images, "a_rgb.png")
  cases = {
      "missing input": (
          [f"--workdir={workdir}", f"--input={tmp_path / 'nope.jpg'}", f"--output={tmp_path}/o"],
          f"--input={tmp_path / 'nope.jpg'}: no such file or folder",
      ),
      "folder without images": (
          [f"--workdir={workdir}", f"--input={empty}", f"--output={tmp_path}/o"],
          f"--input={empty}: the folder has no images",
      ),
      "corrupt image": (
          [f"--workdir={workdir}", f"--input={garbage}", f"--output={tmp_path}/o"],
          f"cannot read image {garbage}",
      ),
      "output is a file": (
          [f"--workdir={workdir}", f"--input={rgb}", f"--output={a_file}"],
          f"--output={a_file} is a file",
      ),
      "no checkpoint": (
          [f"--workdir={no_ckpt}", f"--input={rgb}", f"--output={tmp_path}/o", cfg],
          f"--workdir={no_ckpt}: no checkpoint in {no_ckpt}/checkpoints (no such folder)",
      ),
      "empty checkpoints": (
          [f"--workdir={empty_ckpt}", f"--input={rgb}", f"--output={tmp_path}/o", cfg],
          f"--workdir={empty_ckpt}: no checkpoint in {empty_ckpt}/checkpoints: train first",
      ),
      "no config": (
          [f"--workdir={no_ckpt}", f"--input={rgb}", f"--output={tmp_path}/o"],
          f"--workdir={no_ckpt}: no config.json",
      ),
      "missing flag": ([f"--input={rgb}", f"--output={tmp_path}/o"], "--workdir is required"),
      "misspelt flag": (
          [f"--workdir={workdir}", f"--input={rgb}", f"--output={tmp_path}/o", "--config.afinity.lam=1"],
          "config.afinity.lam: no such key; did you mean config.affinity.lam?",
      ),
  }
  for what, (argv, message) in cases.items():
    assert predict.main(argv) == 2, what
    err = capsys.readouterr().err
    assert f"error: {message}" in err, (what, err)
  assert not os.path.exists(no_ckpt / "checkpoints")  # looking for a checkpoint created nothing
  assert not os.path.exists(tmp_path / "o")  # no output folder for a run that failed before predicting


def test_truncated_image_in_a_folder_is_reported_after_the_others(trained, tmp_path, capsys):
  folder = tmp_path / "mixed"
  folder.mkdir()
  write_image(str(folder), "good", (37, 50), "RGB", "png")
  write_image(str(folder), "cut", (37, 50), "RGB", "jpg")
  data = (folder / "cut.jpg").read_bytes()
  (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # a valid header, half the data
  out = tmp_path / "out"
  assert predict.main([f"--workdir={trained['workdir']}", f"--input={folder}", f"--output={out}"]) == 2
  err = capsys.readouterr().err
  assert "error: 1 image(s) could not be read (the others were written): " in err
  assert f"cannot read image {folder / 'cut.jpg'}: " in err
  assert sorted(os.listdir(out)) == ["good_mask.png", "good_refined.png", "good_seg.png", predict.LEGEND_NAME]


def test_command_line_exits_2_on_a_missing_input(tmp_path):
  missing = tmp_path / "missing"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "dilaff_jax.predict",
          f"--workdir={tmp_path}",
          f"--input={missing}",
          f"--output={tmp_path / 'out'}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert f"error: --input={missing}: no such file or folder" in proc.stderr


def test_unreadable_files_among_good_ones_are_skipped_and_listed(trained, tmp_path, capsys):
  folder = tmp_path / "mixed"
  folder.mkdir()
  write_image(str(folder), "a_good", (37, 50), "RGB", "png")
  (folder / "b_garbage.png").write_bytes(b"this is not a PNG")  # no readable header
  (folder / "c_empty.jpg").write_bytes(b"")
  write_image(str(folder), "d_good", (30, 41), "RGB", "jpg", seed=2)
  write_image(str(folder), "e_tiff", (30, 41), "RGB", "tif", seed=3)  # read, not skipped
  (folder / "notes.txt").write_text("not an image")
  (folder / "f.gif").write_bytes(b"GIF89a")
  out = tmp_path / "out"
  assert predict.main([f"--workdir={trained['workdir']}", f"--input={folder}", f"--output={out}"]) == 2
  captured = capsys.readouterr()
  last = captured.err.strip().splitlines()[-1]
  assert last.startswith("error: 2 image(s) could not be read (the others were written): "), last
  for bad in ("b_garbage.png", "c_empty.jpg"):
    assert f"cannot read image {folder / bad}" in last, last
  assert sorted(os.listdir(out)) == sorted(
      [f"{n}_{k}.png" for n in ("a_good", "d_good", "e_tiff") for k in ("mask", "refined", "seg")]
      + [predict.LEGEND_NAME]
  )
  assert "4/5" in captured.out and "5/5" in captured.out  # the good images after the bad ones were predicted
  assert "skipping 2 file(s)" in captured.err and "f.gif, notes.txt" in captured.err  # listed, never silent


def test_unwritable_output_folder_fails_before_loading_the_model(images, tmp_path):
  """A read-only output folder (and a folder to be created under it) is refused at once. As root, whom permissions
  do not stop, the command runs without the capability to override them (setpriv)."""
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  readonly.chmod(0o555)
  drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
  rgb = os.path.join(images, "a_rgb.png")
  try:
    for output, message in (
        (readonly, f"--output={readonly}: the folder is not writable (Permission denied)"),
        (
            readonly / "sub" / "dir",
            f"--output={readonly}/sub/dir: its parent {readonly} is not " "writable (Permission denied)",
        ),
    ):
      proc = subprocess.run(
          [
              *drop,
              sys.executable,
              "-m",
              "dilaff_jax.predict",
              f"--workdir={tmp_path / 'no_run'}",
              f"--input={rgb}",
              f"--output={output}",
              f"--config={os.path.join(REPO, 'configs', 'synthetic.py')}:tiny",
          ],
          cwd=REPO,
          capture_output=True,
          text=True,
          timeout=300,
      )
      assert proc.returncode == 2, proc.stderr[-3000:]
      # checked before the model: the missing checkpoint of --workdir is never reached
      assert proc.stderr.strip().splitlines()[-1] == f"error: {message}: give a folder you can write to", proc.stderr
      assert "Traceback" not in proc.stderr
    assert os.listdir(readonly) == []
  finally:
    readonly.chmod(0o755)


def test_inference_size_bounds_the_longer_side():
  assert conventions.inference_size(4000, 6000, 2048) == (1365, 2048)
  assert conventions.inference_size(6000, 4000, 2048) == (2048, 1365)
  assert conventions.inference_size(100, 50, 2048) == (100, 50)
  assert conventions.inference_size(4000, 6000, 0) == (4000, 6000)
  assert conventions.inference_size(3, 5000, 100) == (1, 100)
  mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
  big = predict.resize_mask(mask, (6, 8))
  np.testing.assert_array_equal(big, np.repeat(np.repeat(mask, 2, 0), 2, 1))  # nearest: every value kept


def test_max_size_predicts_downscaled_and_writes_at_the_original_size(trained, images, tmp_path, capsys):
  out = str(tmp_path / "out")
  rgb = os.path.join(images, "a_rgb.png")  # 37 x 50: inferred at 24 x 32
  assert (
      predict.main(
          [
              f"--workdir={trained['workdir']}",
              f"--input={rgb}",
              f"--output={out}",
              "--max_size=32",
              "--config.affinity.iterations=0",
          ]
      )
      == 0
  )  # the raw prediction: several classes
  assert "[inferred at 24x32, --max_size=32]" in capsys.readouterr().out
  mask = read(os.path.join(out, "a_rgb_mask.png"))
  assert mask.shape == (37, 50) and read(os.path.join(out, "a_rgb_seg.png")).shape == (37, 50, 3)
  small = predict.resize_image(as_rgb(rgb), (24, 32))
  raw_probs, _ = reference(trained["config"], trained["variables"], small)
  top2 = np.sort(raw_probs, -1)[..., -2:]
  clear = predict.resize_mask((top2[..., 1] - top2[..., 0] > 1e-4).astype(np.uint8), (37, 50)) == 1
  assert clear.mean() > 0.9
  want = predict.resize_mask(raw_probs.argmax(-1).astype(np.uint8), (37, 50))
  np.testing.assert_array_equal(mask[clear], want[clear])
  assert len(np.unique(mask)) >= 2


def test_export_names_a_read_only_filesystem_and_a_missing_permission_apart(tmp_path, monkeypatch):
  from dilaff_jax import export

  real = os.statvfs
  ro = type("StatVfs", (), {"f_flag": os.ST_RDONLY})()
  monkeypatch.setattr(os, "statvfs", lambda p: ro)
  with pytest.raises(export.ExportError, match=f"cannot write {tmp_path}/m.jaxexport: {tmp_path} is on a read-only "):
    export.check_output(str(tmp_path / "m.jaxexport"))
  monkeypatch.setattr(os, "statvfs", real)
  export.check_output(str(tmp_path / "m.jaxexport"))  # writable: passes
  monkeypatch.setattr(os, "access", lambda p, mode: False)
  with pytest.raises(export.ExportError, match="no write permission"):
    export.check_output(str(tmp_path / "m.jaxexport"))
