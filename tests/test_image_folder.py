"""Users' own data: the ``image_folder`` dataset (layout, split, mask checks, one prepared copy per folder state),
training ``configs/image_folder.py:small`` on it, evaluation with its class names, prediction, and the exported
artifact reloaded by a plain JAX program that gives predict's masks."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import image_folder as image_folder_config
from dilaff_jax import datasets, errors, export, predict, train
from dilaff_jax.method import neighbour_stats
from dilaff_jax.research import stats
from dilaff_jax.engine import checkpoints, run_spec, visualize
from dilaff_jax.engine import train_state as state_lib
from dilaff_jax.datasets import image_folder, prepare, shapes_render
from cli_helpers import run_outside_the_project
from test_train import REPO

CLASSES = list(shapes_render.CLASS_NAMES)


def write_folder(folder, count=24, seed=0, classes=True):
  """``count`` rendered scenes (40-56 px) as images/ and masks/: image 0 grey, 1 RGBA (half transparent), 2 a JPEG,
  mask 3 a palette PNG; the rest RGB PNGs with greyscale masks. Every mask's first row starts with one pixel of each
  class, so that every split of even a small folder has all classes. Returns ``{name: (rgb the model sees, label)}``."""
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
  if classes:
    with open(os.path.join(folder, "classes.txt"), "w") as f:
      f.write("\n".join(CLASSES) + "\n")
  out = {}
  for i in range(count):
    rng = np.random.default_rng((seed, i))
    h, w = (int(v) for v in rng.integers(40, 57, size=2))
    rgb, label = shapes_render.render_scene(rng, height=h, width=w, max_objects=3)
    label[0, : len(CLASSES)] = np.arange(len(CLASSES))
    name = f"scene_{i:03d}"
    if i == 0:
      Image.fromarray(rgb[..., 1]).save(os.path.join(folder, "images", name + ".png"))
      rgb = np.repeat(rgb[..., 1:2], 3, axis=-1)
    elif i == 1:
      alpha = np.full((h, w), 255, np.uint8)
      alpha[:, : w // 2] = 0
      Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(os.path.join(folder, "images", name + ".png"))
      rgb = rgb.copy()
      rgb[:, : w // 2] = 255  # transparent: the white it is displayed on
    elif i == 2:
      Image.fromarray(rgb).save(os.path.join(folder, "images", name + ".jpg"), quality=95)
      rgb = np.asarray(Image.open(os.path.join(folder, "images", name + ".jpg")).convert("RGB"))
    else:
      Image.fromarray(rgb).save(os.path.join(folder, "images", name + ".png"))
    mask = Image.fromarray(label, "L")
    if i == 3:  # VOC-style palette PNG: the indices are the classes, the colours are not
      mask = Image.fromarray(label, "P")
      mask.putpalette(visualize.palette_for("voc").reshape(-1).tolist())
    mask.save(os.path.join(folder, "masks", name + ".png"))
    out[name] = (rgb, label)
  return out


def small_config(folder, data_dir, **overrides):
  """``configs/image_folder.py:small`` shrunk for tests (8 virtual devices, crop 33, 2 steps)."""
  c = image_folder_config.get_config("small")
  c.dataset.manual_dir = folder
  c.dataset.data_dir = data_dir
  c.dataset.crop_size = 33
  c.model.aspp_channels, c.model.low_level_channels, c.model.decoder_channels = 16, 8, 16
  c.train.batch_size = c.eval.batch_size = 8
  c.train.num_steps = 2
  c.train.log_every = c.train.checkpoint_every = 2
  c.train.image_summary_every = 0
  c.eval.iterations = (0, 1)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  datasets.resolve_num_classes(c.dataset)
  return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("own_data"))
  return path, write_folder(path)


def test_split_is_90_10_by_name_and_stable(folder):
  path, scenes = folder
  splits = image_folder.scan(path)
  val = {e.name for e in splits["val"]}
  train_names = {e.name for e in splits["train"]}
  assert val | train_names == set(scenes) and not val & train_names
  assert val == {n for n in scenes if image_folder.in_val(n)} and val  # 24 names: the hash puts 2 in val
  extra = str(os.path.join(os.path.dirname(path), "more"))
  shutil.copytree(path, extra)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(extra, "masks", "zz.png"))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(extra, "images", "zz.png"))
  more = {e.name for e in image_folder.scan(extra)["val"]}
  assert more - {"zz"} == val  # adding an image moves no other image between splits


def test_prepared_examples_keep_indices_and_convert_images(folder, tmp_path):
  path, scenes = folder
  builder = datasets.get_builder("image_folder", data_dir=str(tmp_path), manual_dir=path)
  assert datasets.class_names(builder) == CLASSES
  seen = {}
  for split in ("train", "val"):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      seen[ex["image_id"].decode()] = (ex["image"], ex["label"][..., 0])
  assert set(seen) == set(scenes)
  for name, (rgb, label) in scenes.items():
    np.testing.assert_array_equal(seen[name][1], label, err_msg=name)  # scene_003: palette indices, not colours
    np.testing.assert_array_equal(seen[name][0], rgb, err_msg=name)  # grey replicated, RGBA over white, JPEG as read
  assert (
      set(np.unique(scenes["scene_003"][1])) - {255}
      and (
          np.asarray(Image.open(os.path.join(path, "masks", "scene_003.png")).convert("L")) != scenes["scene_003"][1]
      ).any()
  )


def test_prepare_prints_splits_classes_and_a_stats_command_that_runs(folder, tmp_path, capsys, monkeypatch):
  path, scenes = folder
  data_dir = str(tmp_path / "tfds")
  assert prepare.main(["--dataset=image_folder", f"--manual_dir={path}", f"--data_dir={data_dir}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  n_val = sum(image_folder.in_val(n) for n in scenes)
  assert f"image_folder/1.0.0 train: {len(scenes) - n_val} examples" in lines
  assert f"image_folder/1.0.0 val: {n_val} examples" in lines
  assert f"classes: {', '.join(CLASSES)}" in lines
  (hint,) = [line for line in lines if "python -m dilaff_jax.research.stats" in line]
  argv = hint.split("python -m dilaff_jax.research.stats ", 1)[1].split()
  monkeypatch.chdir(tmp_path)  # the printed command writes stats.json where it is run
  assert stats.main(argv) == 0  # copied as printed, it runs on the prepared copy
  with open(tmp_path / "stats.json") as f:
    written = neighbour_stats.AffinityStats.from_json(json.load(f))
  train_labels = [label for name, (_, label) in sorted(scenes.items()) if not image_folder.in_val(name)]
  expected = neighbour_stats.compute_stats(train_labels, written.rates)  # the folder's own train masks
  assert written.counts.images == len(train_labels) and len(written.rates) == 4  # 8, 12x24, 24x12, 16
  np.testing.assert_array_equal(written.counts.category, expected.counts.category)


def test_prepare_reports_the_largest_image_of_each_split_and_warns_beyond_2048_a_side(tmp_path, capsys):
  path = str(tmp_path / "wide")
  scenes = write_folder(path, count=3)
  rgb, label = shapes_render.render_scene(np.random.default_rng(9), height=12, width=2100, max_objects=2)
  Image.fromarray(rgb).save(os.path.join(path, "images", "panorama.png"))
  Image.fromarray(label, "L").save(os.path.join(path, "masks", "panorama.png"))
  os.makedirs(os.path.join(path, "splits"))
  with open(os.path.join(path, "splits", "train.txt"), "w") as f:
    f.write("scene_000\nscene_001\n")
  with open(os.path.join(path, "splits", "val.txt"), "w") as f:
    f.write("scene_002\npanorama\n")
  assert prepare.main(["--dataset=image_folder", f"--manual_dir={path}", f"--data_dir={tmp_path / 'tfds'}"]) == 0
  out, err = capsys.readouterr()
  largest = max(("scene_000", "scene_001"), key=lambda n: scenes[n][1].size)
  h, w = scenes[largest][1].shape
  assert f"image_folder/1.0.0 train: largest image {largest} ({h}x{w})" in out.splitlines()
  assert "image_folder/1.0.0 val: largest image panorama (12x2100)" in out.splitlines()
  (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
  assert "val split's largest image panorama is 12x2100 pixels, more than 2048 a side" in warning
  assert "config.dataset.eval_max_size" in warning
  os.remove(os.path.join(path, "images", "panorama.png"))
  os.remove(os.path.join(path, "masks", "panorama.png"))
  with open(os.path.join(path, "splits", "val.txt"), "w") as f:
    f.write("scene_002\n")
  assert prepare.main(["--dataset=image_folder", f"--manual_dir={path}", f"--data_dir={tmp_path / 'tfds'}"]) == 0
  assert "warning:" not in capsys.readouterr().err


def test_each_folder_state_has_its_own_prepared_copy(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  write_folder(a, count=3)
  write_folder(b, count=3)
  root = str(tmp_path / "tfds")
  where = lambda p: datasets.location("image_folder", data_dir=root, manual_dir=p)[1]
  first = where(a)
  assert first == where(a) and first != where(b)  # same contents, other path: another copy
  assert os.path.dirname(first) == os.path.join(root, "image_folder_prepared")
  builder = datasets.get_builder("image_folder", data_dir=root, manual_dir=a)
  assert builder.data_dir_root == first or str(builder.data_dir_root) == first
  image = os.path.join(a, "images", "scene_001.png")
  Image.fromarray(np.full((9, 9, 3), 7, np.uint8)).save(image)
  os.remove(os.path.join(a, "masks", "scene_001.png"))
  Image.fromarray(np.zeros((9, 9), np.uint8)).save(os.path.join(a, "masks", "scene_001.png"))
  changed = where(a)
  assert changed != first
  rebuilt = datasets.get_builder("image_folder", data_dir=root, manual_dir=a)
  sizes = {
      ex["image_id"].decode(): ex["image"].shape[:2]
      for s in ("train", "val")
      for ex in tfds.as_numpy(rebuilt.as_dataset(split=s))
  }
  assert sizes["scene_001"] == (9, 9)
  os.remove(os.path.join(a, "classes.txt"))  # class_0.. from num_classes; the count is part of the key
  assert where(a) != changed
  four = datasets.location("image_folder", data_dir=root, manual_dir=a, num_classes=7)[1]
  assert four != datasets.location("image_folder", data_dir=root, manual_dir=a, num_classes=6)[1]
  with pytest.raises(image_folder.EmptyClassError, match=r"'class_6' \(6\) have no pixel in the 2 training masks"):
    datasets.get_builder("image_folder", data_dir=root, manual_dir=a, num_classes=7)  # no mask holds a 6
  named = datasets.get_builder("image_folder", data_dir=root, manual_dir=a, num_classes=6)
  assert datasets.class_names(named) == [f"class_{i}" for i in range(6)]


def _broken(tmp_path, name, edit):
  folder = str(tmp_path / name)
  write_folder(folder, count=4)
  edit(folder)
  return folder


def _error(folder, num_classes=0, tmp=None):
  with pytest.raises(errors.UserError) as info:
    datasets.get_builder(
        "image_folder", data_dir=os.path.join(folder, "..", "tfds"), manual_dir=folder, num_classes=num_classes
    )
  message = str(info.value)
  assert "\n" not in message, message
  return message


def test_mistakes_are_one_line_errors_naming_file_and_values(tmp_path):
  def missing_mask(f):
    os.remove(os.path.join(f, "masks", "scene_002.png"))

  def bad_value(f):
    label = np.asarray(Image.open(os.path.join(f, "masks", "scene_001.png"))).copy()
    label[:2, :3] = 9
    label[5, 5] = 200
    Image.fromarray(label).save(os.path.join(f, "masks", "scene_001.png"))

  def rgb_mask(f):
    label = np.asarray(Image.open(os.path.join(f, "masks", "scene_000.png")))
    Image.fromarray(np.dstack([label] * 3)).save(os.path.join(f, "masks", "scene_000.png"))

  def wrong_size(f):
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(os.path.join(f, "masks", "scene_002.png"))

  message = _error(_broken(tmp_path, "missing", missing_mask))
  assert "scene_002" in message and "no mask" in message and "unlabeled.txt" in message
  message = _error(_broken(tmp_path, "value", bad_value))
  assert "scene_001.png" in message and "9 (6 px)" in message and "200 (1 px)" in message and "0-5" in message
  message = _error(_broken(tmp_path, "rgb", rgb_mask))
  assert "scene_000.png" in message and "'RGB'" in message
  message = _error(_broken(tmp_path, "size", wrong_size))
  assert "scene_002.png is 12x10" in message
  no_classes = _broken(tmp_path, "noclasses", lambda f: os.remove(os.path.join(f, "classes.txt")))
  assert "num_classes" in _error(no_classes)
  assert "lists 6 classes but config.dataset.num_classes = 4" in _error(
      _broken(tmp_path, "count", lambda f: None), num_classes=4
  )
  with pytest.raises(errors.UserError, match="manual_dir is not set"):
    datasets.location("image_folder", manual_dir=None)


def test_unlabeled_split_keeps_images_without_masks(tmp_path):
  folder = str(tmp_path / "unlabeled")
  write_folder(folder, count=5)
  os.remove(os.path.join(folder, "masks", "scene_004.png"))
  os.makedirs(os.path.join(folder, "splits"))
  with open(os.path.join(folder, "splits", "unlabeled.txt"), "w") as f:
    f.write("scene_004\n")
  builder = datasets.get_builder("image_folder", data_dir=str(tmp_path / "tfds"), manual_dir=folder)
  (ex,) = tfds.as_numpy(builder.as_dataset(split="unlabeled"))
  assert ex["image_id"] == b"scene_004" and (ex["label"] == 255).all()
  assert builder.info.splits["train"].num_examples + builder.info.splits["val"].num_examples == 4


def scramble_heads(workdir, config, image, step):
  """Saves checkpoint ``step``: the workdir's state with random classifier and affinity heads centred on the decoder
  features of ``image`` (a 2-step model predicts one class everywhere, which would make comparisons of masks
  trivially true). Returns the variables."""
  spec = run_spec.derive(config)
  compat = checkpoints.compat_record(spec)
  model = state_lib.build_model(spec, axis_name=None)
  with checkpoints.opened(workdir, config) as mngr:
    state, _ = checkpoints.restore_checkpoint(mngr, state_lib.state_template(spec), compat, mngr.latest_step())
  x = jnp.asarray(predict.normalise_and_pad(image, config.dataset.mean, config.dataset.std, 8))
  _, inter = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      x,
      train=False,
      output_stride=8,
      capture_intermediates=lambda module, method: module.name == "decoder",
  )
  features = np.asarray(inter["intermediates"]["decoder"]["__call__"][0])
  centre, spread = features.mean((0, 1, 2)), features.std((0, 1, 2)).mean()
  rng = np.random.default_rng(7)
  params = jax.tree.map(np.asarray, state.params)
  for head in ("classifier", "affinity"):
    k = params[head]["kernel"]
    params[head]["kernel"] = (rng.normal(size=k.shape) * 2 / (spread * np.sqrt(k.shape[-2]))).astype(np.float32)
    params[head]["bias"] = (-centre @ params[head]["kernel"][0, 0]).astype(np.float32)  # checkpoints keep dtypes
  state = state.replace(step=jnp.int32(step), params=params)
  with checkpoints.opened(workdir, config, write=True) as mngr:
    checkpoints.save_checkpoint(mngr, state, {"compat": compat, "step": step})
  return {"params": params, "batch_stats": state.batch_stats}


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
  """``:small`` trained 2 steps on the folder and evaluated, then given scrambled heads (checkpoint 3) so that
  masks are not one class everywhere."""
  path, scenes = folder
  workdir = str(tmp_path_factory.mktemp("own_run"))
  config = small_config(path, str(tmp_path_factory.mktemp("own_tfds")))
  result = train.train_and_evaluate(config, workdir)
  variables = scramble_heads(workdir, config, scenes["scene_005"][0], step=3)
  return {"workdir": workdir, "config": config, "result": result, "variables": variables}


def test_small_config_trains_evaluates_and_predicts(trained, folder, tmp_path):
  path, scenes = folder
  assert trained["config"].dataset.num_classes == len(CLASSES) and trained["config"].model.depth == 18
  results = trained["result"]["eval"]
  assert results["num_images"] == len(image_folder.scan(path)["val"]) > 0
  assert results["class_names"] == CLASSES
  assert set(results["sweep"]["iterations"]) == {0, 1} and len(results["per_class_iou"]) == len(CLASSES)
  out_dir = os.path.join(trained["workdir"], "eval", "step_2")
  markdown = open(os.path.join(out_dir, "results.md")).read()
  assert all(name in markdown for name in CLASSES)
  assert os.path.getsize(os.path.join(out_dir, "affinity_accuracy.png")) and os.path.getsize(
      os.path.join(out_dir, "examples.png")
  )
  assert os.path.isfile(os.path.join(trained["workdir"], "affinity_stats.json"))
  out = str(tmp_path / "pred")
  image = os.path.join(path, "images", "scene_005.png")
  assert predict.main([f"--workdir={trained['workdir']}", f"--input={image}", f"--output={out}"]) == 0
  mask = np.asarray(Image.open(os.path.join(out, "scene_005_mask.png")))
  assert mask.shape == scenes["scene_005"][1].shape and mask.max() < len(CLASSES)


def test_main_takes_the_classes_from_the_folder(folder, tmp_path):
  """The README's command line: num_classes comes from classes.txt; a broken folder is one error line, exit 2."""
  path, _ = folder
  broken = str(tmp_path / "broken")
  shutil.copytree(path, broken)
  os.remove(os.path.join(broken, "masks", "scene_007.png"))
  cmd = [
      sys.executable,
      "-m",
      "dilaff_jax.main",
      "--config=configs/image_folder.py:small",
      f"--workdir={tmp_path / 'w'}",
      f"--config.dataset.manual_dir={broken}",
      f"--config.dataset.data_dir={tmp_path / 'tfds'}",
      "--config.eval.batch_size=8",
  ]  # 8 virtual devices
  run = subprocess.run(
      cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO}
  )
  assert run.returncode == 2, run.stderr[-2000:]
  lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "scene_007" in lines[0] and "Traceback" not in run.stderr


RELOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
    images = np.load(sys.argv[2])
    mask, probs = exported.call(images)
    np.save(sys.argv[3], np.asarray(mask))
    np.save(sys.argv[4], np.asarray(probs))
    print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("dilaff"))}))
""")


def test_exported_artifact_gives_predicts_masks_without_the_project(trained, folder, tmp_path, capsys):
  path, scenes = folder
  size = (48, 53)  # not aligned to the output stride: padding inside the artifact
  names = [n for n, (rgb, _) in scenes.items() if rgb.shape[:2] != size][:2]
  images = np.stack([np.asarray(Image.fromarray(scenes[n][0]).resize(size[::-1])) for n in names])
  output = str(tmp_path / "model.jaxexport")
  assert export.main([f"--workdir={trained['workdir']}", f"--output={output}", "--size=48,53", "--step=99"]) == 2
  assert "no checkpoint for step 99" in capsys.readouterr().err
  assert export.main([f"--workdir={trained['workdir']}", f"--output={output}", "--size=48,53"]) == 0
  info = json.load(open(output + ".json"))
  assert info["classes"] == CLASSES and info["size"] == list(size) and info["iterations"] == 1
  assert info["source_checkpoint"]["step"] == 3 and len(info["palette"]) == len(CLASSES)
  np.save(tmp_path / "images.npy", images)
  npys = [str(tmp_path / n) for n in ("images.npy", "m.npy", "p.npy")]
  run_outside_the_project(RELOAD, output, *npys, cwd=str(tmp_path))  # plain JAX, not the project
  masks, probs = np.load(tmp_path / "m.npy"), np.load(tmp_path / "p.npy")
  assert masks.dtype == np.int32 and masks.shape == (2, *size) and probs.shape == (2, *size, len(CLASSES))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
  predict_one = predict.make_predictor(run_spec.derive(trained["config"]), trained["variables"])
  for image, mask in zip(images, masks):
    expected = predict_one(image).refined
    assert len(np.unique(expected)) > 1  # scrambled heads: not one class everywhere
    np.testing.assert_array_equal(mask, expected)


def test_export_errors_are_one_line(folder, tmp_path, capsys):
  path, _ = folder
  workdir = tmp_path / "untrained"  # a config.json, no checkpoint
  workdir.mkdir()
  (workdir / "config.json").write_text(small_config(path, str(tmp_path / "tfds")).to_json_best_effort())
  cases = [
      ([f"--workdir={tmp_path}", f"--output={tmp_path / 'm'}", "--size=8,8"], "no config.json"),
      ([f"--workdir={workdir}", f"--output={tmp_path / 'm'}", "--size=8,8"], "no checkpoint"),
      ([f"--workdir={workdir}", f"--output={tmp_path / 'm'}", "--size=8"], "--size=8"),
      ([f"--workdir={workdir}", f"--output={tmp_path / 'm'}"], "--size=H,W"),
      ([f"--workdir={workdir}", f"--output={tmp_path / 'nope' / 'm'}", "--size=8,8"], "does not exist"),
      ([f"--workdir={workdir}", f"--output={tmp_path}", "--size=8,8"], "is a folder"),
  ]
  for argv, expected in cases:
    assert export.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], (argv, err)


def test_nan_pixels_and_16_bit_masks_are_named_for_what_they_are(tmp_path):
  """A float image with NaN (a TIFF saved as .png) is refused in prepare's reader and in predict's, instead of
  becoming 0/255 with a numpy warning; a 16-bit mask is told it is 16-bit, not 'colours'."""
  from PIL import Image

  grey = np.full((4, 5), 100.0, np.float32)
  grey[1, 2] = np.nan
  grey[3, 0] = np.inf
  bad = tmp_path / "nan.tif"
  Image.fromarray(grey, mode="F").save(bad)
  with pytest.raises(errors.UserError, match=r"cannot read the image .*nan.tif: a floating-point image with 2 NaN or"):
    image_folder.read_rgb(str(bad))
  with pytest.raises(errors.UserError, match=r"cannot read image .*nan.tif: a floating-point image with 2 NaN or"):
    predict.read_image(str(bad))
  ok = tmp_path / "ok.tif"
  Image.fromarray(np.full((4, 5), 100.0, np.float32), mode="F").save(ok)
  assert (image_folder.read_rgb(str(ok)) == 100).all() and (predict.read_image(str(ok)) == 100).all()
  mask = tmp_path / "mask16.png"
  Image.fromarray(np.ones((4, 5), np.uint16) * 3).save(mask)
  with pytest.raises(errors.UserError, match="16-bit or 32-bit values: save the class indices as an 8-bit") as e:
    image_folder.read_mask(str(mask), num_classes=5)
  assert "colours" not in str(e.value)


def test_a_name_with_surrounding_spaces_can_be_listed_in_a_split_file_and_is_shown_quoted(tmp_path):
  folder = str(tmp_path / "f")
  write_folder(folder, count=4)
  for sub, ext in (("images", ".png"), ("masks", ".png")):
    os.rename(os.path.join(folder, sub, "scene_003" + ext), os.path.join(folder, sub, " scene_003" + ext))
  os.makedirs(os.path.join(folder, "splits"), exist_ok=True)
  with open(os.path.join(folder, "splits", "train.txt"), "w") as f:
    f.write("scene_000\nscene_001\n")
  with open(os.path.join(folder, "splits", "val.txt"), "w") as f:
    f.write("scene_002\n scene_003\n")  # the line's leading space is stripped: matched to ' scene_003' all the same
  splits = image_folder.scan(folder)
  assert sorted(e.name for e in splits["val"]) == [" scene_003", "scene_002"]
  with open(os.path.join(folder, "splits", "val.txt"), "a") as f:
    f.write(" nosuch \n")
  with pytest.raises(errors.UserError, match="nosuch"):
    image_folder.scan(folder)
  assert image_folder._names([" a", "b"]) == "' a', b"


# ---------------------------------------------------------------------------------------------- pixel counts


def write_binary_folder(folder, count=6, foreground=255, names=("background", "crack")):
  """``count`` 10x12 images whose masks are 0 with a ``foreground`` rectangle (``foreground`` = 255: the common
  0/255 export of a binary mask) and a ``classes.txt`` of ``names``. Returns ``{name: mask}``."""
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
  with open(os.path.join(folder, "classes.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
  out = {}
  for i in range(count):
    mask = np.zeros((10, 12), np.uint8)
    mask[2 : 4 + i % 3, 3:8] = foreground
    name = f"img_{i}"
    Image.fromarray(np.full((10, 12, 3), 40 * i % 256, np.uint8)).save(os.path.join(folder, "images", name + ".png"))
    Image.fromarray(mask, "L").save(os.path.join(folder, "masks", name + ".png"))
    out[name] = mask
  return out


def test_0_255_masks_are_refused_for_a_foreground_class_and_mapped_on_request(tmp_path, capsys):
  """255 is void: 0/255 masks would train the foreground class on no pixel. Preparing says so (one error line, exit
  2, naming the fix); --foreground_255 (dataset.foreground_255) maps 255 to class 1 into a copy of its own."""
  folder = str(tmp_path / "binary")
  masks = write_binary_folder(folder)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(image_folder.BinaryMaskError) as info:
    datasets.get_builder("image_folder", data_dir=data_dir, manual_dir=folder)
  message = str(info.value)
  assert "only the values 0 and 255" in message and "'crack' (1) gets no pixel" in message, message
  assert "Map 255 -> 1" in message and "--foreground_255" in message and "dataset.foreground_255=True" in message
  argv = ["--dataset=image_folder", f"--manual_dir={folder}", f"--data_dir={data_dir}"]
  assert prepare.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: every mask in") and "Map 255 -> 1" in err[0], err
  assert prepare.main(argv + ["--foreground_255"]) == 0
  capsys.readouterr()
  builder = datasets.get_builder("image_folder", data_dir=data_dir, manual_dir=folder, foreground_255=True)
  seen = {
      ex["image_id"].decode(): ex["label"][..., 0]
      for split in ("train", "val")
      for ex in tfds.as_numpy(builder.as_dataset(split=split))
  }
  assert set(seen) == set(masks)
  for name, mask in masks.items():
    np.testing.assert_array_equal(seen[name], np.where(mask == 255, 1, mask), err_msg=name)
  assert datasets.location("image_folder", data_dir=data_dir, manual_dir=folder)[1] != str(builder.data_dir_root)
  # where the mapping would be wrong: 3 classes, or masks that already use 1 (their 255 is real void)
  three = str(tmp_path / "three")
  write_binary_folder(three, names=("background", "crack", "rust"))
  with pytest.raises(image_folder.FolderError, match="for two classes .* but the folder has 3"):
    datasets.get_builder("image_folder", data_dir=data_dir, manual_dir=three, foreground_255=True)
  ones = str(tmp_path / "ones")
  write_binary_folder(ones, foreground=1)
  Image.fromarray(np.full((10, 12), 255, np.uint8)).save(os.path.join(ones, "masks", "img_0.png"))
  with pytest.raises(image_folder.FolderError, match="already hold class 1: drop the flag"):
    datasets.get_builder("image_folder", data_dir=data_dir, manual_dir=ones, foreground_255=True)
  with pytest.raises(errors.UserError, match="synthetic_shapes/tiny is not an image folder"):
    datasets.get_builder("synthetic_shapes/tiny", data_dir=data_dir, foreground_255=True)


def test_a_class_without_training_pixels_is_an_error(tmp_path):
  """Class 2 occurs only in the validation masks: the model could never learn it; the error names the class."""
  folder = str(tmp_path / "empty")
  write_binary_folder(folder, count=6, foreground=1, names=("background", "crack", "rust"))
  splits = image_folder.scan(folder)
  mask = np.zeros((10, 12), np.uint8)
  mask[5:, :] = 2
  Image.fromarray(mask, "L").save(splits["val"][0].mask)
  with pytest.raises(image_folder.EmptyClassError) as info:
    datasets.get_builder("image_folder", data_dir=str(tmp_path / "tfds"), manual_dir=folder)
  n = len(splits["train"])
  assert f"class(es) 'rust' (2) have no pixel in the {n} training masks" in str(info.value), str(info.value)
  assert "\n" not in str(info.value)


def test_prepare_prints_and_saves_the_pixels_per_class_and_warns_about_a_small_val_split(tmp_path, capsys):
  """Pixels per class and split, against a count of the folder's own masks: printed, saved as class_pixels.json
  beside the prepared copy (and read back from there); the 1-image val split and its missing classes are warned
  about."""
  folder = str(tmp_path / "f")
  scenes = write_folder(folder, count=6)
  val_name = next(e.name for e in image_folder.scan(folder)["val"])
  label = scenes[val_name][1].copy()
  label[label == 4] = 0
  label[0, 4] = 0  # the first row's pixel of class 4, too: class 4 is absent from the val split
  Image.fromarray(label, "L").save(os.path.join(folder, "masks", val_name + ".png"))
  scenes[val_name] = (scenes[val_name][0], label)
  data_dir = str(tmp_path / "tfds")
  assert prepare.main(["--dataset=image_folder", f"--manual_dir={folder}", f"--data_dir={data_dir}"]) == 0
  out = capsys.readouterr().out
  builder = datasets.get_builder("image_folder", data_dir=data_dir, manual_dir=folder)
  path = os.path.join(builder.data_dir, datasets.class_pixels.FILENAME)
  saved = json.load(open(path))
  assert saved["class_names"] == CLASSES and sorted(saved["splits"]) == ["train", "val"]
  for split in ("train", "val"):
    labels = [lab for n, (_, lab) in scenes.items() if (n == val_name) == (split == "val")]
    want = [int(sum(np.sum(lab == k) for lab in labels)) for k in range(len(CLASSES))]
    assert saved["splits"][split] == {
        "images": len(labels),
        "pixels": want,
        "void_pixels": int(sum(np.sum(lab == 255) for lab in labels)),
    }, split
    assert all(str(v) in out for v in want)
  assert saved["splits"]["val"]["pixels"][4] == 0
  assert "pixels per class and split (class_pixels.json there):" in out
  assert "warning: the val split has 1 image(s), fewer than 20" in out
  assert f"warning: class(es) {CLASSES[4]} have no pixel in the val split" in out
  saved["splits"]["val"]["void_pixels"] = -1  # read back, not counted again
  with open(path, "w") as f:
    json.dump(saved, f)
  assert datasets.class_pixels.load_or_count(builder)["splits"]["val"]["void_pixels"] == -1
  for damaged in ("[1, 2]", '{"splits": ', '{"class_names": []}'):  # valid JSON of another shape; cut short; stale
    with open(path, "w") as f:
      f.write(damaged)
    assert datasets.class_pixels.load_or_count(builder)["splits"]["val"]["void_pixels"] >= 0  # counted again
    assert json.load(open(path))["splits"]["val"]["pixels"][4] == 0  # and written again
  (small,) = datasets.split_warnings(builder, "train")  # 5 images, every class: only their number is a warning
  assert small.startswith("the train split has 5 image(s), fewer than 20")
