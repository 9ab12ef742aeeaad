"""Peak memory and time of pseudo-labelling ONE 1024x2048 image at the paper's model size.

Run from the repository root::

    python benchmarks/labelling_memory.py                  # ResNet-101 DeepLabV3+, 1024x2048, 19 x 8 x 256, CPU
    python benchmarks/labelling_memory.py --device cuda    # the same on a GPU (device memory too)
    python benchmarks/labelling_memory.py --quick          # 128x256 and a thin network: seconds

The two stages of :func:`bismap.labels.strategies.label_images` for one image, on
the code path the ``pseudo_labels`` rule runs:

1. network forward (:func:`bismap.labels.strategies.network_outputs`): the model of
   ``config/gta5_to_cityscapes.yaml`` (ResNet-101, width 64, output stride 16,
   256-d decoder features at H/4 x W/4), random weights, eval mode, no grad;
2. scoring (:func:`bismap.labels.strategies.image_labels`): MAPs log-densities of
   19 classes x K=8 diagonal Gaussians over the (h*w, 256) features in chunks
   of ``chunk_rows``, Eq. 6 with delta = 100, then the (H, W) uint8 labels.

Each stage's *added* peak (:class:`peak_memory.PeakMemory`: above the resident
set / CUDA allocation at its start) and its time are printed; the scoring stage
is held to a target (500 MB by default) and the run exits 1 when it is over.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from gmm_benchmark import random_prototypes
from peak_memory import PeakMemory

from bismap.labels.strategies import PseudoLabelSettings, image_labels, network_outputs, resolve_thresholds
from bismap.models import ModelSettings, build_model
from bismap.settings import from_dict

REPOSITORY = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPOSITORY / "config" / "gta5_to_cityscapes.yaml"
QUICK_MODEL = {"backbone_depth": 18, "backbone_width": 16, "aspp_channels": 32, "low_level_channels": 16}


@dataclasses.dataclass(frozen=True)
class StageResult:
    stage: str
    seconds: float
    host_mb: float
    device_mb: float | None
    method: str


def paper_model_settings(quick: bool = False) -> ModelSettings:
    """The ``model`` section of the GTA5 -> Cityscapes config; ``quick``: a thin ResNet-18 of the same shape."""
    settings = from_dict(ModelSettings, yaml.safe_load(PAPER_CONFIG.read_text())["model"], "model")
    return dataclasses.replace(settings, **QUICK_MODEL) if quick else settings


def measure_labelling(device: torch.device, size: tuple[int, int], model_settings: ModelSettings, classes: int,
                      components: int, chunk_rows: int, warmup: bool) -> list[StageResult]:
    """Label one random (1, 3, H, W) image as ``label_images`` does; the added peak and time of each stage."""
    torch.manual_seed(0)
    model = build_model(model_settings, classes).to(device).eval()
    prototypes = random_prototypes(np.random.default_rng(0), classes, components, model_settings.feature_dim)
    settings = PseudoLabelSettings(strategy="maps", threshold_mode="absolute", delta=100.0, chunk_rows=chunk_rows)
    thresholds = resolve_thresholds(settings, prototypes)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)  # (1, 3, H, W)
    results = []
    with torch.no_grad():
        if warmup:  # CUDA: kernels, cuDNN plans and the prototypes' stacked parameters, outside the measurement
            image_labels(*network_outputs(model, image, settings), size, settings, prototypes, thresholds)
        with PeakMemory(device) as peak:
            logits, features = network_outputs(model, image, settings)  # (K, h, w), (D, h, w)
        results.append(StageResult("network forward", peak.seconds, peak.host_mb, peak.device_mb, peak.method))
        with PeakMemory(device) as peak:
            labels = image_labels(logits, features, size, settings, prototypes, thresholds)  # (H, W) uint8
        results.append(StageResult("scoring + labels", peak.seconds, peak.host_mb, peak.device_mb, peak.method))
    if labels.shape != size or labels.dtype != np.uint8:
        raise AssertionError(f"labels {labels.shape} {labels.dtype}, expected {size} uint8")
    return results


def format_table(results: list[StageResult]) -> str:
    lines = [f"| {'stage':<18} | {'time [s]':>9} | {'host peak added [MB]':>20} | {'device peak added [MB]':>22} |",
             f"|{'-' * 20}|{'-' * 11}|{'-' * 22}|{'-' * 24}|"]
    for result in results:
        device = "-" if result.device_mb is None else f"{result.device_mb:.0f}"
        lines.append(f"| {result.stage:<18} | {result.seconds:>9.2f} | {result.host_mb:>20.0f} | {device:>22} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, default=PseudoLabelSettings.chunk_rows)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--target-mb", type=float, default=500.0, help="the scoring stage's allowed added peak")
    parser.add_argument("--quick", action="store_true", help="128x256 and a thin ResNet-18 (seconds)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    size = (128, 256) if arguments.quick else (arguments.height, arguments.width)
    settings = paper_model_settings(arguments.quick)
    print(f"labelling one {size[0]}x{size[1]} image on {device}: DeepLabV3+ ResNet-{settings.backbone_depth} "
          f"(width {settings.backbone_width}, OS {settings.output_stride}), features {settings.feature_dim}-d at "
          f"{size[0] // 4}x{size[1] // 4}; MAPs {arguments.classes} classes x {arguments.components} x "
          f"{settings.feature_dim}-d diag, chunk_rows {arguments.chunk_rows}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    results = measure_labelling(device, size, settings, arguments.classes, arguments.components,
                                arguments.chunk_rows, warmup=device.type == "cuda")
    print(format_table(results))
    scoring = results[-1].host_mb if device.type == "cpu" else max(results[-1].host_mb, results[-1].device_mb)
    verdict = "within" if scoring <= arguments.target_mb else "OVER"
    print(f"scoring stage: {scoring:.0f} MB added peak, {verdict} the {arguments.target_mb:.0f} MB target "
          f"(host peak measured by {results[-1].method})")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
