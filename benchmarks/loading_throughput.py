"""Data loading throughput: milliseconds to build one training sample, and a short real warmup.

Run from the repository root::

    python benchmarks/loading_throughput.py                         # 500 scenes, best of 3
    python benchmarks/loading_throughput.py --train-iterations 200  # also 200 real warmup steps

A digit-scenes split is generated into a temporary folder with the default
benchmark's look (32x32 RGB, one digit of 24-30 px, no overlap) and indexed as
the ``index_dataset`` rule does; every sample also gets a random 16-bit weight
map, as the STM writes them. Each row times ``SegmentationDataset[(index,
seed)]`` over every sample (best of ``--repeats`` passes, on ``--threads``
torch threads) with the warmup's augmentation (crop 32x32, scale 0.75-1.25, no
flip, colour jitter 0.3/0.3/0.3/0):

* decode only: reading the image, label and weight PNGs, no tensor work;
* pipeline / pipeline + weights: the dataset as training builds it, without and
  with the weight maps (the self-training source domain), each with the
  decoded-sample cache off (every item decodes its PNGs) and on (filled by an
  untimed pass first, as after the first epoch of a training run).

``--train-iterations N`` runs :func:`bismap.training.supervised.train_supervised`
for N iterations of batch 16 on the split (config/config.yaml's model and
warmup settings, workers 0, on the CPU) ``--train-repeats`` times and reports
the best iterations per second of the training loop (setup excluded).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from bismap.data.digit_scenes import generate_split, parse_settings
from bismap.data.index import index_dataset
from bismap.data.loading import (DEFAULT_CACHE_LIMIT_BYTES, AugmentSettings, Manifest, SegmentationDataset,
                                 train_augmentation)
from bismap.data.samples import open_image, read_train_id_label
from bismap.models import ModelSettings
from bismap.settings import from_dict
from bismap.stm.weights import encode_weight_png, read_weight_map
from bismap.training.supervised import RunPaths, TrainSettings, train_supervised

SCENES = {"image_size": 32, "digits_per_image": [1, 1], "digit_size": [24, 30], "overlap": False}
AUGMENT = AugmentSettings(crop_size=(32, 32), scale_range=(0.75, 1.25), horizontal_flip=False,
                          color_jitter=(0.3, 0.3, 0.3, 0.0))


def make_split(folder: Path, count: int) -> tuple[Path, dict[str, Path]]:
    """Generate and index ``count`` scenes; return the manifest and a random weight PNG per sample."""
    generate_split(folder / "source", "source", count, 1, parse_settings(SCENES))
    manifest_path = folder / "source.json"
    index_dataset("digit_scenes", folder / "source", "", 11, True, manifest_path)
    (folder / "weights").mkdir()
    generator = np.random.default_rng(0)
    weight_paths = {}
    for sample in Manifest.load(manifest_path).samples:
        weight_paths[sample.name] = folder / "weights" / f"{sample.name}.png"
        codes = encode_weight_png(generator.random(SCENES["image_size"] * np.ones(2, dtype=int)))  # (H, W)
        Image.fromarray(codes).save(weight_paths[sample.name])
    return manifest_path, weight_paths


def best_ms_per_sample(build: Callable[[int], object], count: int, repeats: int) -> float:
    """Best over ``repeats`` passes of the mean milliseconds of ``build(i)`` for i < count."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for position in range(count):
            build(position)
        best = min(best, (time.perf_counter() - started) * 1000 / count)
    return best


def decode_only(manifest: Manifest, weight_paths: dict[str, Path]) -> Callable[[int], object]:
    def build(position: int) -> object:
        sample = manifest.samples[position]
        return (open_image(sample.image), read_train_id_label(sample.label, manifest.num_classes),
                read_weight_map(weight_paths[sample.name]))
    return build


def dataset_item(manifest: Manifest, weight_paths: dict[str, Path] | None, cached: bool) -> Callable[[int], object]:
    dataset = SegmentationDataset(manifest, train_augmentation(AUGMENT), weight_paths=weight_paths,
                                  cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES if cached else 0)
    if cached:
        for index in range(len(dataset)):
            dataset.decoded(index)  # fill the cache
        assert len(dataset.cache.entries) == len(dataset), "the split should fit in the cache"
    return lambda position: dataset[(position, 1000 + position)]


def loading_rows(manifest_path: Path, weight_paths: dict[str, Path]) -> dict[str, Callable[[int], object]]:
    manifest = Manifest.load(manifest_path)
    rows = {"decode only (image, label, weight PNGs)": decode_only(manifest, weight_paths)}
    for name, weights in (("pipeline", None), ("pipeline + weights", weight_paths)):
        for cached in (False, True):
            rows[f"{name}, {'cached' if cached else 'uncached'}"] = dataset_item(manifest, weights, cached)
    return rows


def warmup_iterations_per_second(manifest_path: Path, folder: Path, config: dict, iterations: int) -> float:
    """Iterations per second of the training loop of a real warmup on the split (setup excluded)."""
    warmup = {**config["warmup"], "iterations": iterations, "batch_size": 16, "workers": 0,
              "log_interval": iterations, "checkpoint_interval": iterations}
    paths = RunPaths(folder / "model.pt", folder / "loss.tsv", folder / "state.pt")
    train_supervised(manifest_path, paths, from_dict(TrainSettings, warmup, "warmup"),
                     from_dict(ModelSettings, config["model"], "model"), config["classes"], torch.device("cpu"))
    loop_seconds = float(paths.loss_log.read_text().splitlines()[-1].split("\t")[-1])
    return iterations / loop_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="scenes in the generated split")
    parser.add_argument("--repeats", type=int, default=3, help="passes per row; the best is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--train-iterations", type=int, default=0, help="real warmup iterations (0: skip)")
    parser.add_argument("--train-repeats", type=int, default=2, help="warmup runs; the best is reported")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    with tempfile.TemporaryDirectory(prefix="loading_throughput_") as temporary:
        folder = Path(temporary)
        manifest_path, weight_paths = make_split(folder, arguments.count)
        print(f"{arguments.count} digit scenes 32x32, {arguments.threads} thread(s), best of {arguments.repeats}; "
              f"augmentation {AUGMENT}")
        for name, build in loading_rows(manifest_path, weight_paths).items():
            milliseconds = best_ms_per_sample(build, arguments.count, arguments.repeats)
            print(f"{name:<45}{milliseconds:>8.3f} ms/sample")
        if arguments.train_iterations > 0:
            config = yaml.safe_load(arguments.config.read_text())
            rates = [warmup_iterations_per_second(manifest_path, folder / f"run{run}", config,
                                                  arguments.train_iterations)
                     for run in range(arguments.train_repeats)]
            print(f"warmup {arguments.train_iterations} iterations x batch 16: best {max(rates):.2f} it/s "
                  f"(runs: {', '.join(f'{rate:.2f}' for rate in rates)})")


if __name__ == "__main__":
    main()
