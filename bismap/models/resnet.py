"""A ResNet encoder whose depth, width and output stride come from the config.

It reuses torchvision's residual blocks and keeps torchvision's parameter names
(``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so an ImageNet checkpoint saved
by torchvision loads into it unchanged when the width is the standard 64.
torchvision's own ``ResNet`` fixes the widths (64..512), and the embedded
benchmark needs a much thinner network, hence this small class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

logger = logging.getLogger(__name__)

# depth -> (block, blocks per stage), as in He et al. 2016, Table 1.
LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNetEncoder(nn.Module):
    """Returns the stride-4 (layer1) and the deepest (layer4) feature maps."""

    def __init__(self, depth: int, width: int = 64, output_stride: int = 16) -> None:
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"backbone depth {depth} not supported; choose one of {sorted(LAYOUTS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, counts = LAYOUTS[depth]
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # Stages past the output stride trade their stride for dilation (DeepLab's atrous backbone).
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        self.layer1 = self._make_layer(block, width, counts[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(block, width * 2, counts[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, width * 4, counts[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, width * 8, counts[3], stride=2, dilate=dilate[2])
        self.low_level_channels = width * block.expansion
        self.out_channels = width * 8 * block.expansion

    def _make_layer(self, block: type[nn.Module], planes: int, count: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [_dilated_block(block, self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [_dilated_block(block, self.inplanes, planes, 1, None, self.dilation) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, w, H/4, W/4)
        low_level = self.layer1(x)  # (B, w*e, H/4, W/4)
        high_level = self.layer4(self.layer3(self.layer2(low_level)))  # (B, 8*w*e, H/os, W/os)
        return low_level, high_level


def _dilated_block(
    block: type[nn.Module], inplanes: int, planes: int, stride: int, downsample: nn.Module | None, dilation: int
) -> nn.Module:
    """A torchvision block; BasicBlock refuses dilation, so its 3x3 convs are dilated after construction."""
    if block is Bottleneck:
        return Bottleneck(inplanes, planes, stride, downsample, dilation=dilation)
    module = BasicBlock(inplanes, planes, stride, downsample)
    if dilation > 1:
        for conv in (module.conv1, module.conv2):
            conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
    return module


def load_torchvision_weights(encoder: ResNetEncoder, path: str | Path) -> None:
    """Load an ImageNet checkpoint in torchvision's format (the classifier ``fc.*`` is dropped).

    Any other key that does not match is an error that lists the keys, because a
    silently half-loaded backbone would only show up as a worse mIoU much later.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {key.removeprefix("module."): value for key, value in state.items() if not key.startswith("fc.")}
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"ImageNet weights {path} do not fit the configured backbone: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shape {mismatched[:8]} "
            f"({len(missing)}/{len(unexpected)}/{len(mismatched)} in all)"
        )
    encoder.load_state_dict(state)
    logger.info("loaded ImageNet backbone weights from %s (%d tensors)", path, len(state))
