"""Constants every layer shares (see docs/conventions.md): the void label and the ImageNet normalisation that the
pretrained backbone weights expect. No imports: configs read them without loading JAX or TensorFlow."""

IGNORE_LABEL = 255  # void: boundaries and unlabelled pixels; never a class, never a valid affinity end (Eq. 1-3)

# torchvision's ImageNet statistics on the 0..255 scale, matching the converted ResNet weights
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

# an evaluation on fewer images than this is flagged (prepare and results.md): one image moves the mIoU by points
MIN_EVAL_IMAGES = 20
