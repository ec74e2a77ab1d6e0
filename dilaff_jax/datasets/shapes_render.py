"""Numpy-only renderer of the embedded ``synthetic_shapes`` scenes.

Each scene is a background plus a few overlapping objects of varied shape and size. An object's class is carried
only by its *appearance*: a texture family, a spatial period, an orientation and a colour, each drawn per object
from a class distribution that overlaps with its neighbours' (the two stripe classes differ mostly in orientation
and period, the checks and dots share periods and hues, the background's colour range covers every class). So a
classifier that looks at a small patch is uncertain inside regions (the paper's Fig. 1 b) and patches straddling
a boundary look alike (Fig. 1 d), while a network that sees the whole region can decide. Pixels next to a boundary
between two different labels get the ignore label, like the void band around VOC objects.

Rendering depends only on the ``numpy.random.Generator`` passed in, so a scene is reproducible from its seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dilaff_jax.method import conventions

IGNORE_LABEL = conventions.IGNORE_LABEL

CLASS_NAMES = ("background", "red_stripes", "orange_stripes", "green_checks", "teal_dots", "violet_blobs")


@dataclasses.dataclass(frozen=True)
class Appearance:
  """A class's appearance distribution: texture family, mean colour, period (px), angle (deg), contrast."""

  texture: str
  colour: tuple[float, float, float]
  period: float
  angle: float
  contrast: float
  colour_spread: float = 28.0


APPEARANCES = (
    Appearance("blobs", (125.0, 120.0, 112.0), period=22.0, angle=0.0, contrast=26.0, colour_spread=40.0),
    Appearance("stripes", (165.0, 95.0, 85.0), period=7.0, angle=25.0, contrast=45.0),
    Appearance("stripes", (170.0, 125.0, 80.0), period=9.0, angle=65.0, contrast=45.0),
    Appearance("checks", (105.0, 145.0, 95.0), period=9.0, angle=10.0, contrast=40.0),
    Appearance("dots", (90.0, 140.0, 145.0), period=9.0, angle=10.0, contrast=45.0),
    Appearance("blobs", (135.0, 105.0, 155.0), period=9.0, angle=0.0, contrast=40.0),
)

SHAPES = ("ellipse", "rectangle", "triangle", "star")

PIXEL_NOISE = 16.0  # per-pixel, per-channel Gaussian noise (grey levels)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, period: float) -> np.ndarray:
  """Zero-mean noise in about [-1, 1] with correlation length ``period``: a coarse grid, bilinearly upsampled."""
  rows = int(np.ceil(height / period)) + 2
  cols = int(np.ceil(width / period)) + 2
  grid = rng.uniform(-1.0, 1.0, size=(rows, cols))
  y = np.arange(height) / period + rng.uniform(0.0, 1.0)
  x = np.arange(width) / period + rng.uniform(0.0, 1.0)
  y0 = np.floor(y).astype(int)
  x0 = np.floor(x).astype(int)
  fy = (y - y0)[:, None]
  fx = (x - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  noise = top * (1 - fy) + bottom * fy
  return noise / max(np.abs(noise).max(), 1e-6)


def _texture(
    rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray, period: float, angle_deg: float
) -> np.ndarray:
  """A texture pattern in [-1, 1] over the pixel grid ``(yy, xx)``."""
  theta = np.deg2rad(angle_deg)
  u = xx * np.cos(theta) + yy * np.sin(theta)
  v = -xx * np.sin(theta) + yy * np.cos(theta)
  phase_u, phase_v = rng.uniform(0.0, 2 * np.pi, size=2)
  wave_u = np.sin(2 * np.pi * u / period + phase_u)
  wave_v = np.sin(2 * np.pi * v / period + phase_v)
  if kind == "stripes":
    return wave_u
  if kind == "checks":
    return np.tanh(3.0 * wave_u * wave_v)
  if kind == "dots":
    return np.where(wave_u * wave_v > 0.45, 1.0, -0.6)
  if kind == "blobs":
    return _smooth_noise(rng, yy.shape[0], yy.shape[1], period)
  raise ValueError(f"Unknown texture {kind!r}; expected one of stripes, checks, dots, blobs.")


def _shape_mask(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Boolean mask of one object of shape ``kind`` with random centre, size, aspect and rotation."""
  height, width = yy.shape
  extent = min(height, width)
  cy = rng.uniform(0.1, 0.9) * height
  cx = rng.uniform(0.1, 0.9) * width
  radius = rng.uniform(0.12, 0.38) * extent
  minor = radius * rng.uniform(0.45, 1.0)
  theta = rng.uniform(0.0, np.pi)
  u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
  v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
  if kind == "ellipse":
    return (u / radius) ** 2 + (v / minor) ** 2 <= 1.0
  if kind == "rectangle":
    return (np.abs(u) <= radius) & (np.abs(v) <= minor)
  if kind == "triangle":
    angles = theta + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, size=3)
    corners = np.stack([cy + radius * np.sin(angles), cx + radius * np.cos(angles)], axis=1)
    inside = np.ones_like(yy, dtype=bool)
    orientation = np.sign(np.cross(corners[1] - corners[0], corners[2] - corners[0]))
    for k in range(3):
      a, b = corners[k], corners[(k + 1) % 3]
      side = (b[0] - a[0]) * (xx - a[1]) - (b[1] - a[1]) * (yy - a[0])
      inside &= side * orientation >= 0
    return inside
  if kind == "star":
    lobes = rng.integers(3, 7)
    depth = rng.uniform(0.15, 0.35)
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    return rho <= radius * (1.0 - depth + depth * np.cos(lobes * phi))
  raise ValueError(f"Unknown shape {kind!r}; expected one of {SHAPES}.")


def boundary_band(label: np.ndarray, width: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Copy of ``label`` with ``ignore_label`` on every pixel within ``width`` (Chebyshev) of a different label."""
  height, cols = label.shape
  padded = np.pad(label, width, mode="edge")
  differs = np.zeros(label.shape, dtype=bool)
  for dy in range(-width, width + 1):
    for dx in range(-width, width + 1):
      neighbour = padded[width + dy : width + dy + height, width + dx : width + dx + cols]
      differs |= neighbour != label
  return np.where(differs, np.uint8(ignore_label), label).astype(np.uint8)


def render_scene(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    max_objects: int,
    band_width: int = 1,
    texture_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
  """One scene: ``(image uint8 [H, W, 3], label uint8 [H, W])`` with classes ``0..5`` and 255 on boundaries.

  Object sizes are relative to the scene; texture periods are ``texture_scale`` times the class's (px), so a scene
  twice as large with ``texture_scale=2`` is the same scene magnified.

  Objects are painted in order, so later ones occlude earlier ones; each object (and the background) gets its own
  draw of colour, texture period, orientation and contrast from its class's ``Appearance``.
  """
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
  instance = np.zeros((height, width), dtype=np.int32)
  classes = [0]
  for index in range(1, int(rng.integers(1, max_objects + 1)) + 1):
    mask = _shape_mask(rng, SHAPES[rng.integers(len(SHAPES))], yy, xx)
    instance[mask] = index
    classes.append(int(rng.integers(1, len(CLASS_NAMES))))

  image = np.zeros((height, width, 3), dtype=np.float64)
  for index, cls in enumerate(classes):
    region = instance == index
    if not region.any():
      continue
    look = APPEARANCES[cls]
    colour = np.asarray(look.colour) + rng.normal(0.0, look.colour_spread, size=3)
    period = texture_scale * look.period * np.exp(rng.normal(0.0, 0.2))
    angle = look.angle + rng.normal(0.0, 15.0)
    contrast = look.contrast * rng.uniform(0.6, 1.4)
    pattern = _texture(rng, look.texture, yy, xx, period, angle)
    image[region] = colour + contrast * pattern[region][:, None]

  direction = rng.normal(size=2)
  direction /= np.linalg.norm(direction) + 1e-9
  ramp = (yy / height - 0.5) * direction[0] + (xx / width - 0.5) * direction[1]
  image *= (1.0 + rng.uniform(0.1, 0.4) * ramp)[..., None]
  image += rng.normal(0.0, PIXEL_NOISE, size=image.shape)
  image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

  label = np.asarray(classes, dtype=np.uint8)[instance]
  return image, boundary_band(label, band_width)
