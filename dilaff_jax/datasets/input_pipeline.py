"""DeepLab input pipeline (tf.data): training augmentation and exhaustive evaluation batches for pmap.

Training (the paper's §4.1, following DeepLab): every epoch visits the host's examples in a fresh random order;
each example is scaled by a factor drawn from ``{min_scale, min_scale + scale_step, ..., max_scale}`` (image
bilinear, label nearest), padded with the mean pixel and the ignore label up to the crop size, randomly cropped,
randomly flipped left-right and normalised with the backbone's ImageNet statistics. All randomness is stateless:
the epoch order comes from ``(seed, host, epoch)`` and an example's augmentation from ``(seed, its global index)``,
so batches do not depend on thread timing and ``start_step=N`` yields exactly what an uninterrupted run yields
from step N on, without reading the skipped examples.

Evaluation: every pixel of every example exactly once. Images are padded (mean pixel -> 0 after normalisation,
label -> ignore) to one fixed size, or, without a fixed size, grouped by size (:func:`size_buckets`) and padded to
the largest of their group; the last partial batch of a group is filled with dummy examples marked ``mask=False``,
and every host yields the same batches' shapes in the same order. Without a fixed size, an image whose longer side
exceeds ``max_size`` is inferred downscaled (as ``predict --max_size`` does) and scored against its full-size
label (``score_label``), so that the network's memory stays bounded whatever the images' size.

Batches are numpy dicts shaped ``[local_devices, per_device_batch, ...]``. Multi-host: each process reads its own
``tfds.even_splits`` shard of the split.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dilaff_jax import datasets
from dilaff_jax.method import conventions
from dilaff_jax.method.conventions import IMAGENET_MEAN_255, IMAGENET_STD_255
from dilaff_jax.datasets import records, tfdata

Batch = dict[str, np.ndarray]
BuilderOrName = tfds.core.DatasetBuilder | str


def scale_set(min_scale: float, max_scale: float, scale_step: float) -> tuple[float, ...]:
  """The scale factors ``min_scale, min_scale + scale_step, ..., max_scale`` (DeepLab: 0.5 to 2.0 by 0.25)."""
  if not 0 < min_scale <= max_scale:
    raise ValueError(f"Need 0 < min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}.")
  if min_scale == max_scale:
    return (float(min_scale),)
  if scale_step <= 0:
    raise ValueError(f"scale_step must be positive, got {scale_step}.")
  steps = (max_scale - min_scale) / scale_step
  if abs(steps - round(steps)) > 1e-6:
    raise ValueError(
        f"max_scale - min_scale ({max_scale} - {min_scale}) is not a multiple of scale_step " f"({scale_step})."
    )
  return tuple(float(min_scale + k * scale_step) for k in range(int(round(steps)) + 1))


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
  pair = (int(size), int(size)) if np.isscalar(size) else tuple(int(v) for v in size)
  if len(pair) != 2 or min(pair) <= 0:
    raise ValueError(f"{what} must be a positive int or (height, width), got {size!r}.")
  return pair


# ----------------------------------------------------------------------------------------------- per example


def check_labels(label: tf.Tensor, image_id: tf.Tensor, num_classes: int, ignore_label: int) -> tf.Tensor:
  """``label`` unchanged, after asserting every value is a class ``< num_classes`` or ``ignore_label``."""
  label = tf.cast(label, tf.int32)
  bad = tf.logical_and(label >= num_classes, label != ignore_label)
  bad_value = tf.reduce_max(tf.where(bad, label, -1))
  assertion = tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(bad)),
      [
          "Label value",
          bad_value,
          f"is neither a class (< num_classes={num_classes}) nor the ignore label " f"{ignore_label} in example",
          image_id,
      ],
  )
  with tf.control_dependencies([assertion]):
    return tf.identity(label)


def _normalise(centred: tf.Tensor, std: Sequence[float]) -> tf.Tensor:
  return centred / tf.constant(std, tf.float32)


def augment(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    crop_size: tuple[int, int],
    scales: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    ignore_label: int,
) -> tuple[tf.Tensor, tf.Tensor]:
  """DeepLab training augmentation of one example, as a pure function of ``seed`` (int [2]).

  Args:
    image: uint8 [H, W, 3]. label: integer [H, W] (class indices, ``ignore_label`` = void).
  Returns:
    image float32 [crop_h, crop_w, 3] normalised, ``(x - mean) / std`` (padding is 0); label int32 [crop_h,
    crop_w] (padding is ``ignore_label``).
  """
  scale_seed, row_seed, col_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  crop_h, crop_w = crop_size
  scale = tf.gather(
      tf.constant(scales, tf.float32), tf.random.stateless_uniform([], scale_seed, 0, len(scales), dtype=tf.int32)
  )
  size = tf.cast(tf.shape(label)[:2], tf.float32)
  new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
  image = tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear")
  label = tf.image.resize(tf.cast(label, tf.int32)[..., None], new_size, method="nearest")[..., 0]

  image = image - tf.constant(mean, tf.float32)  # padding with 0 now means padding with the mean pixel
  pad_h = tf.maximum(crop_h - new_size[0], 0)
  pad_w = tf.maximum(crop_w - new_size[1], 0)
  image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]])
  label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=ignore_label)

  padded = tf.shape(label)
  top = tf.random.stateless_uniform([], row_seed, 0, padded[0] - crop_h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], col_seed, 0, padded[1] - crop_w + 1, dtype=tf.int32)
  image = image[top : top + crop_h, left : left + crop_w]
  label = label[top : top + crop_h, left : left + crop_w]

  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
  image = tf.ensure_shape(_normalise(image, std), [crop_h, crop_w, 3])
  return image, tf.ensure_shape(label, [crop_h, crop_w])


def pad_for_eval(
    image: tf.Tensor,
    label: tf.Tensor,
    image_id: tf.Tensor,
    *,
    pad_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    ignore_label: int,
) -> tuple[tf.Tensor, tf.Tensor]:
  """Normalised image and int32 label padded at the bottom/right to ``pad_size`` (mean pixel -> 0, ignore)."""
  height, width = tf.shape(label)[0], tf.shape(label)[1]
  assertion = tf.debugging.Assert(
      tf.logical_and(height <= pad_size[0], width <= pad_size[1]),
      ["Example", image_id, "is", height, "x", width, f"pixels, larger than the eval pad size {pad_size}."],
  )
  with tf.control_dependencies([assertion]):
    pad_h, pad_w = pad_size[0] - height, pad_size[1] - width
  centred = tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)
  image = tf.pad(centred, [[0, pad_h], [0, pad_w], [0, 0]])
  label = tf.pad(tf.cast(label, tf.int32), [[0, pad_h], [0, pad_w]], constant_values=ignore_label)
  return (tf.ensure_shape(_normalise(image, std), [*pad_size, 3]), tf.ensure_shape(label, list(pad_size)))


# ----------------------------------------------------------------------------------------------- reading


def _builder(builder_or_name: BuilderOrName, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
  if isinstance(builder_or_name, str):
    return datasets.get_builder(builder_or_name, data_dir=data_dir)
  return builder_or_name


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only for the defaults; the tf.data graph itself needs no JAX.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  return process_index, process_count


def host_split(split: str, process_index: int, process_count: int) -> str:
  """This process's part of ``split``: ``tfds.even_splits`` without dropping the remainder."""
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def training_positions(seed: int, process_index: int, num_examples: int, start: int = 0) -> Iterator[tuple[int, int]]:
  """``(host example index g, position in the host's shard)`` for ``g = start, start + 1, ...``, forever.

  Epoch ``e = g // num_examples`` visits the shard in the order ``permutation(seed, process_index, e)``: each
  epoch is a complete random permutation, and starting at any ``g`` needs only that epoch's permutation.
  """
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}.")
  current_epoch, order = -1, None
  for g in itertools.count(start):
    epoch, position = divmod(g, num_examples)
    if epoch != current_epoch:
      current_epoch, order = epoch, np.random.default_rng((seed, process_index, epoch)).permutation(num_examples)
    yield g, int(order[position])


def _serialized(index: records.RecordIndex, make_positions: Callable[[], Iterator[tuple[int, int]]]) -> tf.data.Dataset:
  """Dataset of ``(host example index, serialized example)`` read from ``index`` in the order ``make_positions()``
  gives (a fresh order for every pass over the dataset)."""

  def generate():
    reader = records.RecordReader(index)
    try:
      for g, position in make_positions():
        yield g, reader.read(position)
    finally:
      reader.close()

  return tf.data.Dataset.from_generator(
      generate, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string))
  )


def _assertion_text(message: str) -> str:
  """The text of a failed ``tf.debugging.Assert`` ("[a] [b]" -> "a b"), or the whole message."""
  match = re.search(r"assertion failed: (.*)", message)
  if match is None:
    return message
  return " ".join(re.findall(r"\[([^\[\]]*)\]", match.group(1))) or match.group(1)


def _numpy_batches(dataset: tf.data.Dataset) -> Iterator[Batch]:
  """Numpy batches; a failed input check in the graph becomes a ``ValueError`` with its message."""
  iterator = dataset.as_numpy_iterator()
  try:
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except tf.errors.InvalidArgumentError as error:
        raise ValueError(f"Bad input example: {_assertion_text(error.message)}") from None
      yield batch
  finally:  # closing the generator stops tf.data's threads here, not whenever the garbage collector gets to them
    del iterator


def _to_devices(batch: dict[str, tf.Tensor], devices: int, per_device: int) -> dict[str, tf.Tensor]:
  return {k: tf.reshape(v, [devices, per_device, *v.shape[1:]]) for k, v in batch.items()}


def train_iterator(
    builder_or_name: BuilderOrName,
    *,
    split: str,
    crop_size: int | Sequence[int],
    local_device_count: int,
    per_device_batch: int,
    seed: int,
    num_classes: int,
    data_dir: str | os.PathLike | None = None,
    start_step: int = 0,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    scale_step: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
    ignore_label: int = datasets.IGNORE_LABEL,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    weight_map: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[Batch]:
  """Endless augmented training batches ``{"image": f32 [D,b,H,W,3], "label": i32 [D,b,H,W]}``.

  ``D = local_device_count``, ``b = per_device_batch``, ``(H, W) = crop_size``. Batch ``k`` of this iterator is
  step ``start_step + k`` of the run with this ``seed``. A label value that is neither ``< num_classes`` nor
  ``ignore_label`` raises ``ValueError`` naming the example. With ``weight_map`` (a pure numpy function of an
  int32 ``[H, W]`` crop label, e.g. U-Net's boundary weights), batches also hold ``"weight": f32 [D,b,H,W]``
  computed from each augmented label: a function of the label, so it keeps batches deterministic.
  """
  builder = _builder(builder_or_name, data_dir)
  process_index, process_count = _process(process_index, process_count)
  crop = _pair(crop_size, "crop_size")
  scales = scale_set(min_scale, max_scale, scale_step)
  index = records.index_split(builder, host_split(split, process_index, process_count))
  if len(index) == 0:
    raise ValueError(f"Split {split!r} of {builder.info.full_name} has no examples for process {process_index}.")
  batch_size = local_device_count * per_device_batch
  if start_step < 0 or batch_size <= 0:
    raise ValueError(
        f"Need start_step >= 0 and a positive batch, got start_step={start_step}, "
        f"local_device_count={local_device_count}, per_device_batch={per_device_batch}."
    )
  features = builder.info.features

  def prepare(g, serialized):
    example = features.deserialize_example(serialized)
    label = check_labels(example["label"][..., 0], example["image_id"], num_classes, ignore_label)
    example_seed = tf.stack([tf.constant(seed, tf.int64), g * process_count + process_index])
    image, label = augment(
        example["image"],
        label,
        example_seed,
        crop_size=crop,
        scales=scales,
        mean=mean,
        std=std,
        ignore_label=ignore_label,
    )
    if weight_map is None:
      return {"image": image, "label": label}
    weight = tf.numpy_function(weight_map, [label], tf.float32, stateful=False)
    return {"image": image, "label": label, "weight": tf.ensure_shape(weight, list(crop))}

  positions = functools.partial(training_positions, seed, process_index, len(index), start_step * batch_size)
  dataset = (
      _serialized(index, positions)
      .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .batch(batch_size, drop_remainder=True)
      .map(lambda b: _to_devices(b, local_device_count, per_device_batch))
      .prefetch(prefetch)
  )
  dataset = tfdata.without_autotune(dataset)
  return _numpy_batches(dataset)


def _label_headers(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[tuple[int, int, tf.train.Example]]:
  """``(height, width, example)`` of every example of ``split`` in order, the size read from the label PNG header
  (no decoding)."""
  index = records.index_split(builder, split)
  reader = records.RecordReader(index)
  try:
    for position in range(len(index)):
      example = tf.train.Example.FromString(reader.read(position))
      png = example.features.feature["label"].bytes_list.value[0]
      if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"Example {position} of {builder.info.full_name} {split} has a label that is not a PNG.")
      yield int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big"), example
  finally:
    reader.close()


def label_sizes(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """``[N, 2]`` height and width of every example of ``split`` in order (from the label PNG headers)."""
  return np.asarray([(h, w) for h, w, _ in _label_headers(builder, split)], np.int64).reshape(-1, 2)


def largest_example(builder: tfds.core.DatasetBuilder, split: str) -> tuple[int, int, str] | None:
  """``(height, width, image_id)`` of the example of ``split`` with the most pixels (None for an empty split)."""
  best = None
  for h, w, example in _label_headers(builder, split):
    if best is None or h * w > best[0] * best[1]:
      best = (h, w, example.features.feature["image_id"].bytes_list.value[0].decode("utf-8"))
  return best


def max_label_size(builder: tfds.core.DatasetBuilder, split: str) -> tuple[int, int]:
  """Largest height and width over the examples of ``split``, read from the label PNG headers (no decoding)."""
  sizes = label_sizes(builder, split)
  return (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if len(sizes) else (0, 0)


# ----------------------------------------------------------------------------------------------- size groups

BUCKET_BASE = 64  # sides up to this share one size level; above it, a level per factor sqrt(2)


def size_level(side: int, base: int = BUCKET_BASE) -> int:
  """0 for ``side <= base``, else the ``k`` with ``base * sqrt(2)^(k-1) < side <= base * sqrt(2)^k``."""
  level = 0
  while side > base * 2 ** (level / 2):
    level += 1
  return level


class SizeBucket(NamedTuple):
  """Examples evaluated together: ``positions[p]`` (process ``p``'s examples, positions in its shard), padded to
  ``pad`` for the network; ``score_pad`` is the padded size of their full labels when they are inferred
  downscaled (else None); ``num_batches`` is the same on every process."""

  pad: tuple[int, int]
  score_pad: tuple[int, int] | None
  positions: tuple[np.ndarray, ...]
  small_sizes: tuple[np.ndarray, ...]  # [n_p, 2] inference size of each example of ``positions[p]``
  num_batches: int


def size_buckets(
    sizes: Sequence[np.ndarray], batch_size: int, max_size: int = 0, base: int = BUCKET_BASE
) -> list[SizeBucket]:
  """Groups the examples of every process (``sizes[p]``: ``[n_p, 2]`` label sizes of process ``p``'s shard) by
  the size level (:func:`size_level`) of each side of their inference size (:func:`inference_size`); images
  inferred downscaled are grouped apart, also by the levels of their full size. A group is padded to its largest
  member, so no side is padded beyond ``max(base, sqrt(2) x its own)``, and a split of same-size images is one
  group at exactly that size."""
  groups: dict[tuple, list[list[int]]] = {}
  small = [
      np.asarray([conventions.inference_size(int(h), int(w), max_size) for h, w in s], np.int64).reshape(-1, 2)
      for s in sizes
  ]
  for p, (full, inf) in enumerate(zip(sizes, small)):
    for i, ((h, w), (hs, ws)) in enumerate(zip(full, inf)):
      down = (hs, ws) != (h, w)
      key = (down, size_level(hs, base), size_level(ws, base)) + (
          (size_level(h, base), size_level(w, base)) if down else ()
      )
      groups.setdefault(key, [[] for _ in sizes])[p].append(i)
  buckets = []
  for key in sorted(groups):
    members = [np.asarray(m, np.int64) for m in groups[key]]
    inf = np.concatenate([small[p][m] for p, m in enumerate(members)])
    full = np.concatenate([np.asarray(sizes[p]).reshape(-1, 2)[m] for p, m in enumerate(members)])
    buckets.append(
        SizeBucket(
            pad=(int(inf[:, 0].max()), int(inf[:, 1].max())),
            score_pad=(int(full[:, 0].max()), int(full[:, 1].max())) if key[0] else None,
            positions=tuple(members),
            small_sizes=tuple(small[p][m] for p, m in enumerate(members)),
            num_batches=max(-(-len(m) // batch_size) for m in members),
        )
    )
  return buckets


def downscale_for_eval(image: tf.Tensor, label: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """``image`` (uint8) resized to ``size`` with antialiased bilinear, rounded back to uint8 (as ``predict``
  resizes with Pillow), and ``label`` with nearest neighbour."""
  small = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
  small = tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)
  return small, tf.image.resize(label[..., None], size, method="nearest")[..., 0]


def eval_iterator(
    builder_or_name: BuilderOrName,
    *,
    split: str,
    local_device_count: int,
    per_device_batch: int,
    num_classes: int,
    data_dir: str | os.PathLike | None = None,
    pad_size: int | Sequence[int] | None = None,
    max_size: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
    ignore_label: int = datasets.IGNORE_LABEL,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    bucket_base: int = BUCKET_BASE,
) -> Iterator[Batch]:
  """One pass over ``split``: every example once, padded, in batches shaped ``[D, b, ...]``.

  Yields ``{"image": f32 [D,b,H,W,3], "label": i32 [D,b,H,W], "mask": bool [D,b] (True = real example),
  "height": i32 [D,b], "width": i32 [D,b], "image_id": str [D,b]}``. With ``pad_size``, ``(H, W) = pad_size`` for
  every batch. Without it, the examples are grouped by size (:func:`size_buckets`, ``bucket_base``) and ``(H, W)``
  is the largest size of the batch's group; an image whose longer side exceeds ``max_size`` (0 = no limit) is
  downscaled (:func:`downscale_for_eval`; ``height``, ``width`` and ``label`` are then the downscaled ones) and its
  batch also holds its full label ``"score_label": i32 [D,b,H',W']`` and its size ``"score_height"``,
  ``"score_width"``. Padding: image 0 (the mean pixel), label ``ignore_label``; dummy examples are all padding
  with ``mask=False``, sizes 0 and ``image_id = ""``. Every process yields the same number of batches, of the same
  shapes. Keep ``image_id`` on the host (it is a string array).
  """
  builder = _builder(builder_or_name, data_dir)
  process_index, process_count = _process(process_index, process_count)
  batch_size = local_device_count * per_device_batch
  if batch_size <= 0:
    raise ValueError(f"Need a positive batch, got {local_device_count} x {per_device_batch}.")
  plan = eval_plan(builder, split, batch_size, pad_size, max_size, process_count, bucket_base)
  index = records.index_split(builder, host_split(split, process_index, process_count))
  group = functools.partial(
      _eval_group,
      builder,
      index,
      num_classes=num_classes,
      mean=mean,
      std=std,
      ignore_label=ignore_label,
      devices=local_device_count,
      per_device=per_device_batch,
      prefetch=prefetch,
  )
  return itertools.chain.from_iterable(
      group(b.positions[process_index], b.small_sizes[process_index], b.pad, b.score_pad, b.num_batches) for b in plan
  )


def eval_plan(
    builder: tfds.core.DatasetBuilder,
    split: str,
    batch_size: int,
    pad_size: int | Sequence[int] | None = None,
    max_size: int = 0,
    process_count: int = 1,
    bucket_base: int = BUCKET_BASE,
) -> list[SizeBucket]:
  """The groups :func:`eval_iterator` evaluates, in order: with ``pad_size``, one group of every example at that
  size; else :func:`size_buckets` of the label sizes (read from the PNG headers of the whole split)."""
  shards = [host_split(split, p, process_count) for p in range(process_count)]
  if pad_size is not None:
    counts = [builder.info.splits[s].num_examples for s in shards]
    nothing = np.zeros((0, 2), np.int64)
    return [
        SizeBucket(
            _pair(pad_size, "pad_size"),
            None,
            tuple(np.arange(n) for n in counts),
            (nothing,) * process_count,
            -(-max(counts) // batch_size),
        )
    ]
  return size_buckets([label_sizes(builder, s) for s in shards], batch_size, max_size, bucket_base)


def _eval_group(
    builder,
    index: records.RecordIndex,
    positions: np.ndarray,
    small_sizes: np.ndarray,
    pad: tuple[int, int],
    score_pad: tuple[int, int] | None,
    num_batches: int,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    ignore_label: int,
    devices: int,
    per_device: int,
    prefetch: int,
) -> Iterator[Batch]:
  """The ``num_batches`` batches of the examples at ``positions`` of ``index``, padded to ``pad``; with
  ``score_pad``, each is downscaled to its ``small_sizes`` row and keeps its full label padded to ``score_pad``."""
  features = builder.info.features
  small = tf.constant(np.asarray(small_sizes).reshape(-1, 2), tf.int32)

  def prepare(k, serialized):
    example = features.deserialize_example(serialized)
    label = check_labels(example["label"][..., 0], example["image_id"], num_classes, ignore_label)
    image, out = example["image"], {}
    if score_pad is not None:
      shape = tf.shape(label)
      out["score_label"] = tf.ensure_shape(
          tf.pad(label, [[0, score_pad[0] - shape[0]], [0, score_pad[1] - shape[1]]], constant_values=ignore_label),
          list(score_pad),
      )
      out["score_height"], out["score_width"] = shape[0], shape[1]
      image, label = downscale_for_eval(image, label, small[k])
    shape = tf.shape(label)
    image, label = pad_for_eval(
        image, label, example["image_id"], pad_size=pad, mean=mean, std=std, ignore_label=ignore_label
    )
    return {
        "image": image,
        "label": label,
        "height": shape[0],
        "width": shape[1],
        "image_id": example["image_id"],
        **out,
    }

  batch_size = devices * per_device
  dataset = (
      _serialized(index, lambda: ((k, int(p)) for k, p in enumerate(positions)))
      .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .batch(batch_size)
      .prefetch(prefetch)
  )
  dataset = tfdata.without_autotune(dataset)
  return _eval_batches(
      _numpy_batches(dataset), num_batches, batch_size, pad, ignore_label, devices, per_device, score_pad
  )


def _eval_batches(
    batches: Iterator[Batch],
    num_batches: int,
    batch_size: int,
    pad: tuple[int, int],
    ignore_label: int,
    devices: int,
    per_device: int,
    score_pad: tuple[int, int] | None = None,
) -> Iterator[Batch]:
  """Fills partial / missing batches with masked dummy examples and reshapes to ``[D, b, ...]``."""
  for _ in range(num_batches):
    batch = next(batches, None)
    real = 0 if batch is None else batch["image"].shape[0]
    full = {
        "image": np.zeros((batch_size, *pad, 3), np.float32),
        "label": np.full((batch_size, *pad), ignore_label, np.int32),
        "mask": np.arange(batch_size) < real,
        "height": np.zeros(batch_size, np.int32),
        "width": np.zeros(batch_size, np.int32),
        "image_id": np.full(batch_size, "", dtype=object),
    }
    if score_pad is not None:
      full["score_label"] = np.full((batch_size, *score_pad), ignore_label, np.int32)
      full["score_height"] = np.zeros(batch_size, np.int32)
      full["score_width"] = np.zeros(batch_size, np.int32)
    if real:
      for key in full.keys() - {"mask", "image_id"}:
        full[key][:real] = batch[key]
      full["image_id"][:real] = [v.decode("utf-8") for v in batch["image_id"]]
    yield {k: v.reshape(devices, per_device, *v.shape[1:]) for k, v in full.items()}
  if next(batches, None) is not None:
    raise RuntimeError("The eval split has more examples than its dataset info records; prepare it again.")


# ----------------------------------------------------------------------------------------------- config


class EvalPipeline(NamedTuple):
  """What ``eval_from_config`` builds: a factory of eval passes and the dataset's facts."""

  make_eval: Callable[[], Iterator[Batch]]
  class_names: list[str]
  num_eval_examples: int
  num_eval_batches: Callable[[], int] | None = None  # batches of one pass (the size groups' partial batches count)


class Pipelines(NamedTuple):
  """What ``from_config`` builds: the training iterator, a factory of eval passes and the dataset's facts."""

  train: Iterator[Batch]
  make_eval: Callable[[], Iterator[Batch]]
  class_names: list[str]
  num_train_examples: int
  num_eval_examples: int


def _checked_builder(cfg: Any):
  """The prepared builder of ``cfg`` and its class names (their number must be ``cfg.num_classes``)."""
  builder = datasets.get_builder(
      cfg.name,
      data_dir=cfg.get("data_dir"),
      manual_dir=cfg.get("manual_dir"),
      num_classes=cfg.num_classes,
      foreground_255=bool(cfg.get("foreground_255", False)),
  )
  names = datasets.class_names(builder)
  if len(names) != cfg.num_classes:
    raise datasets.DataError(
        f"Config says num_classes={cfg.num_classes} but {builder.info.full_name} has " f"{len(names)} classes: {names}."
    )
  return builder, names


def _common(cfg: Any, process_index: int | None, process_count: int | None) -> dict:
  return dict(
      num_classes=cfg.num_classes,
      mean=tuple(cfg.mean),
      std=tuple(cfg.std),
      ignore_label=cfg.ignore_label,
      process_index=process_index,
      process_count=process_count,
  )


def _eval_pipeline(
    builder,
    names: list[str],
    cfg: Any,
    local_device_count: int,
    per_device_batch: int,
    process_index: int | None,
    process_count: int | None,
) -> EvalPipeline:
  common = _common(cfg, process_index, process_count)
  sizing = dict(pad_size=cfg.get("eval_pad_size"), max_size=int(cfg.get("eval_max_size", 0)))

  def make_eval() -> Iterator[Batch]:
    return eval_iterator(
        builder,
        split=cfg.eval_split,
        local_device_count=local_device_count,
        per_device_batch=per_device_batch,
        **sizing,
        **common,
    )

  @functools.cache
  def num_batches() -> int:
    _, count = _process(process_index, process_count)
    plan = eval_plan(builder, cfg.eval_split, local_device_count * per_device_batch, process_count=count, **sizing)
    return sum(b.num_batches for b in plan)

  return EvalPipeline(make_eval, names, builder.info.splits[cfg.eval_split].num_examples, num_batches)


def eval_from_config(
    dataset_cfg: Any,
    *,
    local_device_count: int,
    per_device_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalPipeline:
  """The evaluation side of :func:`from_config` alone (the train split is never indexed). Keys read: ``name``,
    ``data_dir``, ``manual_dir``, ``eval_split``, ``num_classes``, ``ignore_label``, ``mean``, ``std``,
    ``eval_pad_size`` (None = group the examples by size), ``eval_max_size`` (without ``eval_pad_size``: longest
  side the network sees; 0 = no limit)."""
  return _eval_pipeline(
      *_checked_builder(dataset_cfg), dataset_cfg, local_device_count, per_device_batch, process_index, process_count
  )


def from_config(
    dataset_cfg: Any,
    *,
    seed: int,
    local_device_count: int,
    per_device_batch: int,
    eval_per_device_batch: int | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    weight_map: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Pipelines:
  """Builds (and prepares if needed) the dataset described by an ``ml_collections.ConfigDict``.

  Keys read: those of :func:`eval_from_config` and ``train_split``, ``crop_size``, ``min_scale``, ``max_scale``,
  ``scale_step``. No shuffle buffer is needed: each epoch is a full permutation. ``weight_map`` adds per-pixel
  training weights (see :func:`train_iterator`).
  """
  cfg = dataset_cfg
  builder, names = _checked_builder(cfg)
  train = train_iterator(
      builder,
      split=cfg.train_split,
      crop_size=cfg.crop_size,
      local_device_count=local_device_count,
      per_device_batch=per_device_batch,
      seed=seed,
      start_step=start_step,
      min_scale=cfg.min_scale,
      max_scale=cfg.max_scale,
      scale_step=cfg.scale_step,
      weight_map=weight_map,
      **_common(cfg, process_index, process_count),
  )
  ev = _eval_pipeline(
      builder, names, cfg, local_device_count, eval_per_device_batch or per_device_batch, process_index, process_count
  )
  return Pipelines(train, ev.make_eval, names, builder.info.splits[cfg.train_split].num_examples, ev.num_eval_examples)
