"""Shared fixtures: a tiny version of the default config, and a snakemake runner."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def tiny_config(results: Path) -> dict:
    """The default config shrunk to seconds: 24/12/12 images of 32 px, 4 iterations."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["results"] = str(results)
    config["seeds"] = [0]  # one run seed; tests that need more add them (a run per seed)
    config["digit_scenes"]["settings"].update(image_size=32, digit_size=[12, 16], digits_per_image=[1, 3])
    config["digit_scenes"]["splits"] = {
        "source": {"count": 24, "seed": 1},
        "target_train": {"count": 12, "seed": 2},
        "target_val": {"count": 12, "seed": 3},
    }
    training = {**config["warmup"], "iterations": 4, "batch_size": 4, "log_interval": 2, "checkpoint_interval": 2}
    training["augment"] = {**training["augment"], "crop_size": [32, 32]}
    config["warmup"] = training
    config["oracle"] = {"enabled": True, "training": copy.deepcopy(training)}
    config["evaluate"]["batch_size"] = 6
    config["model"].update(backbone_width=8, aspp_channels=16, low_level_channels=8, feature_dim=16)
    # 2 shards and 2 GMM jobs (classes 0, 2, .. and 1, 3, ..): the fan-outs are exercised, not just one job each
    config["maps"].update(shards=2, gmm_jobs=2)
    config["stm"]["shards"] = 2
    config["maps"]["features"].update(features_per_class=500, batch_size=12)
    config["maps"]["gmm"].update(components=2, min_features=20, max_iterations=30, kmeans_iterations=30,
                                 calibration_samples=500)
    config["stm"].update(embeddings_per_image=8, clusters=4, batch_size=12, preview_images=2)
    adaptation = {**training, "iterations": 2, "batch_size": 2, "checkpoint_interval": 1}
    config["selftrain"]["training"] = adaptation
    config["distill"]["training"] = copy.deepcopy(adaptation)
    config["distill"]["stages"] = 2  # the default distils once (time); the tiny run exercises the stage chain
    config["report"]["qualitative_images"] = 2
    return config


def tree_files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def remove_new_files(root: Path, before: set[Path]) -> None:
    """Leave a shared run as a test found it: remove the files (and then empty folders) added since ``before``."""
    for path in tree_files(root) - before:
        path.unlink()
    for folder in sorted((path for path in root.rglob("*") if path.is_dir()), key=lambda path: -len(path.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()


def dies_on_call(function, call: int):
    """``function``, except that its ``call``-th call raises KeyboardInterrupt: a job killed mid-training."""
    calls = {"count": 0}

    def wrapped(*arguments, **keywords):
        calls["count"] += 1
        if calls["count"] == call:
            raise KeyboardInterrupt
        return function(*arguments, **keywords)

    return wrapped


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_snakemake(workdir: Path, configfile: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's workflow in ``workdir`` (no default profile, 2 cores)."""
    command = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(configfile), "--workflow-profile", "none", "--cores", "2", *arguments]
    environment = {**os.environ, "BISMAP_GPU_LOCK_DIR": str(workdir / "gpu-locks")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=workdir)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def seed_results(results: Path, seed: int = 0) -> Path:
    """The folder of one run seed's outputs under a config's ``results``."""
    return results / f"seed_{seed}"


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    jobs: dict[str, int] = {}
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return jobs
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP oversubscription on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One complete end-to-end run of the tiny config, shared by the workflow tests."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    configfile = write_config(workdir / "tiny.yaml", tiny_config(workdir / "results"))
    run_snakemake(workdir, configfile)
    return workdir, configfile
