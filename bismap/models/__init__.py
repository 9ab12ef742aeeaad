"""Segmentation networks: a configurable ResNet encoder and the DeepLabV3+ head."""

from bismap.models.deeplab import DeepLabV3Plus, ModelSettings, SegmentationOutput, build_model

__all__ = ["DeepLabV3Plus", "ModelSettings", "SegmentationOutput", "build_model"]
