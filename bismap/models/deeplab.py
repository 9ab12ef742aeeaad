"""DeepLabV3+ (Chen et al. 2018), as used by BiSMAP Sec. 4.2.

The forward pass returns the decoder feature before the classifier as well as
the logits, because the prototype stages (BiSMAP Eq. 3-6) fit GMMs on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from bismap.models.resnet import ResNetEncoder, load_torchvision_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    backbone_depth: int = 101
    backbone_width: int = 64
    output_stride: int = 16
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 256
    low_level_channels: int = 48
    feature_dim: int = 256
    aspp_dropout: float = 0.5  # DeepLab's value; a thin net trained briefly learns faster without


class SegmentationOutput(NamedTuple):
    logits: torch.Tensor  # (B, K, H/4, W/4)
    features: torch.Tensor  # (B, D, H/4, W/4), the decoder feature the classifier sees


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeepLabV3Plus(nn.Module):
    def __init__(self, settings: ModelSettings, num_classes: int) -> None:
        super().__init__()
        self.settings = settings
        self.encoder = ResNetEncoder(settings.backbone_depth, settings.backbone_width, settings.output_stride)
        self.aspp = ASPP(self.encoder.out_channels, settings.aspp_rates, settings.aspp_channels)
        self.aspp.project[-1].p = settings.aspp_dropout  # torchvision fixes it at 0.5
        self.low_level_projection = _conv_bn_relu(self.encoder.low_level_channels, settings.low_level_channels, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(settings.aspp_channels + settings.low_level_channels, settings.feature_dim, 3),
            _conv_bn_relu(settings.feature_dim, settings.feature_dim, 3),
        )
        self.classifier = nn.Conv2d(settings.feature_dim, num_classes, kernel_size=1)
        initialise_weights(self)

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        low_level, high_level = self.encoder(images)  # (B, C1, H/4, W/4), (B, C4, H/os, W/os)
        context = self.aspp(high_level)  # (B, A, H/os, W/os)
        context = nn.functional.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([context, self.low_level_projection(low_level)], dim=1)  # (B, A+48, H/4, W/4)
        features = self.fuse(fused)  # (B, D, H/4, W/4)
        return SegmentationOutput(self.classifier(features), features)

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone: trained with a larger learning rate (DeepLab practice)."""
        encoder_ids = {id(parameter) for parameter in self.encoder.parameters()}
        return [parameter for parameter in self.parameters() if id(parameter) not in encoder_ids]


def initialise_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, as torchvision's ResNet does.

    PyTorch's default convolution init is about three times smaller; with it a
    thin network trained by plain SGD sits on the background class for
    hundreds of iterations before it starts to segment anything.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def build_model(settings: ModelSettings, num_classes: int, imagenet_weights: str | Path | None = None) -> DeepLabV3Plus:
    model = DeepLabV3Plus(settings, num_classes)
    if imagenet_weights:
        load_torchvision_weights(model.encoder, imagenet_weights)
    else:
        logger.info("no ImageNet weights given: the backbone starts from random initialisation")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info("DeepLabV3+ ResNet-%d (width %d, OS %d): %.2fM parameters",
                settings.backbone_depth, settings.backbone_width, settings.output_stride, parameters / 1e6)
    return model
