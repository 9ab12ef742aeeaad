"""Supervised training: it learns, it is deterministic, and it resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bismap.data.digit_scenes import DigitScenesSettings, generate_split
from bismap.data.index import index_dataset
from bismap.data.loading import AugmentSettings
from bismap.models import ModelSettings
from bismap.training import supervised
from bismap.training.checkpoint import load_model
from bismap.training.optim import OptimizerSettings
from bismap.training.supervised import RunPaths, TrainSettings, train_supervised
from tests.conftest import dies_on_call

MODEL = ModelSettings(backbone_depth=18, backbone_width=8, output_stride=8, aspp_rates=(2,),
                      aspp_channels=16, low_level_channels=8, feature_dim=16)
CLASSES = [str(digit) for digit in range(10)] + ["background"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    settings = DigitScenesSettings(image_size=32, digit_size=(12, 16), digits_per_image=(1, 2))
    generate_split(folder / "source", "source", count=16, seed=5, settings=settings)
    index_dataset("digit_scenes", folder / "source", "", 11, True, folder / "source.json")
    return folder / "source.json"


def settings(iterations: int) -> TrainSettings:
    return TrainSettings(iterations=iterations, batch_size=4, seed=7, log_interval=1, checkpoint_interval=2,
                         optimizer=OptimizerSettings(learning_rate=0.01, head_lr_multiplier=10.0),
                         augment=AugmentSettings(crop_size=(32, 32), scale_range=(0.8, 1.2), horizontal_flip=False))


def paths(folder: Path) -> RunPaths:
    return RunPaths(folder / "model.pt", folder / "loss.tsv", folder / "state" / "model.pt")


def run(manifest: Path, folder: Path, iterations: int = 4) -> dict[str, torch.Tensor]:
    train_supervised(manifest, paths(folder), settings(iterations), MODEL, CLASSES, torch.device("cpu"),
                     run_settings={"iterations": iterations})
    model, checkpoint = load_model(folder / "model.pt")
    assert checkpoint["step"] == iterations
    return model.state_dict()


def test_same_settings_give_identical_weights(manifest, tmp_path):
    first, second = run(manifest, tmp_path / "a"), run(manifest, tmp_path / "b")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_resume_after_interruption_matches_uninterrupted_run(manifest, tmp_path, monkeypatch):
    reference = run(manifest, tmp_path / "reference")
    original_step = supervised.train_step
    # killed during iteration 4, after the state saved at iteration 2
    monkeypatch.setattr(supervised, "train_step", dies_on_call(original_step, 4))
    with pytest.raises(KeyboardInterrupt):
        run(manifest, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "model.pt").exists()
    assert torch.load(tmp_path / "resumed" / "state" / "model.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(supervised, "train_step", original_step)
    resumed = run(manifest, tmp_path / "resumed")
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    assert not (tmp_path / "resumed" / "state" / "model.pt").exists()
    rows = (tmp_path / "resumed" / "loss.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == [1, 2, 3, 4]


def test_state_from_other_settings_is_not_resumed(manifest, tmp_path):
    run(manifest, tmp_path / "other", iterations=2)
    state_dir = tmp_path / "other" / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "stale", "iteration": 3}, state_dir / "model.pt")
    run(manifest, tmp_path / "other", iterations=4)  # would fail or skip steps if the stale state were used
    rows = (tmp_path / "other" / "loss.tsv").read_text().splitlines()[1:]
    assert len(rows) == 4


def test_loss_decreases_on_a_fixed_batch_order(manifest, tmp_path):
    run(manifest, tmp_path / "learn", iterations=12)
    losses = [float(row.split("\t")[1]) for row in (tmp_path / "learn" / "loss.tsv").read_text().splitlines()[1:]]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_a_checkpoint_records_what_the_run_ran(tmp_path):
    import bismap
    from bismap.provenance import project_commit, provenance_table, run_provenance

    record = run_provenance(16, 0.01, 2000, 2, False, torch.device("cpu"))
    assert {key: record[key] for key in ("global_batch_size", "batch_per_process", "processes", "learning_rate",
                                         "iterations", "amp")} == {"global_batch_size": 16, "batch_per_process": 8,
                                                                   "processes": 2, "learning_rate": 0.01,
                                                                   "iterations": 2000, "amp": False}
    assert record["torch"] == torch.__version__ and record["bismap"] == bismap.CODE_VERSION
    assert record["commit"] is None or len(record["commit"].removesuffix("+dirty")) == 40
    assert project_commit(tmp_path) is None  # not a checkout
    table = provenance_table({"warmup": record, "oracle": None})
    assert "| warmup | 2 | 16 | 0.01 | 2000 | False |" in table and table.splitlines()[-1].startswith("| oracle | - |")
