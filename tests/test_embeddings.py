"""Loading the STM embedding network E-hat (BiSMAP Sec. 3.4-3.5): accepted key layouts, strict errors, upsampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bismap.models.resnet import ResNetEncoder
from bismap.stm.embeddings import (CheckpointLayoutError, EmbeddingNetworkSettings, build_embedding_network,
                                   load_embedding_encoder, pixel_embeddings, upsampled_rows)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = EmbeddingNetworkSettings(depth=50, width=8, output_stride=32)


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, so that a wrongly mapped tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator) + 0.5 if "running_var" in name else \
                    0.2 * torch.randn(tensor.shape, generator=generator)
                tensor.copy_(values)
    return module.eval()


class _BatchNormRelu(nn.Sequential):
    def __init__(self, channels: int, relu: bool = True) -> None:
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU() if relu else nn.Identity())


class _Projection(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.bn = _BatchNormRelu(out_channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.shortcut(x))


class _Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int, project: bool) -> None:
        super().__init__()
        self.projection = _Projection(in_channels, planes * 4, stride) if project else nn.Identity()
        self.net = nn.Sequential(nn.Conv2d(in_channels, planes, 1, bias=False), _BatchNormRelu(planes),
                                 nn.Conv2d(planes, planes, 3, stride, 1, bias=False), _BatchNormRelu(planes),
                                 nn.Conv2d(planes, planes * 4, 1, bias=False), _BatchNormRelu(planes * 4, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.projection(x) + self.net(x))


class _Blocks(nn.Module):
    def __init__(self, count: int, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Bottleneck(in_channels, planes, stride, True)] +
                                    [_Bottleneck(planes * 4, planes, 1, False) for _ in range(count - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SimCLRv2Sk0(nn.Module):
    """The module layout of the PyTorch SimCLRv2 conversion (Separius/SimCLRv2-Pytorch), sk_ratio 0, rebuilt."""

    def __init__(self, counts: tuple[int, ...], width: int) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), _BatchNormRelu(width), nn.MaxPool2d(3, 2, 1))
        stages, channels = [stem], width
        for index, count in enumerate(counts):
            stages.append(_Blocks(count, channels, width * 2 ** index, 1 if index == 0 else 2))
            channels = width * 2 ** index * 4
        self.net = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 32 * width, H/32, W/32), before the pooling


@pytest.fixture(scope="module")
def reference() -> tuple[ResNetEncoder, torch.Tensor, torch.Tensor]:
    encoder = randomized(ResNetEncoder(50, 8, 32), seed=0)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return encoder, images, encoder(images)[1]


def torchvision_layout(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {**encoder.state_dict(), "fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}


LAYOUTS = {
    "torchvision": lambda state: state,
    "state_dict": lambda state: {"state_dict": state, "epoch": 3},
    "model_module_encoder": lambda state: {"model": {f"module.encoder.{k}": v for k, v in state.items()}},
    "resnet_backbone": lambda state: {"resnet": {f"backbone.{k}": v for k, v in state.items()}},
    "net_prefix": lambda state: {f"net.{k}": v for k, v in state.items()},
    "no_bn_counters": lambda state: {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_accepted_layout_loads_the_same_network(layout, reference, tmp_path):
    encoder, images, expected = reference
    path = tmp_path / "weights.pth"
    torch.save(LAYOUTS[layout](torchvision_layout(encoder)), path)
    with torch.no_grad():
        output = load_embedding_encoder(path, SETTINGS).eval()(images)[1]
    assert torch.equal(output, expected)
    assert float(output.abs().sum()) > 0


def test_simclrv2_pytorch_conversion_loads_and_computes_the_same_features(tmp_path):
    simclr = randomized(SimCLRv2Sk0((3, 4, 6, 3), width=8), seed=2)
    path = tmp_path / "r50_1x_sk0.pth"
    torch.save({"resnet": simclr.state_dict(), "head": {"layers.0.weight": torch.zeros(4, 4)}}, path)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    network = build_embedding_network(path, None, SETTINGS, torch.device("cpu"))
    with torch.no_grad():
        expected, output = simclr(images), network(images)
    assert output.shape == (2, 256, 2, 2)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert network.description["source"] == "checkpoint" and len(network.description["sha256"]) == 64


def test_unknown_and_missing_keys_fail_listing_them(reference, tmp_path):
    state = torchvision_layout(reference[0])
    state["extra_block.weight"] = torch.zeros(3)
    del state["layer3.2.conv2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointLayoutError) as error:
        load_embedding_encoder(path, SETTINGS)
    message = str(error.value)
    assert "extra_block.weight" in message and "layer3.2.conv2.weight" in message and str(path) in message


def test_wrong_width_and_selective_kernels_are_named(reference, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torchvision_layout(reference[0]), path)
    with pytest.raises(CheckpointLayoutError, match=r"wrong shape \['bn1.bias'"):
        load_embedding_encoder(path, EmbeddingNetworkSettings(depth=50, width=16, output_stride=32))
    simclr = SimCLRv2Sk0((3, 4, 6, 3), width=8).state_dict()
    simclr["net.1.blocks.0.net.2.main_conv.0.weight"] = simclr.pop("net.1.blocks.0.net.2.weight")
    torch.save({"resnet": simclr}, path)
    with pytest.raises(CheckpointLayoutError, match="selective-kernel") as error:
        load_embedding_encoder(path, SETTINGS)
    assert "layer1.0.conv2.weight" in str(error.value)  # missing after the mapping
    assert "net.1.blocks.0.net.2.main_conv.0.weight" in str(error.value)


def test_upsampled_rows_and_sampled_pixels_match_bilinear_interpolation():
    embeddings = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(4))  # (E, h, w)
    expected = F.interpolate(embeddings[None], size=(11, 13), mode="bilinear", align_corners=False)[0]  # (E, H, W)
    expected_rows = expected.flatten(1).T  # (H*W, E)
    chunks = list(upsampled_rows(embeddings, (11, 13), chunk_rows=30))  # 2 image rows per chunk
    assert [len(chunk) for chunk in chunks] == [26] * 5 + [13]
    torch.testing.assert_close(torch.cat(chunks), expected_rows, rtol=1e-6, atol=1e-6)
    pixels = torch.tensor([0, 12, 70, 142])
    torch.testing.assert_close(pixel_embeddings(embeddings, (11, 13), pixels), expected_rows[pixels],
                               rtol=1e-6, atol=1e-6)


def test_missing_network_is_an_error():
    with pytest.raises(ValueError, match="embedding_checkpoint"):
        build_embedding_network(None, None, SETTINGS, torch.device("cpu"))


def test_warmup_stand_in_is_logged_as_warning(tmp_path, caplog):
    from bismap.models import ModelSettings, build_model
    from bismap.training.checkpoint import save_checkpoint

    settings = ModelSettings(backbone_depth=18, backbone_width=8, output_stride=8, aspp_rates=(1,), aspp_channels=8,
                             low_level_channels=8, feature_dim=8)
    save_checkpoint(tmp_path / "warmup.pt", build_model(settings, 3), settings, ["a", "b", "c"], 0, {})
    with caplog.at_level("WARNING"):
        network = build_embedding_network(None, Path(tmp_path / "warmup.pt"), SETTINGS, torch.device("cpu"))
    assert "NOT the SimCLRv2" in caplog.text and network.embedding_dim == 64
    assert network(torch.zeros(1, 3, 32, 32)).shape == (1, 64, 4, 4)
