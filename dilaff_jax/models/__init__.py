"""Backbone (atrous ResNet) and DeepLabv3+ with the dilated-affinity head."""

from dilaff_jax.models.deeplab import DeepLabV3Plus, resize_bilinear, upsample_logits
from dilaff_jax.models.resnet import ResNet, resnet_param_count, unit_schedule

__all__ = ["DeepLabV3Plus", "ResNet", "resize_bilinear", "resnet_param_count", "unit_schedule", "upsample_logits"]
