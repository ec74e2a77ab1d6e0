"""The DeepLab input pipeline: augmentation, determinism and resume, exhaustive eval, multi-host shards."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dilaff_jax import datasets
from dilaff_jax.engine import device_feed
from dilaff_jax.datasets import input_pipeline as ip

MEAN = np.asarray(ip.IMAGENET_MEAN_255, np.float32)
STD = np.asarray(ip.IMAGENET_STD_255, np.float32)
SCALES = ip.scale_set(0.5, 2.0, 0.25)
SINGLE_HOST = dict(process_index=0, process_count=1)


def _augment(image, label, seed, crop=24):
  out_image, out_label = ip.augment(
      tf.constant(image),
      tf.constant(label),
      tf.constant(seed, tf.int64),
      crop_size=(crop, crop),
      scales=SCALES,
      mean=MEAN,
      std=STD,
      ignore_label=255,
  )
  return out_image.numpy() * STD + MEAN, out_image.numpy(), out_label.numpy()


def test_scale_set():
  assert ip.scale_set(0.5, 2.0, 0.25) == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
  assert ip.scale_set(1.0, 1.0, 0.25) == (1.0,)
  with pytest.raises(ValueError, match="multiple"):
    ip.scale_set(0.5, 2.0, 0.4)


def test_augment_crop_size_scale_range_flip_and_mean_padding():
  yy, xx = np.mgrid[0:40, 0:40]
  image = np.stack([50 + 2 * xx, 50 + 2 * yy, np.full_like(xx, 100)], axis=-1).astype(np.uint8)
  label = np.ones((40, 40), np.uint8)
  seen_scales, seen_flips = set(), set()
  for k in range(60):
    raw, normalised, out_label = _augment(image, label, (7, k))
    assert raw.shape == (24, 24, 3) and out_label.shape == (24, 24) and out_label.dtype == np.int32
    valid = out_label == 1
    assert set(np.unique(out_label)) <= {1, 255}
    np.testing.assert_array_equal(normalised[~valid], 0.0)  # padded with the mean pixel
    # The vertical ramp's slope is 2 / scale (rows are never flipped); the horizontal one is +-2 / scale.
    both_rows = valid[1:] & valid[:-1]
    both_cols = valid[:, 1:] & valid[:, :-1]
    slope_y = np.median((raw[1:, :, 1] - raw[:-1, :, 1])[both_rows])
    slope_x = np.median((raw[:, 1:, 0] - raw[:, :-1, 0])[both_cols])
    scale = 2.0 / slope_y
    assert min(abs(scale - s) for s in SCALES) < 1e-3, scale
    assert abs(abs(slope_x) - slope_y) < 1e-3
    seen_scales.add(round(scale, 2))
    seen_flips.add(bool(slope_x < 0))
    # 40 * 0.5 = 20 < 24: only then is there padding, and exactly 20 x 20 pixels are real.
    assert valid.sum() == (400 if abs(scale - 0.5) < 1e-3 else 576)
  assert seen_scales == set(SCALES) and seen_flips == {False, True}


def test_augment_keeps_image_and_label_aligned():
  label = np.zeros((48, 40), np.uint8)
  label[5:30, 4:22] = 1
  label[20:44, 15:37] = 2
  label[8:16, 28:38] = 3
  label[30:33, :] = 255  # a void band with its own colour
  colours = np.zeros((256, 3), np.uint8)
  colours[[0, 1, 2, 3, 255]] = [(20, 200, 60), (220, 30, 90), (40, 60, 230), (250, 240, 10), (128, 128, 128)]
  image = colours[label]
  checked = 0
  for k in range(40):
    raw, _, out_label = _augment(image, label, (3, k), crop=32)
    # Pixels whose 5 x 5 neighbourhood has one label (crop borders excluded: their outer neighbours are cut off).
    uniform = np.zeros_like(out_label, dtype=bool)
    uniform[2:-2, 2:-2] = True
    for dy, dx in itertools.product(range(-2, 3), range(-2, 3)):
      uniform[2:-2, 2:-2] &= out_label[2 + dy : 30 + dy, 2 + dx : 30 + dx] == out_label[2:-2, 2:-2]
    inside = uniform & (out_label != 255)
    np.testing.assert_allclose(raw[inside], colours[out_label[inside]].astype(np.float32), atol=1e-3)
    checked += inside.sum()
  assert checked > 0.3 * 40 * 32 * 32


def test_check_labels_names_the_example():
  label = tf.constant([[0, 7], [255, 1]], tf.uint8)
  np.testing.assert_array_equal(ip.check_labels(label, tf.constant("ok"), 8, 255).numpy(), [[0, 7], [255, 1]])
  with pytest.raises(tf.errors.InvalidArgumentError, match="img_0042"):
    ip.check_labels(label, tf.constant("img_0042"), 6, 255)


def test_training_positions_are_epoch_permutations_and_resumable():
  n = 10
  stream = list(itertools.islice(ip.training_positions(5, 0, n), 3 * n))
  assert [g for g, _ in stream] == list(range(3 * n))
  epochs = [[p for _, p in stream[e * n : (e + 1) * n]] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  assert list(itertools.islice(ip.training_positions(5, 0, n, start=13), 17)) == stream[13:]
  other_host = [p for _, p in itertools.islice(ip.training_positions(5, 1, n), n)]
  assert other_host != epochs[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return datasets.get_builder("synthetic_shapes/tiny", data_dir=tmp_path_factory.mktemp("tfds"))


def _train(tiny, seed, start_step=0, steps=3, **kwargs):
  kwargs = {"num_classes": 6, **SINGLE_HOST, **kwargs}
  it = ip.train_iterator(
      tiny,
      split="train",
      crop_size=32,
      local_device_count=2,
      per_device_batch=2,
      seed=seed,
      start_step=start_step,
      **kwargs,
  )
  return list(itertools.islice(it, steps))


def test_train_batches_shapes_determinism_and_resume(tiny):
  # 24 examples, 4 per step: an epoch is 6 steps, so steps 5..8 cross an epoch boundary.
  run = _train(tiny, seed=0, steps=9)
  for batch in run:
    assert batch["image"].shape == (2, 2, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 2, 32, 32) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= {0, 1, 2, 3, 4, 5, 255}
  same = _train(tiny, seed=0, steps=3)
  other = _train(tiny, seed=1, steps=3)
  resumed = _train(tiny, seed=0, start_step=5, steps=4)
  for a, b in zip(run[:3], same):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not any(np.array_equal(a["image"], b["image"]) for a, b in zip(run[:3], other))
  for a, b in zip(run[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_train_label_out_of_range_names_the_example(tiny):
  with pytest.raises(ValueError, match=r"num_classes=3.*train_\d{5}"):
    _train(tiny, seed=0, steps=6, num_classes=3)


def test_every_pipeline_runs_without_tf_data_autotuning(tiny, monkeypatch):
  """Autotuning's background thread makes deleting an old iterator wait up to a minute while JAX keeps the cores
  busy (``datasets/tfdata.py``): the training and evaluation pipelines, the n_k statistics' and the class counts'
  iterations all run with it off."""
  from dilaff_jax.datasets import class_pixels
  from dilaff_jax.engine import affinity_stats

  seen = []
  real = ip._numpy_batches
  monkeypatch.setattr(ip, "_numpy_batches", lambda ds: seen.append(ds.options().autotune.enabled) or real(ds))
  _train(tiny, seed=0, steps=1)
  list(ip.eval_iterator(tiny, split="test", local_device_count=2, per_device_batch=3, num_classes=6, **SINGLE_HOST))
  assert seen and seen[0] is False and all(s is False for s in seen), seen
  from dilaff_jax.datasets import tfdata

  wrapped = []
  original = tfdata.without_autotune
  monkeypatch.setattr(tfdata, "without_autotune", lambda ds: wrapped.append(ds) or original(ds))
  labels, total = affinity_stats.tfds_label_maps("synthetic_shapes/tiny", "test", tiny.data_dir_root)
  assert len(list(labels)) == total == 8 and len(wrapped) == 1
  counts = class_pixels.count_split(tiny, "test", 6)
  assert len(wrapped) == 2 and counts
  assert tfdata.without_autotune(tf.data.Dataset.range(3)).options().autotune.enabled is False


def _decoded(builder, split):
  return {ex["image_id"].decode(): ex for ex in builder.as_dataset(split=split).as_numpy_iterator()}


def test_eval_covers_every_pixel_once_and_masks_padding(tiny):
  batches = list(
      ip.eval_iterator(tiny, split="test", local_device_count=2, per_device_batch=3, num_classes=6, **SINGLE_HOST)
  )
  assert len(batches) == 2  # 8 examples, 6 per batch
  originals = _decoded(tiny, "test")
  pad_h = max(ex["image"].shape[0] for ex in originals.values())
  pad_w = max(ex["image"].shape[1] for ex in originals.values())
  seen = []
  for batch in batches:
    assert batch["image"].shape == (2, 3, pad_h, pad_w, 3) and batch["label"].shape == (2, 3, pad_h, pad_w)
    assert batch["mask"].shape == (2, 3) and batch["mask"].dtype == bool
    flat = {k: v.reshape(6, *v.shape[2:]) for k, v in batch.items()}
    for i in range(6):
      if not flat["mask"][i]:
        assert flat["image_id"][i] == "" and flat["height"][i] == 0
        assert (flat["label"][i] == 255).all() and (flat["image"][i] == 0).all()
        continue
      image_id, h, w = flat["image_id"][i], flat["height"][i], flat["width"][i]
      seen.append(image_id)
      original = originals[image_id]
      assert (h, w) == original["image"].shape[:2]
      np.testing.assert_array_equal(flat["label"][i][:h, :w], original["label"][..., 0])
      np.testing.assert_allclose(flat["image"][i][:h, :w], (original["image"] - MEAN) / STD, atol=1e-5)
      outside = np.ones((pad_h, pad_w), bool)
      outside[:h, :w] = False
      assert (flat["label"][i][outside] == 255).all() and (flat["image"][i][outside] == 0).all()
  assert sorted(seen) == sorted(originals)  # each example exactly once
  assert sum(b["mask"].sum() for b in batches) == 8


def test_eval_pad_size_too_small_names_the_example(tiny):
  with pytest.raises(ValueError, match=r"test_\d{5}.*larger than the eval pad size"):
    list(
        ip.eval_iterator(
            tiny,
            split="test",
            local_device_count=1,
            per_device_batch=2,
            num_classes=6,
            pad_size=50,
            **SINGLE_HOST,
        )
    )


def test_multi_host_eval_shards_partition_the_split_with_equal_batch_counts(tiny):
  ids, counts = [], []
  for host in range(3):
    batches = list(
        ip.eval_iterator(
            tiny,
            split="test",
            local_device_count=1,
            per_device_batch=2,
            num_classes=6,
            pad_size=64,
            process_index=host,
            process_count=3,
        )
    )
    counts.append(len(batches))
    ids += [i for b in batches for i, m in zip(b["image_id"].ravel(), b["mask"].ravel()) if m]
  assert counts == [2, 2, 2]  # shards of 3, 3, 2 examples, 2 per batch
  assert sorted(ids) == sorted(_decoded(tiny, "test"))


def test_multi_host_train_reads_disjoint_shards(tiny):
  shards = [ip.host_split("train", p, 3) for p in range(3)]
  counts = [tiny.info.splits[s].num_examples for s in shards]
  assert counts == [8, 8, 8]
  ids = [sorted(_decoded_split_ids(tiny, s)) for s in shards]
  assert not set(ids[0]) & set(ids[1]) and len(set(ids[0] + ids[1] + ids[2])) == 24
  a = _train(tiny, seed=0, steps=1)[0]
  b = _train(tiny, seed=0, steps=1, process_index=1, process_count=3)[0]
  c = _train(tiny, seed=0, steps=1, process_index=0, process_count=3)[0]
  assert not np.array_equal(a["image"], b["image"]) and not np.array_equal(b["image"], c["image"])


def _decoded_split_ids(builder, split):
  decoders = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
  return [ex["image_id"].decode() for ex in builder.as_dataset(split=split, decoders=decoders).as_numpy_iterator()]


def tiny_dataset_config(tiny) -> ml_collections.ConfigDict:
  """A ``config.dataset`` for the tiny synthetic builder."""
  return ml_collections.ConfigDict(
      dict(
          name="synthetic_shapes/tiny",
          data_dir=tiny.data_dir_root,
          manual_dir=None,
          train_split="train",
          eval_split="test",
          num_classes=6,
          ignore_label=255,
          crop_size=(24, 32),
          min_scale=0.5,
          max_scale=2.0,
          scale_step=0.25,
          mean=ip.IMAGENET_MEAN_255,
          std=ip.IMAGENET_STD_255,
          eval_pad_size=None,
      )
  )


def test_from_config(tiny):
  cfg = tiny_dataset_config(tiny)
  pipes = ip.from_config(cfg, seed=0, local_device_count=2, per_device_batch=1, eval_per_device_batch=4, **SINGLE_HOST)
  assert pipes.class_names == list(datasets.synthetic_shapes.CLASS_NAMES)
  assert (pipes.num_train_examples, pipes.num_eval_examples) == (24, 8)
  assert next(pipes.train)["image"].shape == (2, 1, 24, 32, 3)
  assert [b["mask"].sum() for b in pipes.make_eval()] == [8]
  cfg.num_classes = 21
  with pytest.raises(ValueError, match="num_classes=21"):
    ip.from_config(cfg, seed=0, local_device_count=1, per_device_batch=1, **SINGLE_HOST)


def test_eval_from_config_never_touches_the_train_split(tiny):
  """Evaluation builds only the eval side: the same batches as ``from_config``'s, even with a train split that
  does not exist (which ``from_config`` refuses)."""
  cfg = tiny_dataset_config(tiny)
  both = ip.from_config(cfg, seed=0, local_device_count=2, per_device_batch=1, eval_per_device_batch=2, **SINGLE_HOST)
  cfg.train_split = "no_such_split"
  with pytest.raises(Exception, match="no_such_split"):
    ip.from_config(cfg, seed=0, local_device_count=2, per_device_batch=1, **SINGLE_HOST)
  alone = ip.eval_from_config(cfg, local_device_count=2, per_device_batch=2, **SINGLE_HOST)
  assert (alone.class_names, alone.num_eval_examples) == (both.class_names, both.num_eval_examples)
  for x, y in zip(both.make_eval(), alone.make_eval(), strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_prefetch_to_device_shards_the_device_axis():
  devices = jax.local_devices()
  batches = [
      {
          "x": np.arange(len(devices) * 6, dtype=np.float32).reshape(len(devices), 2, 3) + k,
          "image_id": np.full((len(devices), 2), f"id{k}", dtype=object),
      }
      for k in range(3)
  ]
  out = list(device_feed.prefetch_to_device(iter(batches), size=2))
  assert len(out) == 3
  for k, batch in enumerate(out):
    assert isinstance(batch["x"], jax.Array) and len(batch["x"].sharding.device_set) == len(devices)
    np.testing.assert_array_equal(np.asarray(batch["x"]), batches[k]["x"])
    assert batch["image_id"][0, 0] == f"id{k}"
