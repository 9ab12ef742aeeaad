"""Training throughput: iterations per second of the warmup step and of the self-training step.

Run from the repository root::

    python benchmarks/training_throughput.py                       # config/config.yaml, 20 timed iterations
    python benchmarks/training_throughput.py --iterations 50 --threads 1
    python benchmarks/training_throughput.py --config config/gta5_to_cityscapes.yaml --device cuda

(a) warmup: :func:`bismap.training.supervised.train_step` (pixel cross-entropy, one
SGD step, AMP on CUDA when ``warmup.amp``) on ``warmup.batch_size`` crops of
``warmup.augment.crop_size``; (b) self-training:
:class:`bismap.training.selftrain.SelfTrainStep`, Eq. 13 with everything on (STM
weights on the source loss, SCE on pseudo-labels, the EMA teacher's consistency
on strong views), ``selftrain.training.batch_size`` images per domain. The model
is the config's ``model`` with one output per class of ``classes``.

The batches are synthetic tensors of the right shapes (random images, labels,
weights; label 255 on a tenth of the pixels), made once: what is timed is the
step itself, not data loading or augmentation of the source batch. A few
untimed iterations come first (``--warmup-iterations``). images/s counts the
training images of a step: the batch for (a), source + target for (b).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from bismap.models import ModelSettings, build_model
from bismap.settings import from_dict
from bismap.training.distributed import DistributedContext
from bismap.training.ema import make_teacher
from bismap.training.optim import make_optimizer
from bismap.training.selftrain import SelfTrainSettings, SelfTrainStep
from bismap.training.supervised import TrainSettings, train_step

SELFTRAIN_KEYS = ("training", "init", "ema_decay", "consistency_weight", "sce_alpha", "sce_beta", "strong_augment")


def synthetic_batch(batch_size: int, crop: tuple[int, int], classes: int, generator: torch.Generator,
                    device: torch.device, weights: bool = False) -> dict[str, torch.Tensor]:
    """Images (B, 3, H, W), labels (B, H, W) with 10 % ignore pixels, optional weights (B, H, W) in [0, 1]."""
    height, width = crop
    labels = torch.randint(0, classes, (batch_size, height, width), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = 255
    batch = {"image": torch.randn(batch_size, 3, height, width, generator=generator), "label": labels}
    if weights:
        batch["weight"] = torch.rand(batch_size, height, width, generator=generator)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def timed(step: Callable[[int], object], iterations: int, warmup: int, device: torch.device) -> float:
    """Seconds of ``iterations`` calls of ``step(i)`` after ``warmup`` untimed ones."""
    for iteration in range(warmup):
        step(iteration)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for iteration in range(warmup, warmup + iterations):
        step(iteration)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def warmup_throughput(config: dict, arguments: argparse.Namespace, device: torch.device) -> tuple[float, int]:
    """(seconds, images per step) of the supervised warmup step."""
    settings = from_dict(TrainSettings, config["warmup"], "warmup")
    classes = len(config["classes"])
    model = build_model(from_dict(ModelSettings, config["model"], "model"), classes).to(device).train()
    optimizer = make_optimizer(model, settings.optimizer)
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    context = DistributedContext(device=device)
    batch = synthetic_batch(settings.batch_size, settings.augment.crop_size, classes,
                            torch.Generator().manual_seed(0), device)
    seconds = timed(lambda _: train_step(model, batch, optimizer, scaler, context, use_amp),
                    arguments.iterations, arguments.warmup_iterations, device)
    return seconds, settings.batch_size


def selftrain_throughput(config: dict, arguments: argparse.Namespace, device: torch.device) -> tuple[float, int]:
    """(seconds, images per step) of Eq. 13 with the STM, pseudo-labels and consistency on."""
    section = {key: value for key, value in config["selftrain"].items() if key in SELFTRAIN_KEYS}
    section.update(use_stm=True, use_pseudo_labels=True, use_consistency=True)
    settings = from_dict(SelfTrainSettings, section, "selftrain")
    classes, training = len(config["classes"]), settings.training
    model = build_model(from_dict(ModelSettings, config["model"], "model"), classes).to(device).train()
    optimizer = make_optimizer(model, training.optimizer)
    step = SelfTrainStep(model, make_teacher(model), optimizer, settings, DistributedContext(device=device))
    generator = torch.Generator().manual_seed(1)
    source = synthetic_batch(training.batch_size, training.augment.crop_size, classes, generator, device, True)
    target = synthetic_batch(training.batch_size, training.augment.crop_size, classes, generator, device)
    seconds = timed(lambda iteration: step(source, target, iteration), arguments.iterations,
                    arguments.warmup_iterations, device)
    return seconds, 2 * training.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per stage")
    parser.add_argument("--warmup-iterations", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: threads.train)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    config = yaml.safe_load(arguments.config.read_text())
    threads = arguments.threads or config.get("threads", {}).get("train", 2)
    torch.set_num_threads(threads)
    device = torch.device(arguments.device)
    model = config["model"]
    print(f"{arguments.config}: ResNet-{model.get('backbone_depth')} width {model.get('backbone_width')}, "
          f"{len(config['classes'])} classes, device {device}, {threads} CPU thread(s)")
    print(f"{'stage':<40}{'iterations':>11}{'seconds':>10}{'it/s':>9}{'images/s':>10}")
    for name, measure in (("warmup (supervised CE)", warmup_throughput),
                          ("selftrain (Eq. 13, STM + consistency)", selftrain_throughput)):
        seconds, images = measure(config, arguments, device)
        rate = arguments.iterations / seconds
        print(f"{name:<40}{arguments.iterations:>11}{seconds:>10.2f}{rate:>9.2f}{rate * images:>10.1f}")


if __name__ == "__main__":
    main()
