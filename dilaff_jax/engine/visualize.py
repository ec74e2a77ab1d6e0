"""Pictures for people: label palettes, colourised masks, blends, affinity maps (numpy), the training's TensorBoard
pictures, and the figures that evaluation writes (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:  # an annotation only: config_checks -> crf -> visualize must not import the spec back
  from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.method import affinity
from dilaff_jax.models.deeplab import upsample_logits

# Cityscapes' 19 train-id colours (cityscapesScripts' labels.py).
CITYSCAPES_COLORS = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    np.uint8,
)
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
    palette[: len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
  palette[255] = VOID_COLOR
  return palette


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """``[..., H, W]`` integer labels to ``[..., H, W, 3]`` uint8 colours."""
  return palette[np.clip(np.asarray(labels), 0, len(palette) - 1).astype(np.int64)]


def blend(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Alpha blend of a colour mask over an RGB uint8 image."""
  out = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def legend_image(entries: Sequence[tuple[str, np.ndarray]], row: int = 20, width: int = 200) -> np.ndarray:
  """A legend as an RGB uint8 picture: one row per ``(name, rgb)``, a ``row``-px colour swatch then the name in
  black on white (PIL's built-in font: no matplotlib, no font file)."""
  from PIL import Image, ImageDraw

  img = Image.new("RGB", (width, max(len(entries), 1) * row), "white")
  draw = ImageDraw.Draw(img)
  for i, (name, rgb) in enumerate(entries):
    draw.rectangle([2, i * row + 2, row - 3, (i + 1) * row - 3], fill=tuple(int(v) for v in rgb))
    draw.text((row + 4, i * row + row // 2 - 6), name, fill="black")
  return np.asarray(img)


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


def pyplot():
  """``matplotlib.pyplot`` on the file-only Agg backend (no display needed): every figure of the project is drawn
  through this one set-up."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_affinity_accuracy(acc: dict, path: str, title: str) -> None:
  """Fig. 4-style PNG: accuracy of the affinity prediction against n_k, one line per rate and their mean."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
  ks = np.arange(9)
  for rate, row in acc["per_rate"].items():
    ax.plot(ks, [np.nan if v is None else 100 * v for v in row], marker="o", label=f"rate {rate}")
  ax.plot(ks, [np.nan if v is None else 100 * v for v in acc["mean"]], "k--", lw=2, label="mean")
  ax.set_xticks(ks, [f"$n_{k}$" for k in ks])
  ax.set_ylabel("affinity accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def save_grid(columns: dict[str, np.ndarray], heights, widths, path: str, legend: dict | None = None) -> None:
  """A PNG grid: one row per example, one column per entry of ``columns`` (title -> uint8 pictures
  ``[N, H, W, 3]``), each cropped to the example's ``heights[i] x widths[i]``; ``legend``: class name -> RGB."""
  plt = pyplot()
  from matplotlib.patches import Patch

  n = len(heights)
  fig, axes = plt.subplots(n, len(columns), figsize=(2.2 * len(columns), 2.2 * n), dpi=100, squeeze=False)
  for row in range(n):
    h, w = int(heights[row]), int(widths[row])
    for col, (title, pics) in enumerate(columns.items()):
      ax = axes[row, col]
      ax.imshow(pics[row][:h, :w])
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(title, fontsize=9)
  if legend:
    handles = [Patch(color=np.asarray(rgb) / 255.0, label=name) for name, rgb in legend.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / n, 1, 1))
  else:
    fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def summary_images(out: dict, batch: dict, spec: RunSpec, palette: np.ndarray) -> dict[str, np.ndarray]:
  """TensorBoard pictures of a training batch (the first 2 examples of the first device): input, label, prediction
  and the mean predicted affinity of the first rate (dark = boundary). ``out`` is the model's output for
  ``batch["image"]`` (``[devices, B, ...]``); ``spec.config.dataset`` gives the normalisation's mean and std."""
  rates, dataset_config = spec.rates, spec.config.dataset
  labels = np.asarray(batch["label"][0][:2])
  size = labels.shape[1:3]
  logits = np.asarray(upsample_logits(out["logits"][0][:2], size))
  pics = {
      "input": denormalize(np.asarray(batch["image"][0][:2]), dataset_config.mean, dataset_config.std),
      "label": colorize(labels, palette),
      "prediction": colorize(logits.argmax(-1), palette),
  }
  if rates:
    aff = np.asarray(jax.nn.sigmoid(upsample_logits(out["affinity_logits"][0][:2, ..., :8], size)))
    pics[f"affinity_rate_{affinity.rate_label(rates[0])}"] = affinity_picture(aff)
  return pics
