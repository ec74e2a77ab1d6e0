"""The structure-aware losses the paper compares dilated affinity with in Table 5: AAF and boundary reweighting.

Both follow :func:`dilaff_jax.method.affinity.affinity_loss_sum`: they return sums and their normalisers separately, so
data-parallel training adds both over the devices before dividing and a sharded batch gives the whole batch's loss.

**AAF**, adaptive affinity fields (Ke, Hwang, Liu, Yu, ECCV 2018), in the form of the authors' released code for
their best PASCAL VOC setting:

* On the segmentation output's class probabilities ``p`` (softmax of the logits at the *network's output grid*,
  stride 4 for DeepLabv3+, stride 8 for the authors' PSPNet; the labels are subsampled to that grid by nearest
  neighbour, :func:`labels_on_grid`), every pixel ``i`` is paired with the 8 pixels ``j = i + d·(s, t)``,
  ``s, t ∈ {-1, 0, 1}`` not both 0, of the ``(2d+1) x (2d+1)`` field for each dilation ``d`` (the paper's 3x3, 5x5,
  7x7 fields are ``d = 1, 2, 3``). The offsets are :func:`affinity.neighbor_offsets` of the rates ``(d, d)``; the
  pairs of all sizes are gathered at once (pad, 8·S static slices, one stack) with a border mask like the affinity
  targets' (XLA compiles this several times faster than one ``jnp.roll`` per offset).
* Per class ``c`` the probabilities are read as Bernoulli distributions ``(p_c, 1 - p_c)``, both clipped to
  ``[1e-4, 1]``, and compared with the binary ``KL_c(j ‖ i) = p_jc log(p_jc / p_ic) + (1-p_jc) log((1-p_jc) /
  (1-p_ic))`` (the neighbour's distribution against the centre's, as in the authors' code).
* A (pair, class) element is a *separating* element when exactly one of the two pixels has label ``c`` (for a pair
  with labels ``a ≠ b`` these are the classes ``a`` and ``b``); its loss is ``max(0, m - KL_c)`` with margin
  ``m`` (3.0 in the paper). Every other element of a valid pair is a *grouping* element with loss ``KL_c``: for
  equal labels every class, for different labels the classes other than ``a`` and ``b``. A pair ``(i, i + o)`` is
  valid when ``i``, ``i + o`` *and* the opposite corner ``i - o`` are all inside the image and labelled (not void):
  the authors' ``ignores_from_label`` masks a direction when either end of the field's diameter through ``i`` is
  void or outside, so a pixel within ``d`` of the border or of void loses the pairs in both directions.
* Adaptive kernel sizes: each element's loss is multiplied by ``w[kind, label(i), size]``, a softmax over the sizes
  of a learned ``[2, num_classes, num_sizes]`` array (kind 0 grouping, 1 separating; one weighting per centre class,
  initialised to 0, i.e. ``1 / num_sizes``). The weights are trained adversarially: the network minimises the loss
  and the weights maximise it. :func:`adaptive_weights` passes the raw array through :func:`reverse_gradient`, so
  one ordinary optimizer step (the authors use the same SGD for both) descends for the network and ascends for the
  weights.
* Normalisation: each of the ``2 · num_sizes`` (kind, size) terms is the mean over its own elements (pixels x
  classes x directions), and the loss is their sum (:func:`aaf_loss`). The training step multiplies it by
  ``structure.aaf_weight`` (the code's λ = 1) and, with ``structure.aaf_decay``, by ``10^(-step / num_steps)`` (the
  authors' code decays the term tenfold over training).

Where this simplifies the AAF paper: only the paper's best configuration exists (3 field sizes, per-class adversarial
size weights); the non-adaptive "AFF" variant is ``weights=None`` (all weights 1) but has no config switch. The
margin is a constant and the grouping and separating terms have no separate λ (both are 1 in the authors' VOC runs).
Every unordered pair is counted from both ends (the authors' code does the same).

**Boundary reweighting**, U-Net's weight map (Ronneberger, Fischer, Brox, MICCAI 2015): the cross-entropy of pixel
``x`` is weighted by ``w(x) = w_c(x) + w_0 · exp(-(d_1(x) + d_2(x))² / (2σ²))``, with ``d_1`` and ``d_2`` the
Euclidean distances to the nearest and the second-nearest object. :func:`unet_weight_map` computes it on the host
(numpy / scipy) for one label map; the input pipeline calls it on every training crop. Choices for semantic maps:

* An *object* is an 8-connected component of one class's pixels, except for the ``background`` class, whose regions
  are the space between objects (as the background between U-Net's cells). ``background=-1`` makes every class's
  components objects (datasets without a background class). The distance of a pixel to an object is 0 inside it
  (``scipy.ndimage.distance_transform_edt`` of the object's complement), so a pixel inside object A next to object
  B has ``d_1 = 0``, ``d_2 = dist(B)``: the pixels on both sides of a boundary between two objects weigh ``≈ w_0``,
  and background pixels in a narrow gap between two objects weigh most, as in U-Net. With fewer than two objects
  the border term is 0. Void pixels are neither objects nor background and weigh 0. Distances are computed in each
  object's bounding box grown by ``6σ`` and are infinite beyond (the term there is below ``w_0 · e^-18``), so the
  cost is the objects' boxes, not one full-image transform per object.
* ``w_c``: inverse class frequency in the crop, normalised so that the labelled pixels' mean is 1, i.e. every class
  present gets the same total weight: ``w_c(x) = N / (K · n_{c(x)})`` with ``N`` labelled pixels, ``K`` classes
  present, ``n_c`` pixels of class ``c``. ``class_balance=False`` gives ``w_c = 1``.
* ``σ`` is given at U-Net's 512-pixel scale (``w_0 = 10``, ``σ = 5``) and scaled to the training crop by the caller:
  ``σ_px = σ · crop_size / 512``.

The weighted cross-entropy (:func:`boundary_loss_sum`) is ``Σ_x w(x) · CE(x) / N`` (U-Net's energy, normalised by
the number of labelled pixels like the plain CE); in training it replaces the plain CE.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from dilaff_jax.method import affinity
from dilaff_jax.method.conventions import IGNORE_LABEL

GROUP, SEPARATE = 0, 1  # first axis of the AAF sums, counts and weights
PROB_EPSILON = 1e-4  # the authors' clip of p and 1 - p before the KL divergence
UNET_SCALE = 512  # U-Net's image size, at which w_0 = 10, σ = 5 px were chosen
DISTANCE_CUTOFF = 6.0  # object distances beyond this many σ count as infinite: w changes by < w_0 · e^-18


# ----------------------------------------------------------------------------------------------- AAF


@jax.custom_vjp
def reverse_gradient(x: jax.Array) -> jax.Array:
  """Identity whose gradient is negated: what minimises a loss through it maximises the loss w.r.t. ``x``."""
  return x


def _reverse_fwd(x):
  return x, None


def _reverse_bwd(_, g):
  return (-g,)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


def init_adaptive_weights(num_classes: int, num_sizes: int) -> jax.Array:
  """The raw adversarial size weights ``[2, num_classes, num_sizes]``, all 0 (equal weights after the softmax)."""
  return jnp.zeros((2, num_classes, num_sizes), jnp.float32)


def adaptive_weights(raw: jax.Array) -> jax.Array:
  """Softmax over the sizes of the raw weights, behind a gradient reversal (see the module docstring)."""
  return jax.nn.softmax(reverse_gradient(raw), axis=-1)


def labels_on_grid(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour subsampling of ``[B, H, W]`` labels to the ``size`` of an aligned output grid.

  Output pixel ``k`` sits at label pixel ``k · (H - 1) / (h - 1)`` (align-corners, the convention of
  :func:`dilaff_jax.models.deeplab.upsample_logits`); for DeepLab's aligned sizes (``H = 4(h - 1) + 1``) this is
  ``labels[:, ::4, ::4]``.
  """
  _, h_in, w_in = labels.shape
  h, w = size
  rows = np.rint(np.arange(h) * ((h_in - 1) / max(h - 1, 1))).astype(np.int32)
  cols = np.rint(np.arange(w) * ((w_in - 1) / max(w - 1, 1))).astype(np.int32)
  return labels[:, rows][:, :, cols]


def _corners(x: jax.Array, offsets, pad: int, fill=0) -> jax.Array:
  """``[B, h, w, len(offsets), ...]``: ``x[b, i + s, j + t]`` for each offset ``(s, t)``, ``fill`` outside."""
  _, h, w = x.shape[:3]
  widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3)
  xp = jnp.pad(x, widths, constant_values=fill)
  return jnp.stack([xp[:, pad + s : pad + s + h, pad + t : pad + t + w] for s, t in offsets], axis=3)


def aaf_loss_sum(
    logits: jax.Array,
    labels: jax.Array,
    dilations: Sequence[int],
    weights: jax.Array | None = None,
    margin: float = 3.0,
    ignore_label: int = IGNORE_LABEL,
) -> tuple[jax.Array, jax.Array]:
  """Sums and element counts of the AAF terms: ``([2, S] float32, [2, S] int32)``, row 0 grouping, 1 separating.

  Args:
    logits: ``[B, h, w, C]`` segmentation logits on the grid where the loss is taken.
    labels: int ``[B, h, w]`` on the same grid (:func:`labels_on_grid`).
    dilations: the ``S`` field dilations ``d`` (field size ``2d + 1``).
    weights: ``[2, C, S]`` per-kind, per-centre-class, per-size weights (:func:`adaptive_weights`); None = all 1.
    margin: the separating margin ``m``.
    ignore_label: void label.
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 4 or logits.shape[:3] != labels.shape:
    raise ValueError(
        f"aaf_loss_sum: logits {logits.shape} do not match labels {labels.shape} ([B, h, w, C] and "
        "[B, h, w] on the same grid)"
    )
  num_classes = logits.shape[-1]
  dilations = tuple(int(d) for d in dilations)
  if weights is None:
    weights = jnp.ones((2, num_classes, len(dilations)), jnp.float32)
  if weights.shape != (2, num_classes, len(dilations)):
    raise ValueError(f"aaf_loss_sum: weights {weights.shape} should be {(2, num_classes, len(dilations))}")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  pos = jnp.clip(probs, PROB_EPSILON, 1.0)
  neg = jnp.clip(1.0 - probs, PROB_EPSILON, 1.0)
  labelled = labels != ignore_label
  onehot = jax.nn.one_hot(jnp.where(labelled, labels, -1), num_classes, dtype=jnp.bool_)  # void: all False
  centre_class = jnp.where(labelled, labels, 0)
  _, h, w = labels.shape
  offsets = affinity.neighbor_offsets([(d, d) for d in dilations])  # 8 per size, size-major
  num_sizes = len(dilations)
  # corners(x)[b, i, j, o] = x[b, i + s_o, j + t_o]; outside the image the border mask drops the pair, and the
  # probabilities there are 1 so that the dropped KL terms (and their gradients) stay finite
  corners = functools.partial(_corners, offsets=offsets, pad=max(dilations))
  inside = affinity.neighbour_inside((h, w), offsets, xp=np)  # [h, w, 8S], static
  opposite = np.concatenate([8 * k + 7 - np.arange(8) for k in range(num_sizes)])  # row-major: o <-> 7 - o
  labelled_corners = corners(labelled)  # False outside the image
  valid = inside[None] & labelled[..., None] & labelled_corners & labelled_corners[..., opposite]
  valid = valid[..., None]  # [B, h, w, 8S, 1]: the authors' rule, i - o must be labelled and inside too
  q_pos, q_neg = corners(pos, fill=1.0), corners(neg, fill=1.0)  # [B, h, w, 8S, C]
  kl = q_pos * jnp.log(q_pos / pos[:, :, :, None]) + q_neg * jnp.log(q_neg / neg[:, :, :, None])
  sep = valid & (onehot[:, :, :, None] != corners(onehot))  # exactly one of the two pixels has class c
  group = valid & ~sep
  size_of = np.repeat(np.arange(num_sizes), affinity.DIRECTIONS_PER_RATE)  # offset -> size index
  w_group = weights[GROUP][centre_class][:, :, :, size_of, None]  # [B, h, w, 8S, 1]
  w_sep = weights[SEPARATE][centre_class][:, :, :, size_of, None]
  per_size = lambda x, dtype: jnp.sum(x, axis=(0, 1, 2, 4), dtype=dtype).reshape(num_sizes, -1).sum(-1)
  sums = [
      per_size(jnp.where(group, w_group * kl, 0.0), jnp.float32),
      per_size(jnp.where(sep, w_sep * jnp.maximum(margin - kl, 0.0), 0.0), jnp.float32),
  ]
  counts = [per_size(group, jnp.int32), per_size(sep, jnp.int32)]
  return jnp.stack(sums), jnp.stack(counts)


def aaf_loss(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """The AAF loss from :func:`aaf_loss_sum`'s (device-summed) output: the sum of the per-term means."""
  return jnp.sum(sums / jnp.maximum(counts, 1).astype(sums.dtype))


# ----------------------------------------------------------------------------------------------- boundary


def unet_weight_map(
    label: np.ndarray,
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    w0: float = 10.0,
    sigma: float = 5.0,
    background: int = 0,
    class_balance: bool = True,
) -> np.ndarray:
  """U-Net's weight map ``w_c + w_0 · exp(-(d_1 + d_2)² / (2σ²))`` of one ``[H, W]`` label map, float32.

  ``sigma`` is in pixels of ``label`` (scale it to the crop first). Objects, ``w_c`` and void as in the module
  docstring: void pixels weigh 0.
  """
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f"unet_weight_map: label must be [H, W], got shape {label.shape}")
  labelled = label != ignore_label
  if class_balance:
    n = np.bincount(label[labelled].astype(np.int64), minlength=num_classes).astype(np.float64)
    present = n > 0
    table = np.zeros(num_classes, np.float64)
    table[present] = labelled.sum() / (present.sum() * n[present])
    weight = np.where(labelled, table[np.where(labelled, label, 0)], 0.0)
  else:
    weight = labelled.astype(np.float64)
  d1 = np.full(label.shape, np.inf)
  d2 = np.full(label.shape, np.inf)
  eight = np.ones((3, 3), bool)
  reach = int(np.ceil(DISTANCE_CUTOFF * sigma))
  num_objects = 0
  for c in range(num_classes):
    if c == background:
      continue
    components, _ = ndimage.label(label == c, structure=eight)
    for k, box in enumerate(ndimage.find_objects(components), start=1):
      # distances within the object's box grown by the cut-off (exact there: the whole object is inside)
      win = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
      d = ndimage.distance_transform_edt(components[win] != k)
      d1w, d2w = d1[win], d2[win]
      d2[win] = np.where(d < d1w, d1w, np.minimum(d2w, d))
      d1[win] = np.minimum(d1w, d)
      num_objects += 1
  if num_objects >= 2:
    weight += np.where(labelled, w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2)), 0.0)
  return weight.astype(np.float32)


def boundary_loss_sum(
    logits: jax.Array, labels: jax.Array, weight_map: jax.Array, ignore_label: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
  """``(Σ_x w(x) · CE(x), N)`` over the labelled pixels: U-Net's weighted cross-entropy and its normaliser."""
  nll, labelled = pixel_cross_entropy(logits, labels, ignore_label)
  return jnp.sum(jnp.where(labelled, weight_map * nll, 0.0)), jnp.sum(labelled)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy ``-log p(label)`` per pixel (float32, ``[B, H, W]``; 0 on ignored pixels) and the mask of
  labelled pixels.

  The label's log-probability is picked with a one-hot ``where`` and a sum over classes, not a gather: the same value
  bit for bit (one term and zeros), and its gradient is a ``where`` instead of a scatter-add (slow on a GPU)."""
  labelled = labels != ignore_label
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  is_label = jnp.arange(logp.shape[-1]) == jnp.where(labelled, labels, 0)[..., None]
  nll = -jnp.sum(jnp.where(is_label, logp, 0.0), axis=-1)
  return jnp.where(labelled, nll, 0.0), labelled
