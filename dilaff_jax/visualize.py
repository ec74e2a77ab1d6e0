"""Pictures for people: label palettes, colourised masks, blends, affinity maps (numpy only)."""

from __future__ import annotations

import numpy as np

# Cityscapes' 19 train-id colours (cityscapesScripts' labels.py).
CITYSCAPES_COLORS = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
VOID_COLOR = (224, 224, 192)  # VOC's colour for the void label 255


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """PASCAL VOC's palette: class ``c``'s colour is built from the bits of ``c`` (the devkit's ``labelcolormap``)."""
  palette = np.zeros((num_colors, 3), np.uint8)
  for c in range(num_colors):
    r = g = b = 0
    v = c
    for shift in range(7, -1, -1):
      r |= (v & 1) << shift
      g |= ((v >> 1) & 1) << shift
      b |= ((v >> 2) & 1) << shift
      v >>= 3
    palette[c] = (r, g, b)
  return palette


def palette_for(dataset_name: str) -> np.ndarray:
  """A 256-entry palette: Cityscapes colours for Cityscapes, VOC's for everything else; 255 is void."""
  palette = voc_palette(256)
  if "cityscapes" in dataset_name:
    palette[:len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
  palette[255] = VOID_COLOR
  return palette


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """``[..., H, W]`` integer labels to ``[..., H, W, 3]`` uint8 colours."""
  return palette[np.clip(np.asarray(labels), 0, len(palette) - 1).astype(np.int64)]


def blend(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Alpha blend of a colour mask over an RGB uint8 image."""
  out = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def denormalize(images: np.ndarray, mean, std) -> np.ndarray:
  """Normalised float images back to uint8 RGB."""
  out = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def affinity_picture(affinity: np.ndarray) -> np.ndarray:
  """``[..., H, W, 8]`` affinities of one rate in [0, 1] to a grey uint8 picture of their mean: boundaries
  (low affinity to the neighbours) show dark."""
  mean = np.asarray(affinity, np.float32).mean(-1)
  grey = np.clip(255 * mean + 0.5, 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)
