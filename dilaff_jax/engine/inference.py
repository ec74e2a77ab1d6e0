"""Inference shared by evaluation and prediction: DeepLab's multi-scale and flipped passes, and the masks that keep
affinity propagation inside each image's real (unpadded) area."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.method import affinity, propagation
from dilaff_jax.models.deeplab import resize_bilinear, upsample_logits


def flip_permutation(rates: affinity.Rates) -> np.ndarray:
  """Channel permutation mapping the affinity of a left-right flipped image back: direction ``(s, t)`` of the
  flipped image is direction ``(s, -t)`` of the original."""
  offsets = affinity.neighbor_offsets(rates)
  perm = []
  for rate_index in range(len(rates)):
    block = list(offsets[8 * rate_index : 8 * rate_index + 8])
    perm.extend(8 * rate_index + block.index((s, -t)) for s, t in block)
  return np.asarray(perm)


def predict(
    apply_fn,
    variables,
    images: jax.Array,
    *,
    size: tuple[int, int],
    output_stride: int,
    scales: Sequence[float],
    flip: bool,
    rates: affinity.Rates,
    mu: float,
) -> tuple[jax.Array, jax.Array | None]:
  """Class probabilities ``[B, H, W, C]`` and affinities ``[B, H, W, 8·|R|]`` (steep sigmoid, Eq. 7) at ``size``.

  DeepLab's multi-scale inference: the probabilities are the mean softmax over every scale in ``scales`` and, with
  ``flip``, its left-right flip. The affinity comes from the scale-1.0 passes only (and their flip, channels mapped
  back to the mirrored directions): the channel of rate ``r`` at input scale ``s`` spans ``r/s`` original pixels, so
  affinities of different scales measure different distances and are never averaged together.
  """
  if rates and 1.0 not in tuple(scales):
    raise ValueError(f"predict: scales {tuple(scales)} lack 1.0, the only scale whose affinity matches the rates")
  h, w = images.shape[1:3]
  probs, affs, n, n_aff = 0.0, 0.0, 0, 0
  perm = flip_permutation(rates) if rates else None
  for scale in scales:
    if scale == 1.0:
      scaled = images
    else:  # DeepLab-aligned sizes: scale * (size - 1) + 1
      sh, sw = int(round(scale * (h - 1))) + 1, int(round(scale * (w - 1))) + 1
      scaled = resize_bilinear(images, (sh, sw))
    for flipped in ((False, True) if flip else (False,)):
      x = scaled[:, :, ::-1] if flipped else scaled
      out = apply_fn(variables, x, train=False, output_stride=output_stride)
      logits = upsample_logits(out["logits"], (x.shape[1], x.shape[2]))
      if flipped:
        logits = logits[:, :, ::-1]
      probs = probs + jax.nn.softmax(resize_bilinear(logits, size), axis=-1)
      n += 1
      if rates and scale == 1.0:
        a = propagation.steep_sigmoid(upsample_logits(out["affinity_logits"], (x.shape[1], x.shape[2])), mu)
        if flipped:
          a = a[:, :, ::-1][..., perm]
        affs = affs + resize_bilinear(a, size)
        n_aff += 1
  return probs / n, (affs / n_aff if rates else None)


def predict_as_configured(
    apply_fn, variables, images: jax.Array, spec: RunSpec, size: tuple[int, int] | None = None
) -> tuple[jax.Array, jax.Array | None]:
  """:func:`predict` with the spec's rates, ``config.eval``'s output stride, scales and flip and
  ``config.affinity.mu``: how evaluation, its example figure and prediction all run the network. ``size`` defaults
  to the images' own."""
  config = spec.config
  return predict(
      apply_fn,
      variables,
      images,
      size=tuple(images.shape[1:3]) if size is None else size,
      output_stride=config.eval.output_stride,
      scales=tuple(config.eval.scales),
      flip=bool(config.eval.flip),
      rates=spec.rates,
      mu=config.affinity.mu,
  )


def inside_mask(heights: jax.Array, widths: jax.Array, size: tuple[int, int], rates: affinity.Rates) -> jax.Array:
  """``[B, H, W, 8·|R|]`` bool: the neighbour of each direction lies inside the example's real (unpadded) image.
  Propagation must not pull predictions in from the padding: a neighbour outside the image contributes nothing."""
  return affinity.neighbour_inside(size, affinity.neighbor_offsets(rates), heights, widths)


def nearest_rows(out_length: jax.Array, in_length: jax.Array, size: int) -> jax.Array:
  """``[B, size]`` source index of each output position ``i`` when resizing ``in_length`` to ``out_length`` with
  nearest neighbour: ``floor((i + 0.5) · in / out)`` (Pillow's rule), in integers; 0 beyond ``out_length``."""
  i = jnp.arange(size, dtype=jnp.int32)[None]
  out_length = jnp.maximum(out_length.astype(jnp.int32)[:, None], 1)
  index = ((2 * i + 1) * in_length.astype(jnp.int32)[:, None]) // (2 * out_length)
  return jnp.where(i < out_length, index, 0)


def resize_nearest(
    masks: jax.Array,
    heights: jax.Array,
    widths: jax.Array,
    out_heights: jax.Array,
    out_widths: jax.Array,
    size: tuple[int, int],
) -> jax.Array:
  """``[B, H', W']`` class-index masks whose real parts are ``heights x widths``, each resized with nearest neighbour
  to ``out_heights x out_widths`` (how ``predict`` scales a downscaled image's mask back), in ``[B, *size]``
  (values beyond an image's size are meaningless)."""
  rows = nearest_rows(out_heights, heights, size[0])
  cols = nearest_rows(out_widths, widths, size[1])
  return jax.vmap(lambda m, r, c: m[r[:, None], c[None, :]])(masks, rows, cols)
