"""Fully-connected (dense) CRF post-processing: the comparison method of the paper's Table 5 ("DeepLabv3+ CRF [14]").

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials", NIPS 2011: a
Gibbs energy with unary ``ψ_u(x_i) = -log p_i(x_i)`` and, between every pair of pixels, a Potts penalty weighed by

  ``k(i, j) = w1 · exp(-|p_i - p_j|² / 2θα² - |I_i - I_j|² / 2θβ²)  +  w2 · exp(-|p_i - p_j|² / 2θγ²)``

(the appearance "bilateral" kernel over position p and RGB colour I, and the smoothness "Gaussian" kernel over
position), minimised approximately by ``iterations`` rounds of mean-field inference with permutohedral-lattice
filtering. The inference itself is the authors' C++ code through the optional package ``pydensecrf2`` (module name
``pydensecrf``); it is imported only inside the functions here, so the project imports and runs without it.

This is CPU code on NumPy arrays (one image at a time); it never touches JAX.
"""

from __future__ import annotations

import time

import numpy as np

from dilaff_jax.engine import eval_metrics, visualize

PACKAGE = "pydensecrf2"
REQUIREMENT = "pydensecrf2==1.1"
MISSING_MESSAGE = (
    f"the dense CRF needs the optional package {PACKAGE}: .venv/bin/pip install -e '.[crf]' (or {REQUIREMENT}; "
    "it compiles a C++ extension at install time: needs g++ and the Python headers, e.g. python3-dev)"
)

# Probabilities are clipped to this before ``-log``, as pydensecrf.utils.unary_from_softmax does (clip=1e-5): a
# unary of at most -log(1e-5) ≈ 11.5 lets the pairwise terms (≤ w1 + w2 per pixel after normalisation) overturn a
# near-certain wrong pixel. The argmax never changes (the top class of a distribution over C has p ≥ 1/C ≫ 1e-5).
PROB_FLOOR = 1e-5

# Tolerance of the "each pixel's probabilities sum to 1" check (float32 softmax of 21 classes is within ~1e-6).
SUM_TOLERANCE = 1e-3


def _densecrf_module():
  """The compiled ``pydensecrf.densecrf`` module, or an ImportError naming the package to install."""
  try:
    from pydensecrf import densecrf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(MISSING_MESSAGE) from e
  return densecrf


def available() -> bool:
  """Whether the optional dense-CRF package (``pydensecrf2``) can be imported here."""
  try:
    _densecrf_module()
  except ImportError:
    return False
  return True


def _check_inputs(image, probs) -> tuple[np.ndarray, np.ndarray]:
  """Validated ``(image uint8 [H, W, 3], probs float32 [H, W, C])``; a ValueError/TypeError naming what is wrong."""
  image = np.asarray(image)
  probs = np.asarray(probs)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"dense_crf: image must be RGB [H, W, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    raise TypeError(
        f"dense_crf: image must be uint8 in [0, 255] (the colour scale srgb is in), got dtype " f"{image.dtype}"
    )
  if probs.ndim != 3:
    raise ValueError(f"dense_crf: probs must be class probabilities [H, W, C], got shape {probs.shape}")
  if probs.shape[:2] != image.shape[:2]:
    raise ValueError(
        f"dense_crf: probs are {probs.shape[0]}x{probs.shape[1]} but the image is "
        f"{image.shape[0]}x{image.shape[1]}; they must have the same height and width"
    )
  if min(probs.shape) < 1:
    raise ValueError(f"dense_crf: probs must be non-empty, got shape {probs.shape}")
  if not np.issubdtype(probs.dtype, np.floating):
    raise TypeError(f"dense_crf: probs must be floating-point probabilities, got dtype {probs.dtype}")
  probs = probs.astype(np.float32)
  if not np.all(np.isfinite(probs)):
    raise ValueError("dense_crf: probs contain NaN or infinite values")
  if probs.min() < 0.0 or probs.max() > 1.0 + SUM_TOLERANCE:
    raise ValueError(
        f"dense_crf: probs must lie in [0, 1], got values in [{probs.min()}, {probs.max()}] "
        "(pass the softmax of the logits, not the logits)"
    )
  sums = probs.sum(axis=-1, dtype=np.float64)
  worst = np.unravel_index(np.argmax(np.abs(sums - 1.0)), sums.shape)
  if abs(sums[worst] - 1.0) > SUM_TOLERANCE:
    raise ValueError(
        f"dense_crf: probs must sum to 1 over the class axis (last), but pixel {tuple(map(int, worst))} "
        f"sums to {sums[worst]:.6f}"
    )
  return np.require(image, requirements=("C", "W")), probs  # pydensecrf needs a writeable C-ordered buffer


def _check_params(iterations, sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral) -> None:
  if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
    raise ValueError(f"dense_crf: iterations must be an integer >= 0, got {iterations!r}")
  for name, value in (("sxy_gaussian", sxy_gaussian), ("sxy_bilateral", sxy_bilateral), ("srgb", srgb)):
    if not value > 0:
      raise ValueError(f"dense_crf: {name} (a kernel standard deviation) must be > 0, got {value!r}")
  for name, value in (("compat_gaussian", compat_gaussian), ("compat_bilateral", compat_bilateral)):
    if not value >= 0:
      raise ValueError(f"dense_crf: {name} (a Potts weight) must be >= 0, got {value!r}")


def dense_crf(
    image_uint8: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int = 10,
    sxy_gaussian: float = 3,
    compat_gaussian: float = 3,
    sxy_bilateral: float = 80,
    srgb: float = 13,
    compat_bilateral: float = 10,
) -> np.ndarray:
  """Refine one image's class probabilities with a fully-connected CRF (mean-field inference).

  Args:
    image_uint8: the RGB image ``[H, W, 3]``, uint8 in [0, 255] (``srgb`` is in these units; a normalised float
      image would need a rescaled ``srgb``, so it is refused).
    probs: the network's class probabilities ``[H, W, C]`` at the image's resolution (softmax of the upsampled
      logits), each pixel summing to 1. The unary is ``-log(max(p, 1e-5))``.
    iterations: mean-field rounds (DeepLab uses 10). 0 returns the normalised ``exp(-unary)``, i.e. ``probs``
      up to the 1e-5 floor, with the same argmax.
    sxy_gaussian, compat_gaussian: θγ (pixels) and w2 of the smoothness kernel.
    sxy_bilateral, srgb, compat_bilateral: θα (pixels), θβ (RGB levels) and w1 of the appearance kernel.

  Defaults: θγ = 3, w2 = 3, θα = 80, θβ = 13, w1 = 10, both kernels with a Potts compatibility: the settings of
  Krähenbühl & Koltun's reference code (densecrf/examples/dense_inference.cpp; also the pydensecrf README). DeepLab
  v1 (Chen et al., ICLR 2015, §4) fixes w2 = 3, θγ = 3 and cross-validates w1, θα, θβ on PASCAL VOC val; its
  released settings are w1 = 4, θα = 121, θβ = 5 (DeepLab-LargeFOV, VGG-16) and, for DeepLab-v2 ResNet-101,
  w1 = 4, θα = 67, θβ = 3, w2 = 3, θγ = 1 (as carried by re-implementations, e.g. kazuto1011/deeplab-pytorch
  configs/voc12.yaml). The paper under reproduction does not state its CRF parameters (Table 5): pass DeepLab's
  to compare with them.

  Returns:
    float32 ``[H, W, C]``: the mean-field marginals, each pixel a distribution over the C classes.

  Raises:
    ImportError: ``pydensecrf2`` is not installed (the message says how to install it).
    TypeError, ValueError: an input of the wrong dtype, shape or range (the message names it).
  """
  image, probs = _check_inputs(image_uint8, probs)
  _check_params(iterations, sxy_gaussian, compat_gaussian, sxy_bilateral, srgb, compat_bilateral)
  densecrf = _densecrf_module()
  h, w, c = probs.shape
  unary = -np.log(np.maximum(probs, np.float32(PROB_FLOOR)))  # [H, W, C]
  unary = np.ascontiguousarray(unary.reshape(h * w, c).T)  # [C, H·W], row-major pixels, as DenseCRF2D expects
  model = densecrf.DenseCRF2D(w, h, c)
  model.setUnaryEnergy(unary)
  model.addPairwiseGaussian(sxy=float(sxy_gaussian), compat=float(compat_gaussian))
  model.addPairwiseBilateral(sxy=float(sxy_bilateral), srgb=float(srgb), rgbim=image, compat=float(compat_bilateral))
  marginals = np.asarray(model.inference(int(iterations)), dtype=np.float32)  # [C, H·W]
  return np.ascontiguousarray(marginals.T.reshape(h, w, c))


def _full_size(batch: dict, i: int, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Example ``i``'s full label and its downscaled ``prediction`` scaled back to it with nearest neighbour
  (``inference.resize_nearest``'s rule)."""
  flat = lambda key: batch[key].reshape(-1, *batch[key].shape[2:])[i]
  full_h, full_w = int(flat("score_height")), int(flat("score_width"))
  h, w = prediction.shape
  rows = (2 * np.arange(full_h) + 1) * h // (2 * full_h)
  cols = (2 * np.arange(full_w) + 1) * w // (2 * full_w)
  return flat("score_label")[:full_h, :full_w], prediction[rows[:, None], cols[None, :]]


def confusion_after_crf(batch: dict, probs: np.ndarray, config) -> tuple[np.ndarray, float]:
  """Dense-CRF post-processing (Table 5's comparison) of one host batch's probabilities ``[N, H, W, C]``: the
  confusion matrix of the refined predictions over the real pixels, and the CRF seconds spent. ``config.eval``'s
  ``crf_*`` keys are :func:`dense_crf`'s parameters."""
  c = config.dataset.num_classes
  e = config.eval
  images = visualize.denormalize(
      batch["image"].reshape(-1, *batch["image"].shape[2:]), config.dataset.mean, config.dataset.std
  )
  labels = batch["label"].reshape(-1, *batch["label"].shape[2:])
  mask, heights, widths = (batch[k].reshape(-1) for k in ("mask", "height", "width"))
  conf = np.zeros((c, c), np.int64)
  seconds = 0.0
  for i in np.flatnonzero(mask):
    h, w = int(heights[i]), int(widths[i])
    start = time.perf_counter()
    refined = dense_crf(
        images[i, :h, :w],
        probs[i, :h, :w],
        iterations=e.crf_iterations,
        sxy_gaussian=e.crf_sxy_gaussian,
        compat_gaussian=e.crf_compat_gaussian,
        sxy_bilateral=e.crf_sxy_bilateral,
        srgb=e.crf_srgb,
        compat_bilateral=e.crf_compat_bilateral,
    )
    seconds += time.perf_counter() - start
    y, prediction = labels[i, :h, :w], refined.argmax(-1)
    if "score_label" in batch:  # inferred downscaled: scored at the full size, as evaluate.scored_confusion does
      y, prediction = _full_size(batch, i, prediction)
    conf += eval_metrics.confusion_matrix_np(y, prediction, c, y != config.dataset.ignore_label)
  return conf, seconds
