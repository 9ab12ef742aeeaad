"""One tuning protocol for every method (README: tuning protocol): the same trial budget, development seeds only.

Each method declares a few settings it depends on through the feature scale, the
run length or the class count, plus the learning rate, as :class:`Dimension`s in
label-free units that carry from this benchmark to GTA5:

* ``value``: the setting itself (learning rates, loss weights, cosine thresholds);
* ``memory``: a momentum or EMA rate written as the share of the run its memory
  spans, ``{memory: f}`` (:func:`bismap.settings.resolve_run_relative`);
* ``run_fraction``: an interval as a share of the run, ``{run_fraction: f}``;
* ``euclidean_gap`` / ``cosine_gap``: a temperature or margin as a multiple of
  the median gap between a source feature's nearest and second-nearest class
  centroid (:func:`feature_scales`), measured on the warmup's source features
  without any target label.

Trial 0 of every method is its paper's values (``paper``: where the config holds
others); trials 1..N-1 are
a Latin hypercube over its dimensions, drawn with one seed, so every method gets
the same number of trials and the same kind of search. :func:`tuning_config`
turns the trials into self-training variants (``overrides``) for a run on the
development seeds; :func:`best_trials` reads their mIoU back from the run's report.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bismap.io import read_json, write_text
from bismap.labels.features import read_class_features, read_feature_info
from bismap.labels.gmm import ClassPrototypes
from bismap.settings import from_dict

logger = logging.getLogger(__name__)

UNITS = ("value", "memory", "run_fraction", "euclidean_gap", "cosine_gap")
SCALES = ("log", "linear")


@dataclass(frozen=True)
class Dimension:
    setting: str  # dotted path in the selftrain section, e.g. "proda.temperature"
    low: float
    high: float
    scale: str = "log"  # one of SCALES: how the range is sampled
    unit: str = "value"  # one of UNITS

    def __post_init__(self) -> None:
        if self.scale not in SCALES or self.unit not in UNITS:
            raise ValueError(f"tuning dimension {self.setting}: scale must be one of {SCALES} and unit one of "
                             f"{UNITS}, got '{self.scale}', '{self.unit}'")
        if self.low > self.high or (self.scale == "log" and self.low <= 0):
            raise ValueError(f"tuning dimension {self.setting}: need 0 < low <= high (log) or low <= high, "
                             f"got {self.low}, {self.high}")

    def value(self, quantile: float) -> float:
        """The setting in its unit at ``quantile`` in [0, 1] of the range."""
        if self.scale == "log":
            return math.exp(math.log(self.low) + quantile * (math.log(self.high) - math.log(self.low)))
        return self.low + quantile * (self.high - self.low)

    def resolved(self, quantile: float, scales: Mapping[str, float]) -> Any:
        """The config value: a plain number, a run-relative mapping, or a gap multiple times the measured gap."""
        value = self.value(quantile)
        if self.unit in ("memory", "run_fraction"):
            return {self.unit: round(value, 4)}
        if self.unit in ("euclidean_gap", "cosine_gap"):
            return round(value * scales[self.unit], 5)
        return round(value, 6)


def latin_hypercube(trials: int, dimensions: int, seed: int) -> np.ndarray:
    """(trials, dimensions) quantiles in (0, 1): each dimension's range cut in ``trials`` strata, one draw each."""
    generator = np.random.default_rng(seed)
    strata = np.stack([generator.permutation(trials) for _ in range(dimensions)], axis=1)  # (T, D)
    return (strata + generator.uniform(size=(trials, dimensions))) / trials


def nested(setting: str, value: Any) -> dict[str, Any]:
    """"a.b.c", v -> {"a": {"b": {"c": v}}}."""
    keys = setting.split(".")
    result: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        result = {key: result}
    return result


def deep_update(target: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value
    return target


def draw_trials(dimensions: Sequence[Dimension], budget: int, seed: int,
                scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """``budget`` overrides: trial 0 = {} (the configured values), then a Latin hypercube of budget - 1 points."""
    if budget < 1:
        raise ValueError(f"tuning budget must be >= 1, got {budget}")
    trials: list[dict[str, Any]] = [{}]
    for quantiles in latin_hypercube(budget - 1, len(dimensions), seed):
        overrides: dict[str, Any] = {}
        for dimension, quantile in zip(dimensions, quantiles):
            deep_update(overrides, nested(dimension.setting, dimension.resolved(float(quantile), scales)))
        trials.append(overrides)
    return trials


def feature_scales(features_path: str | Path, prototypes_path: str | Path, rows_per_class: int = 2000
                   ) -> dict[str, float]:
    """Median nearest-to-second-nearest class-centroid gap of source features, Euclidean and cosine.

    ``features_path``: the warmup's source features (maps/source_features.h5); ``prototypes_path``: the
    MAPs file with the class centroids. Only source data enters: no target label.
    """
    info = read_feature_info(features_path)
    centroids = ClassPrototypes.load(prototypes_path, "cpu").centroids.double().numpy()  # (C, D)
    present = np.isfinite(centroids).all(axis=1)
    rows = np.concatenate([read_class_features(features_path, class_id, rows_per_class)
                           for class_id in range(len(info.class_names))]).astype(np.float64)  # (N, D)
    distances = np.linalg.norm(rows[:, None] - centroids[None, present], axis=2)  # (N, C')
    nearest = np.sort(distances, axis=1)
    unit_rows = rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-12)
    unit_centroids = centroids[present] / np.linalg.norm(centroids[present], axis=1, keepdims=True).clip(1e-12)
    cosines = -np.sort(-(unit_rows @ unit_centroids.T), axis=1)  # (N, C') descending
    return {"euclidean_gap": float(np.median(nearest[:, 1] - nearest[:, 0])),
            "cosine_gap": float(np.median(cosines[:, 0] - cosines[:, 1])),
            "euclidean_nearest": float(np.median(nearest[:, 0])), "rows": int(len(rows))}


@dataclass(frozen=True)
class MethodSpace:
    variant: dict[str, Any]  # the variant line of the method (method, switches, rounds), without its name
    dimensions: tuple[Dimension, ...]
    paper: dict[str, Any]  # trial 0's overrides: the paper's values where the config holds others


@dataclass(frozen=True)
class TuningSpace:
    budget: int
    seed: int
    development_seeds: tuple[int, ...]
    results: str
    methods: dict[str, MethodSpace]


def load_space(path: str | Path) -> TuningSpace:
    """The search space file (config/tuning_space.yaml), strictly typed; trial 0 (``paper``) must name a value
    for every dimension, so that it does not change when tuned values are frozen in config.yaml."""
    data = yaml.safe_load(Path(path).read_text())
    methods = {name: MethodSpace(dict(entry["variant"]),
                                 tuple(from_dict(Dimension, dimension, f"{path}: {name}")
                                       for dimension in entry["dimensions"]), dict(entry.get("paper") or {}))
               for name, entry in data.pop("methods").items()}
    for name, method in methods.items():
        missing = [dimension.setting for dimension in method.dimensions
                   if not _has_setting(method.paper, dimension.setting)]
        if missing:
            raise ValueError(f"{path}: methods.{name}.paper (trial 0) gives no value for {missing}")
    data["development_seeds"] = tuple(data["development_seeds"])
    return TuningSpace(methods=methods, **data)


def _has_setting(overrides: Mapping[str, Any], setting: str) -> bool:
    """Whether the nested ``overrides`` hold the dotted ``setting`` (e.g. 'training.optimizer.learning_rate')."""
    node: Any = overrides
    for key in setting.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def tuning_config(space: TuningSpace, scales: Mapping[str, float]) -> dict[str, Any]:
    """A config overlay: the development seeds, and one self-training variant per method and trial."""
    variants = []
    for method, method_space in space.methods.items():
        trials = draw_trials(method_space.dimensions, space.budget, space.seed, scales)
        trials[0] = method_space.paper
        for number, overrides in enumerate(trials):
            variant = {"name": f"{method}_trial_{number}", **method_space.variant}
            if overrides:
                variant["overrides"] = overrides
            variants.append(variant)
    return {"results": space.results, "seeds": list(space.development_seeds),
            "selftrain": {"variants": variants}, "distill": {"enabled": False}, "oracle": {"enabled": False}}


def best_trials(summary: Mapping[str, Any], variants: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, its trials' mean mIoU over the development seeds and the best one (report_seeds summary.json)."""
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        method, number = variant["name"].rsplit("_trial_", 1)
        model = f"selftrain_{variant['name']}"
        miou = summary["models"][model]["miou"]["mean"]
        entry = results.setdefault(method, {"trials": []})
        entry["trials"].append({"trial": int(number), "miou": miou, "overrides": variant.get("overrides", {})})
    for entry in results.values():
        entry["best"] = max(entry["trials"], key=lambda trial: (trial["miou"], -trial["trial"]))
    return results


def selection_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per method, every trial's mIoU and its overrides; the best marked."""
    lines = ["| method | trial | mIoU (dev) | overrides |", "|---|---|---|---|"]
    for method, entry in results.items():
        for trial in entry["trials"]:
            mark = " **best**" if trial is entry["best"] else ""
            lines.append(f"| {method} | {trial['trial']}{mark} | {trial['miou']:.1f} | "
                         f"{yaml.safe_dump(trial['overrides'], default_flow_style=True, width=10_000).strip()} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """bismap-tune scales | trials | select (README: tuning protocol)."""
    parser = argparse.ArgumentParser(prog="bismap-tune", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    scales = commands.add_parser("scales", help="feature-distance gaps of a run's warmup (JSON)")
    scales.add_argument("features"), scales.add_argument("prototypes"), scales.add_argument("output")
    trials = commands.add_parser("trials", help="the trial variants of a search space (a config overlay)")
    trials.add_argument("space"), trials.add_argument("scales"), trials.add_argument("output")
    select = commands.add_parser("select", help="each method's best trial from a tuning run's report")
    select.add_argument("summary"), select.add_argument("config"), select.add_argument("output")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if arguments.command == "scales":
        measured = feature_scales(arguments.features, arguments.prototypes)
        write_text(arguments.output, yaml.safe_dump(measured, sort_keys=False))
        logger.info("%s", measured)
    elif arguments.command == "trials":
        overlay = tuning_config(load_space(arguments.space), yaml.safe_load(Path(arguments.scales).read_text()))
        header = (f"# Generated by `bismap-tune trials {arguments.space} {arguments.scales}`: do not edit; "
                  "README: tuning protocol.\n")
        write_text(arguments.output, header + yaml.safe_dump(overlay, sort_keys=False, width=120))
    else:
        variants = yaml.safe_load(Path(arguments.config).read_text())["selftrain"]["variants"]
        table = selection_table(best_trials(read_json(arguments.summary), variants))
        write_text(arguments.output, table)
        logger.info("\n%s", table)


if __name__ == "__main__":
    main()
