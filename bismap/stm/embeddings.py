"""The embedding network \\hat{E} of the Source Transferability Map (BiSMAP Sec. 3.4, 3.5).

BiSMAP measures how far a source pixel is from the target domain (Eq. 7) in
the feature space of a network "pre-trained on a third-party dataset"
(Sec. 3.4): a ResNet-152 pre-trained by SimCLRv2 (Sec. 3.5). The embedding of
a pixel is the last residual stage (``layer4``, before pooling) of that
network, bilinearly upsampled (align_corners=False) to the pixel's image:
BiSMAP footnote 1 upsamples the feature map to the input size.

Checkpoints (``stm.embedding_checkpoint``) are loaded into
:class:`bismap.models.resnet.ResNetEncoder` (depth, width and output stride
from the config: ``stm.embedding_depth``, ``embedding_width`` = 64 x the
SimCLRv2 width multiplier, ``embedding_output_stride``). Accepted layouts:

* torchvision's ResNet keys (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
  ``layer1.0.downsample.0.weight`` ...);
* the same wrapped in a dict under ``state_dict``, ``model`` or ``resnet``
  (nested wrappers are unwrapped in turn);
* with prefixes shared by every weight key: ``module.``, ``encoder.``,
  ``backbone.``, ``net.`` or ``model.`` (stripped repeatedly, e.g. ``module.encoder.``);
* the widely used PyTorch conversion of the SimCLRv2 TensorFlow checkpoints
  (github.com/Separius/SimCLRv2-Pytorch, ``convert.py``): ``{'resnet': ..., 'head': ...}``
  with keys ``net.0.0.weight`` (stem conv), ``net.0.1.0.*`` (stem BN),
  ``net.<s>.blocks.<b>.net.<2k>.weight`` / ``net.<2k+1>.0.*`` (conv / BN k+1 of a
  block) and ``net.<s>.blocks.<b>.projection.shortcut.weight`` / ``projection.bn.0.*``
  (the shortcut). Only models without selective kernels (``*_sk0``) fit a
  torchvision ResNet; ``*_sk1`` checkpoints fail, naming the extra keys.

Classifier and projection heads (keys under ``fc.``, ``head.``, ``projector.``,
``projection_head.``) are dropped; BN ``num_batches_tracked`` counters may be
absent. Any other missing, unexpected or wrongly shaped key fails with a
message listing them.

Without a checkpoint (the embedded digit benchmark) the encoder of the warmup
model stands in for \\hat{E}; that is logged as a warning: it is a
source-trained network, not SimCLRv2.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.labels.features import file_sha256
from bismap.models.resnet import ResNetEncoder
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "resnet")
STRIPPED_PREFIXES = ("module", "encoder", "backbone", "net", "model")
HEAD_PREFIXES = ("fc.", "head.", "projector.", "projection_head.")
OPTIONAL_SUFFIX = ".num_batches_tracked"
_SIMCLR_ANY = re.compile(r"^net\.\d+\.")
_SIMCLR_STEM = re.compile(r"^net\.0\.(0\.weight|1\.0\.(.+))$")
_SIMCLR_BLOCK = re.compile(r"^net\.([1-4])\.blocks\.(\d+)\.(.+)$")
_SIMCLR_CONV = re.compile(r"^net\.(\d+)\.weight$")
_SIMCLR_BN = re.compile(r"^net\.(\d+)\.0\.(.+)$")


class CheckpointLayoutError(ValueError):
    """An embedding checkpoint does not fit the configured network; the message lists the keys."""


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # SimCLRv2 takes RGB in [0, 1]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class EmbeddingNetworkSettings:
    depth: int = 152  # BiSMAP Sec. 3.5: ResNet-152
    width: int = 64  # 64 x the SimCLRv2 width multiplier
    output_stride: int = 32  # as pre-trained; 8/16 dilate the last stages
    normalization: Normalization = field(default_factory=Normalization)


def unwrap_state(loaded: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Descend through ``state_dict`` / ``model`` / ``resnet`` wrappers to a flat {key: tensor} dict."""
    state = loaded
    while isinstance(state, Mapping) and not all(isinstance(value, torch.Tensor) for value in state.values()):
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if wrapper is None:
            others = sorted(str(key) for key, value in state.items() if not isinstance(value, torch.Tensor))
            raise CheckpointLayoutError(f"embedding checkpoint {path}: no tensors found; non-tensor entries "
                                        f"{others[:10]} and none of the wrappers {list(WRAPPER_KEYS)}")
        state = state[wrapper]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointLayoutError(f"embedding checkpoint {path} holds no state dict ({type(loaded).__name__})")
    return dict(state)


def _strippable(keys: list[str]) -> str | None:
    """The prefix every key shares, when it is one of STRIPPED_PREFIXES (``net.<digit>`` is SimCLRv2's own)."""
    firsts = {key.split(".", 1)[0] for key in keys}
    if len(firsts) != 1 or not all("." in key for key in keys):
        return None
    prefix = firsts.pop()
    if prefix not in STRIPPED_PREFIXES or (prefix == "net" and any(_SIMCLR_ANY.match(key) for key in keys)):
        return None
    return prefix


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop head keys, then strip shared wrapper prefixes (``module.encoder.`` ...) until none is left."""
    while True:
        state = {key: value for key, value in state.items() if not key.startswith(HEAD_PREFIXES)}
        prefix = _strippable(list(state))
        if prefix is None:
            return state
        state = {key[len(prefix) + 1:]: value for key, value in state.items()}


def _simclr_block_key(stage: str, block: str, rest: str) -> str:
    """``net.<s>.blocks.<b>.<rest>`` -> torchvision ``layer<s>.<b>.<...>``; unknown parts stay recognisable."""
    base = f"layer{stage}.{block}."
    if rest == "projection.shortcut.weight":
        return base + "downsample.0.weight"
    if rest.startswith("projection.bn.0."):
        return base + "downsample.1." + rest.removeprefix("projection.bn.0.")
    conv, norm = _SIMCLR_CONV.match(rest), _SIMCLR_BN.match(rest)
    if conv and int(conv.group(1)) % 2 == 0:
        return base + f"conv{int(conv.group(1)) // 2 + 1}.weight"
    if norm and int(norm.group(1)) % 2 == 1:
        return base + f"bn{int(norm.group(1)) // 2 + 1}.{norm.group(2)}"
    return f"net.{stage}.blocks.{block}.{rest}"  # e.g. selective-kernel convs: reported as unexpected


def convert_simclr_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separius' SimCLRv2 conversion (module docstring) -> torchvision ResNet keys."""
    converted = {}
    for key, value in state.items():
        stem, block = _SIMCLR_STEM.match(key), _SIMCLR_BLOCK.match(key)
        if stem:
            converted["conv1.weight" if stem.group(2) is None else f"bn1.{stem.group(2)}"] = value
        elif block:
            converted[_simclr_block_key(*block.groups())] = value
        else:
            converted[key] = value
    return converted


def torchvision_state(loaded: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Any accepted layout (module docstring) -> a torchvision-keyed ResNet state dict."""
    state = strip_prefixes(unwrap_state(loaded, path))
    if any(_SIMCLR_ANY.match(key) for key in state):
        logger.info("%s: SimCLRv2 PyTorch conversion layout (net.<stage>.blocks...)", path)
        state = convert_simclr_keys(state)
    return state


def _listed(keys: list[str], limit: int = 12) -> str:
    return f"{keys[:limit]}{' ...' if len(keys) > limit else ''} ({len(keys)})"


def check_state(encoder: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                network: str) -> dict[str, torch.Tensor]:
    """Raise CheckpointLayoutError listing missing / unexpected / wrongly shaped keys; fill BN counters."""
    expected = encoder.state_dict()
    missing = sorted(key for key in set(expected) - set(state) if not key.endswith(OPTIONAL_SUFFIX))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    if missing or unexpected or wrong:
        hint = ("; selective-kernel (SimCLRv2 *_sk1) checkpoints are not supported, use an *_sk0 one"
                if any("main_conv" in key or "mixing_conv" in key for key in unexpected) else "")
        raise CheckpointLayoutError(
            f"embedding checkpoint {path} does not fit the configured {network}: missing keys {_listed(missing)}, "
            f"unexpected keys "
            f"{_listed(unexpected)}, wrong shape {_listed(wrong)}{hint} (accepted layouts: bismap.stm.embeddings)")
    return {**{key: expected[key] for key in expected if key.endswith(OPTIONAL_SUFFIX)}, **state}


def load_embedding_encoder(path: str | Path, settings: EmbeddingNetworkSettings) -> ResNetEncoder:
    """Build ResNet-<depth> (width, output stride from ``settings``) and load ``path`` into it (strict)."""
    encoder = ResNetEncoder(settings.depth, settings.width, settings.output_stride)
    state = torchvision_state(torch.load(path, map_location="cpu", weights_only=True), path)
    network = f"ResNet-{settings.depth} (width {settings.width})"
    encoder.load_state_dict(check_state(encoder, state, path, network))
    logger.info("embedding network: ResNet-%d width %d OS %d from %s (%d tensors)", settings.depth,
                settings.width, settings.output_stride, path, len(state))
    return encoder


def warmup_encoder(checkpoint_path: str | Path) -> ResNetEncoder:
    """Stand-in \\hat{E} when no checkpoint is configured: the warmup model's encoder (not SimCLRv2)."""
    model, _ = load_model(checkpoint_path, "cpu")
    logger.warning("stm.embedding_checkpoint is null: using the warmup model's encoder (%s) as the embedding "
                   "network. This is a stand-in for the embedded benchmark, NOT the SimCLRv2 ResNet-152 of "
                   "BiSMAP Sec. 3.5", checkpoint_path)
    return model.encoder


class EmbeddingNetwork(nn.Module):
    """\\hat{E}: images (B, 3, H, W), normalised with ``normalization`` -> layer4 (B, E, H/os, W/os)."""

    def __init__(self, encoder: ResNetEncoder, normalization: Normalization, description: dict[str, Any]) -> None:
        super().__init__()
        self.encoder, self.normalization, self.description = encoder, normalization, description
        self.embedding_dim = int(encoder.out_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[1]  # (B, E, h, w)


def build_embedding_network(embedding_checkpoint: str | Path | None, warmup_checkpoint: str | Path | None,
                            settings: EmbeddingNetworkSettings, device: torch.device) -> EmbeddingNetwork:
    """The configured checkpoint, else the warmup's encoder (stand-in); eval mode, on ``device``."""
    if embedding_checkpoint:
        encoder = load_embedding_encoder(embedding_checkpoint, settings)
        description = {"source": "checkpoint", "path": str(embedding_checkpoint), "depth": settings.depth,
                       "width": settings.width, "output_stride": settings.output_stride,
                       "sha256": file_sha256(embedding_checkpoint)}
    elif warmup_checkpoint:
        encoder = warmup_encoder(warmup_checkpoint)
        description = {"source": "warmup_encoder (stand-in, not SimCLRv2)", "path": str(warmup_checkpoint),
                       "sha256": file_sha256(warmup_checkpoint)}
    else:
        raise ValueError("no embedding network: give stm.embedding_checkpoint or the warmup checkpoint")
    description["normalization"] = {"mean": list(settings.normalization.mean), "std": list(settings.normalization.std)}
    network = EmbeddingNetwork(encoder, settings.normalization, description)
    return network.to(device).eval()


def interpolation_matrix(size_out: int, size_in: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear upsampling, as F.interpolate(align_corners=False)."""
    identity = torch.eye(size_in, device=device)[None]  # (1, in, in): column i = unit impulse at i
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[0].T  # (out, in)


def upsampled_rows(embeddings: torch.Tensor, size: tuple[int, int], chunk_rows: int) -> Iterator[torch.Tensor]:
    """(E, h, w) -> the bilinearly upsampled (H*W, E) pixel embeddings in row-major chunks of whole image rows.

    Separable: the rows of a chunk by a (r, h) matrix product, then 2-tap linear interpolation along the
    width. Never holds the (E, H, W) map: at most max(1, chunk_rows // W) image rows at a time.
    """
    channels = embeddings.shape[0]
    rows_h = interpolation_matrix(size[0], embeddings.shape[1], embeddings.device)  # (H, h)
    step = max(1, chunk_rows // size[1])
    for top in range(0, size[0], step):
        part = torch.einsum("rh,ehw->erw", rows_h[top:top + step], embeddings)  # (E, r, w)
        part = F.interpolate(part.reshape(1, -1, part.shape[-1]), size=size[1], mode="linear",
                             align_corners=False)  # (1, E*r, W)
        yield part.view(channels, -1, size[1]).permute(1, 2, 0).reshape(-1, channels)  # (r*W, E)


def pixel_embeddings(embeddings: torch.Tensor, size: tuple[int, int], pixel_indices: torch.Tensor) -> torch.Tensor:
    """(E, h, w) -> upsampled embeddings of the given row-major pixel indices (n,): (n, E), as upsampled_rows."""
    rows_h = interpolation_matrix(size[0], embeddings.shape[1], embeddings.device)  # (H, h)
    rows_w = interpolation_matrix(size[1], embeddings.shape[2], embeddings.device)  # (W, w)
    pixel_indices = pixel_indices.to(embeddings.device)
    ys, xs = pixel_indices // size[1], pixel_indices % size[1]  # (n,), (n,)
    part = torch.einsum("nh,ehw->nwe", rows_h[ys], embeddings)  # (n, w, E)
    return torch.einsum("nw,nwe->ne", rows_w[xs], part)  # (n, E)


def embedding_dataset(manifest: Manifest, normalization: Normalization, labelled: bool,
                      photometric_statistics: dict[str, Any] | None = None) -> SegmentationDataset:
    """Images normalised for \\hat{E} (not for the segmenter); GPA-stylized when statistics are given."""
    return SegmentationDataset(manifest, labelled=labelled, mean=normalization.mean, std=normalization.std,
                               photometric_statistics=photometric_statistics)
