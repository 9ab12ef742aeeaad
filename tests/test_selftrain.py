"""Self-training and distillation loops on tiny generated data: terms, resume, plumbing of the maps."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bismap.data.digit_scenes import DigitScenesSettings, generate_split
from bismap.data.index import index_dataset
from bismap.data.loading import AugmentSettings, Manifest
from bismap.io import shard_png_paths, write_png
from bismap.models import ModelSettings
from bismap.settings import SettingsError
from bismap.stm.weights import encode_weight_png
from bismap.training.checkpoint import load_model
from bismap.training.distill import DistillInputs, DistillSettings, distill
from bismap.training.optim import OptimizerSettings
from bismap.training.selftrain import SelfTrainInputs, SelfTrainSettings, SelfTrainStep, self_train
from bismap.training.contrastive import ContrastiveInputs, contrastive_train
from bismap.training.supervised import RunPaths, TrainSettings, train_supervised
from bismap.training.variants import variant_training
from tests.conftest import dies_on_call
from tests.test_training import CLASSES, MODEL

TRAINING = TrainSettings(iterations=4, batch_size=2, seed=3, log_interval=1, checkpoint_interval=2,
                         optimizer=OptimizerSettings(learning_rate=0.01, head_lr_multiplier=10.0),
                         augment=AugmentSettings(crop_size=(32, 32), scale_range=(0.8, 1.2), horizontal_flip=False))


def write_maps(manifest: Path, folder: Path, make: callable) -> list[Path]:
    """One PNG per sample in two shard folders, from make(label (H, W)) -> array."""
    shards = [folder / "shard_0", folder / "shard_1"]
    for index, sample in enumerate(Manifest.load(manifest).samples):
        label = np.array(__import__("PIL.Image", fromlist=["Image"]).open(sample.label))
        write_png(shards[index % 2] / f"{sample.name}.png", make(label))
    return shards


def make_adaptation_data(folder: Path, pseudo_label: callable, weight: callable, training: TrainSettings = TRAINING,
                         model: ModelSettings = MODEL) -> dict[str, Path]:
    """Tiny source and target-train scenes, a 2-iteration warmup (``training``, ``model``), and per-image label
    and weight PNGs made from each image's true label by ``pseudo_label`` and ``weight`` (two shard folders)."""
    settings = DigitScenesSettings(image_size=32, digit_size=(12, 16), digits_per_image=(1, 2))
    for domain, seed in (("source", 5), ("target_train", 6)):
        generate_split(folder / domain, domain, count=6, seed=seed, settings=settings)
        index_dataset("digit_scenes", folder / domain, "", 11, True, folder / f"{domain}.json")
    warmup = RunPaths(folder / "warmup.pt", folder / "warmup.tsv", folder / "state" / "warmup.pt")
    train_supervised(folder / "source.json", warmup, dataclasses.replace(training, iterations=2), model, CLASSES,
                     torch.device("cpu"), run_settings={})
    return {"folder": folder, "labels": write_maps(folder / "target_train.json", folder / "labels", pseudo_label),
            "weights": write_maps(folder / "source.json", folder / "weights", weight)}


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    half = lambda label: encode_weight_png(np.full(label.shape, 0.5, dtype=np.float32))  # noqa: E731
    return make_adaptation_data(tmp_path_factory.mktemp("adaptation"), lambda label: label, half)  # perfect labels


def inputs(data: dict, weights: list[Path] | None = None, labels: list[Path] | None = None) -> SelfTrainInputs:
    folder = data["folder"]
    return SelfTrainInputs(folder / "warmup.pt", folder / "source.json", folder / "target_train.json",
                           labels or data["labels"], weights if weights is not None else data["weights"])


def train(data: dict, folder: Path, **overrides) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    settings = SelfTrainSettings(training=TRAINING, **overrides)
    self_train(inputs(data), RunPaths(folder / "model.pt", folder / "loss.tsv", folder / "state.pt"), settings,
               torch.device("cpu"), run_settings={"overrides": repr(overrides)})
    rows = (folder / "loss.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    return load_model(folder / "model.pt")[0].state_dict(), [dict(zip(header, map(float, row.split("\t"))))
                                                              for row in rows[1:]]


def test_every_term_is_logged_and_the_total_is_eq_13(data, tmp_path):
    _, rows = train(data, tmp_path, consistency_weight=3.0)
    for row in rows:
        expected = row["source_ce"] + row["target_sce"] + 3.0 * row["consistency"]
        assert row["loss"] == pytest.approx(expected, rel=1e-4)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["consistency"] > 0  # strong view differs from the weak one


def test_transferability_maps_scale_the_source_loss(data, tmp_path):
    """The weight PNGs reach Eq. 10: weights of 0.5 halve the first iteration's source loss."""
    _, weighted = train(data, tmp_path / "stm", use_consistency=False)
    _, plain = train(data, tmp_path / "plain", use_consistency=False, use_stm=False)
    half = 32768 / 65535  # 0.5 as the 16-bit PNG stores it
    assert weighted[0]["source_ce"] == pytest.approx(half * plain[0]["source_ce"], rel=1e-5)
    assert "consistency" not in weighted[0]


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path, monkeypatch):
    reference, _ = train(data, tmp_path / "reference")
    original = SelfTrainStep.__call__
    # killed in iteration 4, after the state saved at iteration 2
    monkeypatch.setattr(SelfTrainStep, "__call__", dies_on_call(original, 4))
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(SelfTrainStep, "__call__", original)
    resumed, rows = train(data, tmp_path / "resumed")
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    assert not (tmp_path / "resumed" / "state.pt").exists()


def test_a_resume_state_is_not_used_once_an_input_was_rebuilt(data, tmp_path, monkeypatch, caplog):
    """The issue's stale resume: killed after the state of iteration 2, an input rebuilt (here one pseudo-label
    PNG, as a new warmup rebuilds them all), then rerun: it must train from the start on the new input."""
    labels = [tmp_path / "labels" / folder.name for folder in data["labels"]]
    for source, copy in zip(data["labels"], labels):
        shutil.copytree(source, copy)
    settings = SelfTrainSettings(training=TRAINING)
    run = lambda name: self_train(inputs(data, labels=labels),  # noqa: E731
                                  RunPaths(tmp_path / name / "model.pt", tmp_path / name / "loss.tsv",
                                           tmp_path / name / "state.pt"), settings, torch.device("cpu"), run_settings={})
    original = SelfTrainStep.__call__
    monkeypatch.setattr(SelfTrainStep, "__call__", dies_on_call(original, 4))
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(SelfTrainStep, "__call__", original)
    rebuilt = sorted(labels[0].glob("*.png"))[0]
    write_png(rebuilt, np.full(np.array(Image.open(rebuilt)).shape, 255, dtype=np.uint8))  # new content and time
    with caplog.at_level(logging.INFO, logger="bismap.training.checkpoint"):
        run("resumed")
    assert "ignoring resume state" in caplog.text and "resuming" not in caplog.text
    run("clean")
    resumed, clean = (load_model(tmp_path / name / "model.pt")[0].state_dict() for name in ("resumed", "clean"))
    assert all(torch.equal(clean[key], resumed[key]) for key in clean)


def test_missing_pseudo_label_names_the_image(data, tmp_path):
    only_one_shard = [data["labels"][0]]
    with pytest.raises(Exception, match="no label map for 3 image"):
        self_train(inputs(data, labels=only_one_shard), RunPaths(tmp_path / "m.pt", tmp_path / "l.tsv",
                   tmp_path / "s.pt"), SelfTrainSettings(training=TRAINING), torch.device("cpu"), {})
    assert not (tmp_path / "m.pt").exists()


def test_shard_png_paths_rejects_a_name_in_two_shards(data, tmp_path):
    with pytest.raises(ValueError, match="pseudo-label '.*' found twice"):
        shard_png_paths([data["labels"][0], data["labels"][0].parent / "shard_0"], "pseudo-label")


def test_distillation_logs_eq_12_terms_and_starts_from_the_warmup(data, tmp_path):
    folder = data["folder"]
    teacher, _ = train(data, tmp_path / "teacher")
    distill_inputs = DistillInputs(tmp_path / "teacher" / "model.pt", folder / "warmup.pt", folder / "source.json",
                                   folder / "target_train.json", data["labels"])
    settings = DistillSettings(training=dataclasses.replace(TRAINING, iterations=1), kl_weight=2.0,
                               student_init="warmup")
    distill(distill_inputs, RunPaths(tmp_path / "student.pt", tmp_path / "student.tsv", tmp_path / "s.pt"),
            settings, torch.device("cpu"), {})
    header, row = [line.split("\t") for line in (tmp_path / "student.tsv").read_text().splitlines()]
    values = dict(zip(header, map(float, row)))
    assert values["loss"] == pytest.approx(values["source_ce"] + values["target_ce"] + 2.0 * values["kl"], rel=1e-4)
    assert values["kl"] > 0  # the student (warmup) and the self-trained teacher disagree
    student = load_model(tmp_path / "student.pt")[0].state_dict()
    warmup = load_model(folder / "warmup.pt")[0].state_dict()
    changed = [key for key in warmup if warmup[key].is_floating_point() and not torch.equal(warmup[key], student[key])]
    assert changed and len(changed) < len(warmup)  # trained one step from the warmup (BN counters aside)


def test_a_teacher_initialised_student_starts_as_the_teacher(data, tmp_path):
    """student_init 'teacher' (self-distillation): every weight equals the teacher's, none the warmup's head."""
    from bismap.training.distill import make_student

    folder = data["folder"]
    train(data, tmp_path / "teacher")
    inputs = DistillInputs(tmp_path / "teacher" / "model.pt", folder / "warmup.pt", folder / "source.json",
                           folder / "target_train.json", data["labels"])
    student = make_student(inputs, DistillSettings(training=TRAINING, student_init="teacher"), torch.device("cpu"))
    teacher = load_model(tmp_path / "teacher" / "model.pt")[0].state_dict()
    warmup = load_model(folder / "warmup.pt")[0].state_dict()
    assert all(torch.equal(value, teacher[key]) for key, value in student.state_dict().items())
    assert any(not torch.equal(teacher[key], warmup[key]) for key in teacher if teacher[key].is_floating_point())


def test_student_takes_a_self_supervised_backbone_in_any_accepted_layout(data, tmp_path):
    from bismap.models import build_model
    from bismap.stm.embeddings import CheckpointLayoutError
    from bismap.training.distill import make_student

    folder = data["folder"]
    backbone = build_model(MODEL, len(CLASSES)).encoder.state_dict()
    torch.save({"state_dict": {f"module.{key}": value for key, value in backbone.items()}}, tmp_path / "ssl.pt")
    student_inputs = DistillInputs(folder / "warmup.pt", folder / "warmup.pt", folder / "source.json",
                                   folder / "target_train.json", data["labels"], student_checkpoint=tmp_path / "ssl.pt")
    student = make_student(student_inputs, DistillSettings(training=TRAINING), torch.device("cpu"))
    assert all(torch.equal(student.encoder.state_dict()[key], value) for key, value in backbone.items())
    torch.save({**backbone, "layer9.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointLayoutError, match="layer9.weight"):
        make_student(dataclasses.replace(student_inputs, student_checkpoint=tmp_path / "bad.pt"),
                     DistillSettings(training=TRAINING), torch.device("cpu"))


def test_a_variant_gets_its_methods_loop_inputs_and_typed_settings(data):
    """bismap.training.variants: the rule's named inputs become each method's inputs; unknown names fail."""
    folder = data["folder"]
    files = {"initial": str(folder / "warmup.pt"), "source_manifest": str(folder / "source.json"),
             "target_manifest": str(folder / "target_train.json"), "pseudo_labels": [str(p) for p in data["labels"]]}
    training = {**dataclasses.asdict(TRAINING), "iterations": 7}
    train, inputs, settings = variant_training("contrastive", files, {"training": training}, "mine")
    assert train is contrastive_train and isinstance(inputs, ContrastiveInputs)
    assert inputs.static_label_dirs == data["labels"] and settings.training.iterations == 7
    with pytest.raises(ValueError, match="variant 'mine': unknown method 'dann'"):
        variant_training("dann", files, {}, "mine")
    with pytest.raises(SettingsError, match="selftrain \\(mine, cpsl\\).cpsl: unknown key\\(s\\) \\['epsilonn'\\]"):
        variant_training("cpsl", files, {"training": training, "cpsl": {"epsilonn": 1.0}}, "mine")


def test_alignment_changes_both_targets_and_resumes_bit_identically(data, tmp_path, monkeypatch):
    """The running distributions are part of the resume state: an interrupted aligned run ends as an uninterrupted one."""
    aligned_settings = {"align_teacher": True, "balance_pseudo_labels": True, "alignment_momentum": 0.5}
    _, plain = train(data, tmp_path / "plain")
    _, teacher_only = train(data, tmp_path / "teacher", align_teacher=True, alignment_momentum=0.5)
    reference, aligned = train(data, tmp_path / "reference", **aligned_settings)
    assert aligned[0]["source_ce"] == plain[0]["source_ce"]  # same weights, same batch at iteration 1
    assert teacher_only[0]["target_sce"] == plain[0]["target_sce"]  # perfect labels, unweighted
    assert teacher_only[0]["consistency"] != pytest.approx(plain[0]["consistency"], rel=1e-6)
    assert aligned[0]["target_sce"] != pytest.approx(plain[0]["target_sce"], rel=1e-6)  # weighted by class
    original = SelfTrainStep.__call__
    monkeypatch.setattr(SelfTrainStep, "__call__", dies_on_call(original, 4))
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "resumed", **aligned_settings)
    source = torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)["distributions"]["source"]  # (K,)
    assert float(source.sum()) == pytest.approx(1.0) and not torch.allclose(source, torch.full((11,), 1 / 11).double())
    monkeypatch.setattr(SelfTrainStep, "__call__", original)
    resumed, _ = train(data, tmp_path / "resumed", **aligned_settings)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_alignment_without_the_teacher_is_refused():
    with pytest.raises(ValueError, match="need use_consistency"):
        SelfTrainSettings(training=TRAINING, use_consistency=False, balance_pseudo_labels=True)
