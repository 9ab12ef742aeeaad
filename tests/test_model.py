"""DeepLabV3+: torchvision weight compatibility, clear errors, feature geometry."""

from __future__ import annotations

import pytest
import torch
import torchvision

from bismap.models import ModelSettings, build_model
from bismap.models.resnet import ResNetEncoder, load_torchvision_weights

SMALL = ModelSettings(backbone_depth=18, backbone_width=8, output_stride=8, aspp_rates=(2, 4),
                      aspp_channels=16, low_level_channels=8, feature_dim=12)


def test_torchvision_resnet18_weights_load_exactly(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = ResNetEncoder(18, 64, output_stride=16)
    load_torchvision_weights(encoder, path)
    assert torch.equal(encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(encoder.bn1.running_var, reference.bn1.running_var)


def test_resnet101_has_torchvision_parameter_names():
    names = {key for key in torchvision.models.resnet101().state_dict() if not key.startswith("fc.")}
    assert names == set(ResNetEncoder(101, 64, 16).state_dict())


def test_mismatched_weights_list_the_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "mystery.bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="mystery.bias"):
        load_torchvision_weights(ResNetEncoder(18, 64, 16), path)


@pytest.mark.parametrize("output_stride,expected", [(8, 6), (16, 3)])
def test_output_stride_sets_deep_feature_size(output_stride, expected):
    encoder = ResNetEncoder(18, 8, output_stride).eval()
    low_level, high_level = encoder(torch.zeros(1, 3, 48, 48))
    assert low_level.shape[-1] == 12 and high_level.shape[-1] == expected


def test_feature_is_what_the_classifier_sees():
    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=5).eval()
    output = model(torch.randn(2, 3, 32, 32))
    recomputed = model.classifier(output.features)
    assert torch.allclose(recomputed, output.logits)
    assert output.features.shape[1] == 12 and output.logits.shape[1] == 5
