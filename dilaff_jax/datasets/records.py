"""Random access to the serialized examples of a prepared TFDS split (TFRecord shards, read in place).

The training pipeline visits examples in a fresh random order each epoch and must resume at any step without
reading what it skips. TFDS's TFRecord shards are sequential files, so this module scans each shard's record
headers once (a seek per record, no payload read) to learn where every record lies, then reads record ``i`` with
one seek. Split slices (``"train[:50%]"``, ``tfds.even_splits``) are honoured through TFDS's file instructions.

TFRecord framing: ``uint64 length | uint32 masked crc(length) | data[length] | uint32 masked crc(data)``.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

_HEADER_BYTES = 12  # uint64 length + uint32 crc of the length
_FOOTER_BYTES = 4  # uint32 crc of the data


def record_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(data offset, data length) of every record in the TFRecord file ``path``, in file order."""
  offsets, lengths = [], []
  with tf.io.gfile.GFile(path, "rb") as f:
    size = f.size()
    position = 0
    while position < size:
      f.seek(position)
      header = f.read(_HEADER_BYTES)
      if len(header) != _HEADER_BYTES:
        raise ValueError(f"Truncated TFRecord header at byte {position} of {path}.")
      (length,) = struct.unpack("<Q", header[:8])
      offsets.append(position + _HEADER_BYTES)
      lengths.append(length)
      position += _HEADER_BYTES + length + _FOOTER_BYTES
    if position != size:
      raise ValueError(f"Truncated TFRecord file {path}: the last record ends at {position}, the file at {size}.")
  return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class RecordIndex:
  """Where each example of a (sub)split lies: shard file, byte offset and length, in TFDS's example order."""

  files: tuple[str, ...]
  file_index: np.ndarray  # [N] int: index into ``files``
  offsets: np.ndarray  # [N] int64
  lengths: np.ndarray  # [N] int64

  def __len__(self) -> int:
    return int(self.offsets.shape[0])


def index_split(builder: tfds.core.DatasetBuilder, split: str) -> RecordIndex:
  """The ``RecordIndex`` of ``split`` (any TFDS split expression) of a prepared TFRecord dataset."""
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != "tfrecord":
    raise ValueError(
        f"{builder.info.full_name} is stored as {file_format.value}; the input pipeline reads TFRecord shards. "
        "Prepare it with the default file format."
    )
  files, file_index, offsets, lengths = [], [], [], []
  for instruction in builder.info.splits[split].file_instructions:
    shard_offsets, shard_lengths = record_offsets(instruction.filename)
    if shard_offsets.shape[0] != instruction.examples_in_shard:
      raise ValueError(
          f"{instruction.filename} holds {shard_offsets.shape[0]} records but the dataset info says "
          f"{instruction.examples_in_shard}; the prepared dataset is damaged, prepare it again."
      )
    stop = instruction.skip + instruction.take if instruction.take >= 0 else None
    offsets.append(shard_offsets[instruction.skip : stop])
    lengths.append(shard_lengths[instruction.skip : stop])
    file_index.append(np.full(offsets[-1].shape, len(files), dtype=np.int64))
    files.append(instruction.filename)
  if not files:
    return RecordIndex((), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
  return RecordIndex(tuple(files), np.concatenate(file_index), np.concatenate(offsets), np.concatenate(lengths))


class RecordReader:
  """Reads serialized examples by position in a ``RecordIndex``; keeps its shard files open until closed."""

  def __init__(self, index: RecordIndex):
    self._index = index
    self._handles: dict[int, tf.io.gfile.GFile] = {}

  def read(self, position: int) -> bytes:
    index = self._index
    file_number = int(index.file_index[position])
    handle = self._handles.get(file_number)
    if handle is None:
      handle = self._handles[file_number] = tf.io.gfile.GFile(index.files[file_number], "rb")
    handle.seek(int(index.offsets[position]))
    data = handle.read(int(index.lengths[position]))
    if len(data) != index.lengths[position]:
      raise ValueError(f"Short read of example {position} from {index.files[file_number]}.")
    return data

  def close(self) -> None:
    for handle in self._handles.values():
      handle.close()
    self._handles.clear()
