"""Dense CRF post-processing (the paper's Table 5 comparison): refinement on hand-made images, and input checks.

The refinement tests run the real C++ inference of the optional package ``pydensecrf2`` (the ``test`` and ``crf`` extras of pyproject.toml); the
input-check and missing-package tests need no package (validation happens before the import).
"""

import sys

import numpy as np
import pytest

from dilaff_jax.engine import crf

H, W = 24, 36  # H != W: a transposed or mis-reshaped layout cannot pass
RED, BLUE = (200, 30, 30), (30, 30, 200)


def _two_region_image() -> tuple[np.ndarray, np.ndarray]:
  """A red left half (class 0) and a blue right half (class 1), with the labels."""
  image = np.empty((H, W, 3), np.uint8)
  image[:, : W // 2] = RED
  image[:, W // 2 :] = BLUE
  labels = np.zeros((H, W), np.int64)
  labels[:, W // 2 :] = 1
  return image, labels


def _probs_leaning(labels: np.ndarray, lean: np.ndarray, p_top: float, classes: int = 3) -> np.ndarray:
  """Distributions putting ``p_top`` on ``lean`` (per pixel) and the rest spread evenly on the other classes."""
  probs = np.full((*labels.shape, classes), (1.0 - p_top) / (classes - 1), np.float32)
  np.put_along_axis(probs, lean[..., None], np.float32(p_top), axis=-1)
  return probs


def _miou(pred: np.ndarray, labels: np.ndarray, classes: int) -> float:
  """Mean IoU over the classes present in prediction or labels, by brute-force per-class counts."""
  ious = []
  for k in range(classes):
    inter = np.sum((pred == k) & (labels == k))
    union = np.sum((pred == k) | (labels == k))
    if union:
      ious.append(inter / union)
  return float(np.mean(ious))


def test_removes_isolated_wrong_pixels():
  image, labels = _two_region_image()
  rng = np.random.default_rng(0)
  flipped = rng.random((H, W)) < 0.08  # ~70 isolated pixels lean 0.6 towards a wrong class
  wrong = (labels + rng.integers(1, 3, size=labels.shape)) % 3
  lean = np.where(flipped, wrong, labels)
  probs = _probs_leaning(labels, lean, p_top=0.6)
  before = _miou(probs.argmax(-1), labels, 3)
  assert before < 0.85  # the noise is really there

  refined = crf.dense_crf(image, probs)

  assert refined.shape == (H, W, 3) and refined.dtype == np.float32
  np.testing.assert_allclose(refined.sum(-1), 1.0, atol=1e-5)
  assert refined.min() >= 0.0
  assert _miou(refined.argmax(-1), labels, 3) == 1.0


def test_appearance_kernel_follows_colour_edges():
  """Pixels on both sides of the colour edge lean 0.6 the wrong way: colour, not position, tells their class."""
  image, labels = _two_region_image()
  band = np.abs(np.arange(W) - W // 2 + 0.5) < 4  # 4 columns each side of the edge
  lean = np.where(band[None, :], 1 - labels, labels)
  probs = _probs_leaning(labels, lean, p_top=0.6, classes=2)

  coloured = crf.dense_crf(image, probs)
  grey = crf.dense_crf(np.full_like(image, 100), probs)

  assert _miou(coloured.argmax(-1), labels, 2) == 1.0
  assert _miou(grey.argmax(-1), labels, 2) < 0.9  # without colour the wrong band is not (fully) recovered


def test_zero_iterations_returns_the_normalised_unary():
  image, labels = _two_region_image()
  rng = np.random.default_rng(1)
  probs = rng.dirichlet(np.full(4, 0.3), size=(H, W)).astype(np.float32)  # many entries below the 1e-5 floor
  out = crf.dense_crf(image, probs, iterations=0)
  floored = np.maximum(probs.astype(np.float64), crf.PROB_FLOOR)
  np.testing.assert_allclose(out, floored / floored.sum(-1, keepdims=True), atol=1e-6)
  np.testing.assert_array_equal(out.argmax(-1), probs.argmax(-1))


def test_float64_probs_accepted_and_result_float32():
  image, labels = _two_region_image()
  probs = _probs_leaning(labels, labels, p_top=0.9).astype(np.float64)
  out = crf.dense_crf(image, probs, iterations=2)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out.argmax(-1), labels)


def test_read_only_and_strided_inputs_accepted():
  """np.asarray(PIL image) is read-only; a flipped view is not C-ordered: neither may reach the C++ buffer as is."""
  image, labels = _two_region_image()
  probs = _probs_leaning(labels, labels, p_top=0.9)
  probs[:, :3] = _probs_leaning(labels, 1 - labels, p_top=0.9)[:, :3]  # not mirror-symmetric
  expected = crf.dense_crf(image, probs, iterations=3)
  flipped = crf.dense_crf(image[:, ::-1].copy(), probs[:, ::-1].copy(), iterations=3)
  image.flags.writeable = False
  probs.flags.writeable = False
  np.testing.assert_array_equal(crf.dense_crf(image, probs, iterations=3), expected)
  np.testing.assert_array_equal(crf.dense_crf(image[:, ::-1], probs[:, ::-1], iterations=3), flipped)


def test_available_with_the_package_installed():
  assert crf.available() is True


def test_missing_package_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "pydensecrf", None)  # `import pydensecrf...` now raises ImportError
  monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
  assert crf.available() is False
  image, labels = _two_region_image()
  with pytest.raises(
      ImportError, match=r"the dense CRF needs the optional package pydensecrf2: .venv/bin/pip install -e '.\[crf\]'"
  ):
    crf.dense_crf(image, _probs_leaning(labels, labels, p_top=0.9))
  # a run asking for it is refused at start-up (not after its training), naming the key and the extra
  from configs import synthetic
  from dilaff_jax.engine import config_checks

  config = synthetic.get_config("tiny")
  config.eval.crf = True
  with pytest.raises(config_checks.ConfigError, match=r"^config.eval.crf = True: the dense CRF needs .*\[crf\]"):
    config_checks.validate(config, num_devices=1, mode="evaluate")


def _valid():
  image, labels = _two_region_image()
  return image, _probs_leaning(labels, labels, p_top=0.9)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda im, p: (im.astype(np.float32) / 255, p), TypeError, "image must be uint8"),
        (lambda im, p: (im[..., 0], p), ValueError, r"image must be RGB \[H, W, 3\]"),
        (lambda im, p: (im[..., :2], p), ValueError, r"image must be RGB \[H, W, 3\]"),
        (lambda im, p: (im, p[None]), ValueError, r"probs must be class probabilities \[H, W, C\]"),
        (lambda im, p: (im, p[:, :-1]), ValueError, "probs are 24x35 but the image is 24x36"),
        (lambda im, p: (im, p[:, :, :0]), ValueError, "probs must be non-empty"),
        (lambda im, p: (im, (p > 0.5).astype(np.int32)), TypeError, "probs must be floating-point"),
        (lambda im, p: (im, np.where(np.arange(W)[None, :, None] == 3, np.nan, p)), ValueError, "NaN or infinite"),
        (lambda im, p: (im, np.log(p)), ValueError, r"probs must lie in \[0, 1\].*not the logits"),
        (
            lambda im, p: (im, p * np.where(np.arange(H)[:, None, None] == 5, 0.9, 1.0).astype(np.float32)),
            ValueError,
            r"sum to 1 over the class axis \(last\), but pixel \(5, 0\) sums to 0\.9",
        ),
    ],
)
def test_bad_inputs_are_named(mutate, error, match):
  image, probs = mutate(*_valid())
  with pytest.raises(error, match=match):
    crf.dense_crf(image, probs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iterations": -1}, "iterations must be an integer >= 0"),
        ({"iterations": 2.5}, "iterations must be an integer >= 0"),
        ({"sxy_gaussian": 0}, r"sxy_gaussian \(a kernel standard deviation\) must be > 0"),
        ({"sxy_bilateral": -3}, r"sxy_bilateral .* must be > 0"),
        ({"srgb": 0.0}, r"srgb .* must be > 0"),
        ({"compat_bilateral": -1}, r"compat_bilateral \(a Potts weight\) must be >= 0"),
        ({"compat_gaussian": float("nan")}, r"compat_gaussian .* must be >= 0"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    crf.dense_crf(*_valid(), **kwargs)
