"""Constants every layer shares (see docs/conventions.md): the void label and the ImageNet normalisation that the
pretrained backbone weights expect. No imports: configs read them without loading JAX or TensorFlow."""

IGNORE_LABEL = 255  # void: boundaries and unlabelled pixels; never a class, never a valid affinity end (Eq. 1-3)

# torchvision's ImageNet statistics on the 0..255 scale, matching the converted ResNet weights
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

# an evaluation on fewer images than this is flagged (prepare and results.md): one image moves the mIoU by points
MIN_EVAL_IMAGES = 20

# images longer than this a side are inferred downscaled (evaluation's dataset.eval_max_size, predict's --max_size)
MAX_INFERENCE_SIDE = 2048


def inference_size(height: int, width: int, max_size: int) -> tuple[int, int]:
  """``(height, width)`` scaled so that the longer side is at most ``max_size`` (unchanged if it is already, or if
  ``max_size`` is 0); the aspect ratio is kept, each side at least 1: the rule of evaluation and of ``predict``."""
  if not max_size or max(height, width) <= max_size:
    return height, width
  scale = max_size / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))
