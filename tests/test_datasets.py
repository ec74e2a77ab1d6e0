"""The TFDS builders, prepared offline: synthetic_shapes/tiny, and voc2012_aug / cityscapes19 from fake archives
(also damaged ones: truncated archives, bad label values, RGB labels, image/label size mismatches)."""

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fake_archives
from dilaff_jax import datasets, errors
from dilaff_jax.datasets import prepare
from dilaff_jax.datasets import cityscapes
from dilaff_jax.datasets import common
from dilaff_jax.datasets import records
from dilaff_jax.datasets import shapes_render
from dilaff_jax.datasets import synthetic_shapes
from dilaff_jax.datasets import voc2012_aug

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(builder, split, decode_image=True):
  """{image_id: (image, label [H, W])} of a prepared split, decoded by TFDS (the image stays encoded if not
  ``decode_image``)."""
  out = {}
  decoders = None if decode_image else {"image": tfds.decode.SkipDecoding()}
  for ex in builder.as_dataset(split=split, shuffle_files=False, decoders=decoders).as_numpy_iterator():
    out[ex["image_id"].decode()] = (ex["image"], ex["label"][..., 0])
  return out


# ------------------------------------------------------------------------------------------ synthetic_shapes


def test_boundary_band_matches_brute_force():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, size=(9, 11)).astype(np.uint8)
  label[2:7, 3:9] = 1
  for width in (1, 2):
    expected = label.copy()
    for i in range(9):
      for j in range(11):
        window = label[max(i - width, 0) : i + width + 1, max(j - width, 0) : j + width + 1]
        if (window != label[i, j]).any():
          expected[i, j] = 255
    np.testing.assert_array_equal(shapes_render.boundary_band(label, width), expected)


def test_render_scene_is_deterministic_and_labels_are_classes_or_void():
  scenes = [shapes_render.render_scene(np.random.default_rng(k), height=40, width=50, max_objects=4) for k in range(30)]
  again = shapes_render.render_scene(np.random.default_rng(3), height=40, width=50, max_objects=4)
  np.testing.assert_array_equal(scenes[3][0], again[0])
  np.testing.assert_array_equal(scenes[3][1], again[1])
  values = np.unique(np.concatenate([label.ravel() for _, label in scenes]))
  np.testing.assert_array_equal(values, [0, 1, 2, 3, 4, 5, 255])
  for image, label in scenes:
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8 and label.shape == (40, 50)
    # Two different classes never touch: the void band separates them (3 x 3 neighbourhoods).
    padded = np.pad(label, 1, mode="edge")
    for dy in range(3):
      for dx in range(3):
        neighbour = padded[dy : dy + 40, dx : dx + 50]
        clash = (label != 255) & (neighbour != 255) & (neighbour != label)
        assert not clash.any()


def test_single_pixel_colours_overlap_between_classes():
  # A nearest-class-mean colour classifier, fitted on the scenes themselves, gets most pixels wrong: colour alone
  # does not identify the class (texture and context must).
  colours, labels = [], []
  for k in range(30):
    image, label = shapes_render.render_scene(np.random.default_rng(k), height=48, width=48, max_objects=4)
    keep = label != 255
    colours.append(image[keep].astype(np.float64))
    labels.append(label[keep])
  colours, labels = np.concatenate(colours), np.concatenate(labels)
  means = np.stack([colours[labels == c].mean(axis=0) for c in range(len(shapes_render.CLASS_NAMES))])
  predicted = np.argmin(((colours[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (predicted == labels).mean() < 0.6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return datasets.get_builder("synthetic_shapes/tiny", data_dir=tmp_path_factory.mktemp("tfds"))


def test_synthetic_tiny_counts_metadata_and_content(tiny):
  assert tiny.info.splits["train"].num_examples == 24
  assert tiny.info.splits["test"].num_examples == 8
  assert tiny.info.splits["tune"].num_examples == 4
  assert datasets.class_names(tiny) == list(shapes_render.CLASS_NAMES)
  assert tiny.info.metadata["num_classes"] == 6 and tiny.info.metadata["ignore_label"] == 255
  config = tiny.builder_config
  for split_index, split in enumerate(("train", "test", "tune")):
    examples = _examples(tiny, split)
    assert sorted(examples) == [f"{split}_{i:05d}" for i in range(tiny.info.splits[split].num_examples)]
    for i in (0, 3):
      image, label = examples[f"{split}_{i:05d}"]
      want_image, want_label = synthetic_shapes.render(config, split_index, i)
      np.testing.assert_array_equal(image, want_image)
      np.testing.assert_array_equal(label, want_label)
      assert 48 <= image.shape[0] <= 64 and 48 <= image.shape[1] <= 64
    assert set(np.unique(np.concatenate([l.ravel() for _, l in examples.values()]))) <= {0, 1, 2, 3, 4, 5, 255}


def test_synthetic_prepare_is_byte_identical(tiny, tmp_path):
  again = datasets.get_builder("synthetic_shapes/tiny", data_dir=tmp_path)
  for split in ("train", "tune", "test"):
    first = [i.filename for i in tiny.info.splits[split].file_instructions]
    second = [i.filename for i in again.info.splits[split].file_instructions]
    assert [open(a, "rb").read() for a in first] == [open(b, "rb").read() for b in second]


def test_two_processes_preparing_one_dataset_at_once_take_turns(tiny, tmp_path):
  """Two processes (a study's --jobs=2 on a fresh machine) prepare the same dataset at the same moment: both get the
  prepared dataset, the one copy that the first made, with its split sizes; before, the second failed renaming its
  finished copy onto the first's (a traceback, and the study lost that run)."""
  code = (
      "import os, sys, time\n"
      "from dilaff_jax import datasets\n"
      "open(sys.argv[2], 'w').close()\n"
      "while not os.path.exists(sys.argv[1]):\n"
      "  time.sleep(0.01)\n"
      "b = datasets.get_builder('synthetic_shapes/tiny', data_dir=sys.argv[3])\n"
      "print(b.info.splits['train'].num_examples, b.info.splits['test'].num_examples)\n"
  )
  go, data = tmp_path / "go", tmp_path / "data"
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", code, str(go), str(tmp_path / f"ready{i}"), str(data)],
          cwd=REPO,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  for _ in range(6000):  # both imported, then both start preparing at once
    if all((tmp_path / f"ready{i}").exists() for i in range(2)) or any(p.poll() is not None for p in procs):
      break
    time.sleep(0.01)
  go.touch()
  outs = [p.communicate(timeout=300) for p in procs]
  want = f"{tiny.info.splits['train'].num_examples} {tiny.info.splits['test'].num_examples}"
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0 and out.strip().splitlines()[-1] == want, err[-2000:]
  version_dir = data / "synthetic_shapes" / "tiny"
  assert sorted(os.listdir(version_dir)) == [f".{tiny.info.version}.prepare.lock", str(tiny.info.version)]


def test_record_offsets_read_the_same_examples_as_tfrecord_dataset(tiny):
  index = records.index_split(tiny, "train[5:17]")
  reader = records.RecordReader(index)
  expected = list(
      tfds.as_numpy(
          tiny.as_dataset(  # raw bytes in file order
              split="train",
              shuffle_files=False,
              decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()},
          )
      )
  )[5:17]
  skip = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
  got = [tiny.info.features.deserialize_example_np(reader.read(p), decoders=skip) for p in range(len(index))]
  reader.close()
  assert len(index) == 12
  assert [g["image_id"] for g in got] == [e["image_id"] for e in expected]
  assert [g["image"] for g in got] == [e["image"] for e in expected]  # the encoded PNG bytes
  assert [g["label"] for g in got] == [e["label"] for e in expected]


# ------------------------------------------------------------------------------------------ voc2012_aug

VOC_TRAIN = ["2007_000032", "2007_000039", "2008_000001"]
VOC_VAL = ["2007_000033", "2009_000010"]
SBD_TRAIN = ["2008_000002", "2007_000032", "2009_000010"]  # one VOC train image, one VOC val image
SBD_VAL = ["2008_000003", "2007_000039", "2008_000002"]  # a duplicate of an SBD train id
EXPECTED_TRAIN_AUG = ["2007_000032", "2007_000039", "2008_000001", "2008_000002", "2008_000003"]


def test_train_aug_ids_union_minus_val():
  assert voc2012_aug.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN + SBD_VAL) == EXPECTED_TRAIN_AUG


@pytest.fixture(scope="module")
def fake_voc():
  return fake_archives.make_fake_voc(
      np.random.default_rng(0),
      voc_train=VOC_TRAIN,
      voc_val=VOC_VAL,
      sbd_train=SBD_TRAIN,
      sbd_val=SBD_VAL,
      unlisted=["2010_000005"],
  )


def _prepare_voc(tmp_path, fake, extra):
  manual = tmp_path / "manual"
  manual.mkdir()
  fake_archives.write_voc_tar(manual / voc2012_aug.VOC_ARCHIVE, fake)
  if extra == "sbd":
    fake_archives.write_sbd_tgz(manual / voc2012_aug.SBD_ARCHIVE, fake)
  else:
    fake_archives.write_aug_zip(manual / voc2012_aug.AUG_ARCHIVE, fake)
  return datasets.get_builder("voc2012_aug", data_dir=tmp_path / "tfds", manual_dir=manual)


@pytest.mark.parametrize("extra", ["sbd", "aug_zip"])
def test_voc2012_aug_splits_and_labels(tmp_path, fake_voc, extra):
  builder = _prepare_voc(tmp_path, fake_voc, extra)
  assert builder.info.splits["train_aug"].num_examples == len(EXPECTED_TRAIN_AUG)
  assert builder.info.splits["val"].num_examples == len(VOC_VAL)
  assert datasets.class_names(builder) == list(voc2012_aug.CLASS_NAMES)
  train = _examples(builder, "train_aug", decode_image=False)
  val = _examples(builder, "val", decode_image=False)
  assert sorted(train) == EXPECTED_TRAIN_AUG  # VOC val excluded, duplicates once, unlisted images absent
  assert sorted(val) == sorted(VOC_VAL)
  for image_id, (image, label) in {**train, **val}.items():
    # VOC's palette mask wins where it exists (palette indices, 255 kept); SBD's .mat elsewhere.
    want = fake_voc.voc_masks.get(image_id, fake_voc.sbd_masks.get(image_id))
    np.testing.assert_array_equal(label, want)
    assert image == fake_voc.jpegs[image_id]  # stored as the original JPEG bytes
  assert 255 in train["2007_000032"][1]  # the VOC void band survives
  assert 255 not in train["2008_000002"][1]  # SBD masks have no void band


def test_voc2012_aug_missing_archives_name_file_dir_and_source(tmp_path, fake_voc):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "README").write_text("not an archive")
  builder = tfds.builder("voc2012_aug", data_dir=tmp_path / "tfds")
  config = tfds.download.DownloadConfig(manual_dir=str(manual))
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare(download_config=config)
  message = str(error.value)
  assert "VOCtrainval_11-May-2012.tar" in message and str(manual) in message and "host.robots.ox.ac.uk" in message
  fake_archives.write_voc_tar(manual / voc2012_aug.VOC_ARCHIVE, fake_voc)
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare(download_config=config)
  message = str(error.value)
  assert "benchmark.tgz" in message and "SegmentationClassAug.zip" in message and str(manual) in message


def test_voc_masks_read_as_palette_indices_and_bad_values_are_named():
  mask = np.array([[0, 15, 255], [20, 1, 0]], dtype=np.uint8)
  png = fake_archives.palette_png(mask)
  np.testing.assert_array_equal(voc2012_aug.read_mask_png(png, "a.png"), mask)
  assert tf.io.decode_png(png, channels=1).numpy()[0, 1, 0] != 15  # the pitfall Pillow avoids
  with pytest.raises(ValueError, match=r"bad\.png.*\[30\]"):
    voc2012_aug.read_mask_png(fake_archives.palette_png(np.array([[0, 30]], np.uint8)), "bad.png")
  segmentation = np.array([[0, 3], [20, 7]], dtype=np.uint8)
  np.testing.assert_array_equal(voc2012_aug.read_sbd_mat(fake_archives.sbd_mat(segmentation), "x.mat"), segmentation)
  with pytest.raises(ValueError, match="broken.jpg"):
    common.image_size(b"\xff\xd8\xff not really a jpeg", "broken.jpg")


# ------------------------------------------------------------------------------------------ cityscapes19


def test_label_id_to_train_id_table():
  table = cityscapes.label_id_to_train_id()
  assert table[7] == 0 and table[26] == 13 and table[33] == 18 and table[23] == 10
  assert sorted(table[table != 255].tolist()) == list(range(19))
  assert all(table[i] == 255 for i in (0, 1, 4, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255))


def test_cityscapes19_prepares_from_fake_zips(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  counts = {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}, "test": {"berlin": 1}}
  fake = fake_archives.write_cityscapes_zips(manual, np.random.default_rng(1), counts)
  builder = datasets.get_builder("cityscapes19", data_dir=tmp_path / "tfds", manual_dir=manual)
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.splits["validation"].num_examples == 2
  assert datasets.class_names(builder) == list(cityscapes.CLASS_NAMES)
  table = cityscapes.label_id_to_train_id()
  for split, source in (("train", "train"), ("validation", "val")):
    examples = _examples(builder, split)
    assert sorted(examples) == sorted(fake.images[source])
    for image_id, (image, label) in examples.items():
      np.testing.assert_array_equal(image, fake.images[source][image_id])
      np.testing.assert_array_equal(label, table[fake.label_ids[source][image_id]])


def test_cityscapes19_missing_archive_is_named(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  fake_archives.write_cityscapes_zips(manual, np.random.default_rng(1), {"train": {"aachen": 1}})
  os.remove(manual / "gtFine_trainvaltest.zip")
  builder = tfds.builder("cityscapes19", data_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match=r"gtFine_trainvaltest\.zip.*cityscapes-dataset\.com"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))


# ------------------------------------------------------------------------------------------ damaged inputs


def _prepare_voc_expecting_error(tmp_path, fake, extra="aug_zip", voc_labels=None, aug_labels=None, cut=None):
  """Prepares voc2012_aug from the fake archives with one fault injected; returns the UserError's message."""
  manual = tmp_path / "manual"
  manual.mkdir(parents=True)
  fake_archives.write_voc_tar(manual / voc2012_aug.VOC_ARCHIVE, fake, voc_labels)
  if extra == "sbd":
    fake_archives.write_sbd_tgz(manual / voc2012_aug.SBD_ARCHIVE, fake)
  else:
    fake_archives.write_aug_zip(manual / voc2012_aug.AUG_ARCHIVE, fake, aug_labels)
  if cut:
    fake_archives.truncate(manual / cut[0], cut[1])
  with pytest.raises(errors.UserError) as error:
    datasets.get_builder("voc2012_aug", data_dir=tmp_path / "tfds", manual_dir=manual)
  return str(error.value), manual


@pytest.mark.parametrize(
    "archive,fraction,extra",
    [
        (voc2012_aug.VOC_ARCHIVE, 0.5, "aug_zip"),
        (voc2012_aug.VOC_ARCHIVE, 0.0, "aug_zip"),
        (voc2012_aug.SBD_ARCHIVE, 0.5, "sbd"),
        (voc2012_aug.SBD_ARCHIVE, 0.0, "sbd"),
        (voc2012_aug.AUG_ARCHIVE, 0.5, "aug_zip"),
        (voc2012_aug.AUG_ARCHIVE, 0.0, "aug_zip"),
    ],
)
def test_truncated_or_empty_voc_archives_are_named_with_a_redownload_hint(tmp_path, fake_voc, archive, fraction, extra):
  message, manual = _prepare_voc_expecting_error(tmp_path, fake_voc, extra, cut=(archive, fraction))
  assert f"{archive} ({manual / archive})" in message and "download it again" in message, message
  assert "\n" not in message


def test_truncated_cityscapes_zip_is_named(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  fake_archives.write_cityscapes_zips(manual, np.random.default_rng(1), {"train": {"aachen": 2}, "val": {"ulm": 1}})
  fake_archives.truncate(manual / cityscapes.LABELS_ARCHIVE, 0.6)
  with pytest.raises(
      common.DataError,
      match=r"The archive gtFine_trainvaltest\.zip \(.*\) is damaged or "
      r"incomplete.*download it again from https://www\.cityscapes-dataset\.com",
  ):
    datasets.get_builder("cityscapes19", data_dir=tmp_path / "tfds", manual_dir=manual)


def test_bad_label_pngs_name_the_file_and_the_values(tmp_path, fake_voc):
  voc_id, sbd_id = "2007_000039", "2008_000002"  # a VOC mask; an image with only an SBD mask
  bad = fake_voc.voc_masks[voc_id].copy()
  bad[0, :3] = 42
  message, _ = _prepare_voc_expecting_error(
      tmp_path / "value", fake_voc, voc_labels={voc_id: fake_archives.palette_png(bad)}
  )
  assert f"VOCtrainval_11-May-2012.tar:VOCdevkit/VOC2012/SegmentationClass/{voc_id}.png holds values [42]" in message
  rgb = np.stack([fake_voc.sbd_masks[sbd_id]] * 3, axis=-1)
  message, _ = _prepare_voc_expecting_error(tmp_path / "rgb", fake_voc, aug_labels={sbd_id: fake_archives.rgb_png(rgb)})
  assert f"SegmentationClassAug.zip:SegmentationClassAug/{sbd_id}.png has Pillow mode 'RGB'" in message, message


def test_image_and_label_of_different_sizes_are_named(tmp_path, fake_voc):
  image_id = "2008_000001"
  h, w = fake_voc.voc_masks[image_id].shape
  other = fake_archives.jpeg(np.zeros((h + 3, w, 3), np.uint8))
  fake = dataclasses.replace(fake_voc, jpegs={**fake_voc.jpegs, image_id: other})
  message, _ = _prepare_voc_expecting_error(tmp_path, fake)
  assert (
      f"The image VOCtrainval_11-May-2012.tar:VOCdevkit/VOC2012/JPEGImages/{image_id}.jpg is {h + 3}x{w} but "
      f"its label VOCtrainval_11-May-2012.tar:VOCdevkit/VOC2012/SegmentationClass/{image_id}.png is {h}x{w}" in message
  ), message


def test_unknown_dataset_lists_this_projects_datasets(tmp_path):
  with pytest.raises(errors.UserError) as error:
    datasets.get_builder("voc2012", data_dir=tmp_path)
  assert str(error.value) == (
      "dataset 'voc2012' is not one of this project's datasets (synthetic_shapes/default, "
      "synthetic_shapes/tiny, voc2012_aug, cityscapes19, image_folder)"
  )
  with pytest.raises(errors.UserError, match="'synthetic_shapes/tyni' is not one"):
    datasets.get_builder("synthetic_shapes/tyni", data_dir=tmp_path)
  assert len(datasets.dataset_class_names("voc2012_aug:1.0.0")) == 21
  assert len(datasets.dataset_class_names("cityscapes19")) == 19


def test_prepare_command_line_names_a_truncated_archive_in_one_line(tmp_path, fake_voc):
  manual = tmp_path / "manual"
  manual.mkdir()
  fake_archives.write_voc_tar(manual / voc2012_aug.VOC_ARCHIVE, fake_voc)
  fake_archives.write_aug_zip(manual / voc2012_aug.AUG_ARCHIVE, fake_voc)
  fake_archives.truncate(manual / voc2012_aug.VOC_ARCHIVE, 0.0)
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "dilaff_jax.datasets.prepare",
          "--dataset=voc2012_aug",
          f"--manual_dir={manual}",
          f"--data_dir={tmp_path / 'tfds'}",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(
      f"error: The archive VOCtrainval_11-May-2012.tar ({manual / voc2012_aug.VOC_ARCHIVE}) is " "damaged or incomplete"
  ), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_a_full_disk_while_preparing_is_one_error_naming_the_folder_and_the_cause(tmp_path, monkeypatch):
  """TFDS wraps a full disk ("Failed to finalize writing of split"); prepare names the data_dir and the cause and
  exits 2 without a traceback. Any other failure keeps its traceback (a bug)."""
  import errno as errno_lib

  def full(self, download_config=None):
    try:
      raise OSError(errno_lib.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("Failed to finalize writing of split 'train'") from e

  monkeypatch.setattr(synthetic_shapes.SyntheticShapes, "download_and_prepare", full)
  with pytest.raises(
      errors.UserError,
      match=rf"preparing synthetic_shapes/tiny in {tmp_path}.* failed: \[Errno "
      rf"{errno_lib.ENOSPC}\] No space left on device \(\d+\.\d MiB free there\); free disk space",
  ):
    datasets.get_builder("synthetic_shapes/tiny", data_dir=tmp_path)
  assert prepare.main(["--dataset=synthetic_shapes/tiny", f"--data_dir={tmp_path}"]) == 2

  def bug(self, download_config=None):
    raise RuntimeError("something else")

  monkeypatch.setattr(synthetic_shapes.SyntheticShapes, "download_and_prepare", bug)
  with pytest.raises(RuntimeError, match="something else"):
    datasets.get_builder("synthetic_shapes/tiny", data_dir=tmp_path)


@pytest.mark.parametrize("extra", ["sbd", "aug_zip"])
def test_garbage_over_a_voc_tar_member_names_the_voc_archive_not_the_extra_masks(tmp_path, fake_voc, extra):
  """A tar reader stops silently at an invalid header: the VOC masks from there on would look absent and be looked
  up in the SBD masks, which then got the blame (or silently replaced them)."""
  manual = tmp_path / "manual"
  manual.mkdir()
  voc = manual / voc2012_aug.VOC_ARCHIVE
  fake_archives.write_voc_tar(voc, fake_voc)
  if extra == "sbd":
    fake_archives.write_sbd_tgz(manual / voc2012_aug.SBD_ARCHIVE, fake_voc)
  else:
    fake_archives.write_aug_zip(manual / voc2012_aug.AUG_ARCHIVE, fake_voc)
  member = f"{voc2012_aug.VOC_ROOT}/SegmentationClass/{sorted(fake_voc.voc_masks)[1]}.png"
  fake_archives.overwrite_header(voc, member)
  with pytest.raises(errors.UserError) as error:
    datasets.get_builder("voc2012_aug", data_dir=tmp_path / "tfds", manual_dir=manual)
  message = str(error.value)
  assert f"{voc2012_aug.VOC_ARCHIVE} ({voc})" in message and "download it again" in message, message
  assert f"after {voc2012_aug.VOC_ROOT}/SegmentationClass/{sorted(fake_voc.voc_masks)[0]}.png" in message, message
  assert voc2012_aug.SBD_ARCHIVE not in message and voc2012_aug.AUG_ARCHIVE not in message, message
  assert "\n" not in message
