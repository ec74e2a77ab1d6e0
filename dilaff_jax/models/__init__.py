"""Backbone (atrous ResNet) and DeepLabv3+ with the dilated-affinity head."""
