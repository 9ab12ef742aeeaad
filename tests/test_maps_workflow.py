"""MAPs stages through the workflow (rules/maps.smk) on the tiny config, and the pseudo-label report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bismap.labels.quality import ReportPaths, ReportSettings, pseudo_label_report
from bismap.labels.strategies import PseudoLabelSettings, label_images
from bismap.settings import from_dict
from tests.conftest import REPO, planned_jobs, run_snakemake, seed_results, write_config
from tests.real_fixtures import make_cityscapes, make_gta5

CLASSES = 11
TARGET_IMAGES = 12  # tiny_config's target_train count
# the MAPs labels and their report, then the three self-training variants with MAPs (stm_maps, consistency,
# bismap), the teacher labels of both distillation stages (merged with the MAPs ones: 3 merges) and the two
# distillation stages, their evaluations and
# the report
DOWNSTREAM_OF_PROTOTYPES = {"merge_class_gmms": 1, "pseudo_labels": 2, "merge_pseudo_labels": 3,
                            "pseudo_label_report": 1, "selftrain": 3, "selftrain_round": 1, "round_pseudo_labels": 2,
                            "teacher_pseudo_labels": 2, "distill_stage": 1, "stage_teacher_pseudo_labels": 2,
                            "distill": 1, "evaluate": 6, "qualitative_figure": 1, "report": 1, "report_seeds": 1, "all": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def workflow_pngs(results) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((results / "pseudo_labels" / "maps").glob("shard_*/*.png"))}


def test_maps_stages_write_gmms_labels_and_report(finished_tiny_run):
    workdir, configfile = finished_tiny_run
    config, results = yaml.safe_load(configfile.read_text()), seed_results(workdir / "results")
    # maps.gmm_jobs 2 in the tiny config: classes 0, 2, .. in job 0 and 1, 3, .. in job 1
    gmm_files = sorted(path.relative_to(results / "maps" / "gmm").as_posix()
                       for path in (results / "maps" / "gmm").glob("*/*.h5"))
    assert gmm_files == sorted(f"job_{c % 2}/class_{c}.h5" for c in range(CLASSES))
    assert (results / "maps" / "prototypes.h5").stat().st_size > 0
    manifest = json.loads((results / "manifests" / "target_train.json").read_text())
    pngs = workflow_pngs(results)
    assert len(pngs) == TARGET_IMAGES == len(manifest["samples"])
    assert sorted(pngs) == sorted(f"{sample['name']}.png" for sample in manifest["samples"])
    assert [len(list((results / "pseudo_labels" / "maps" / f"shard_{i}").glob("*.png"))) for i in (0, 1)] == [6, 6]
    labels = np.stack([np.asarray(Image.open(results / "pseudo_labels" / "maps" / f"shard_{i % 2}" / name))
                       for i, name in enumerate(f"{s['name']}.png" for s in manifest["samples"])])
    assert labels.shape == (TARGET_IMAGES, 32, 32) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= set(range(CLASSES)) | {255}
    summary = json.loads((results / "pseudo_labels" / "maps" / "summary.json").read_text())
    assert summary["images"] == TARGET_IMAGES and summary["total_pixels"] == labels.size
    assert summary["labelled_per_class"] == np.bincount(labels[labels != 255], minlength=CLASSES).tolist()
    assert summary["pl_ratio"] == pytest.approx(float((labels != 255).mean()))

    sweeps = config["pseudo_label_report"]["strategies"]
    table = (results / "pseudo_label_report" / "table.md").read_text()
    rows = [line for line in table.split("## At equal coverage")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| strategy")]
    expected = [(name, float(t)) for name, sweep in sweeps.items() for t in sweep["thresholds"]]
    assert [(row.split("|")[1].split()[0], float(row.split("|")[2])) for row in rows] == expected
    assert all(len(row.strip("|").split("|")) == 5 + CLASSES for row in rows)  # per-class accuracy columns
    report = json.loads((results / "pseudo_label_report" / "table.json").read_text())
    assert report["images"] == TARGET_IMAGES and report["total_pixels"] == labels.size
    # the report's row at the workflow's percentile is exactly the statistics of the written PNGs
    percentile = config["maps"]["pseudo_labels"]["percentile"]
    row = next(r for r in report["strategies"]["maps"]["rows"] if r["threshold"] == percentile)
    assert row["labelled_per_class"] == summary["labelled_per_class"]
    assert row["correct_per_class"] == summary["correct_per_class"]
    assert row["coverage"] == pytest.approx(summary["pl_ratio"]) and row["accuracy"] == pytest.approx(summary["precision"])
    for entry in report["strategies"].values():  # coverage never grows with a stricter threshold
        coverages = [r["coverage"] for r in entry["rows"]]
        assert all(0.0 <= c <= 1.0 for c in coverages) and coverages == sorted(coverages, reverse=True)
    assert (results / "pseudo_label_report" / "accuracy_vs_coverage.png").stat().st_size > 5000


def test_editing_gmm_components_reruns_gmms_and_downstream_only(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["maps"]["gmm"]["components"] += 1
    jobs = planned_jobs(run_snakemake(workdir, write_config(tmp_path / "edited.yaml", config), "-n").stdout)
    assert jobs == {"fit_class_gmm": 2, **DOWNSTREAM_OF_PROTOTYPES}  # maps.gmm_jobs  # not warmup, not extract_source_features


def test_editing_shard_count_relabels_but_keeps_prototypes_and_report(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["maps"]["shards"] = 3
    jobs = planned_jobs(run_snakemake(workdir, write_config(tmp_path / "edited.yaml", config), "-n").stdout)
    # MAPs and baseline labels on 3 shards, every variant (its label folders changed), the teacher's labels
    assert jobs == {"pseudo_labels": 6, "merge_pseudo_labels": 4, "selftrain": 5, "selftrain_round": 1,
                    "round_pseudo_labels": 3, "teacher_pseudo_labels": 3, "distill_stage": 1,
                    "stage_teacher_pseudo_labels": 3, "distill": 1, "evaluate": 8, "qualitative_figure": 1, "report": 1, "report_seeds": 1, "all": 1}


def test_two_shard_workflow_labels_equal_one_shard_labels(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config, results = yaml.safe_load(configfile.read_text()), seed_results(workdir / "results")
    settings = from_dict(PseudoLabelSettings, {**config["maps"]["pseudo_labels"], "strategy": "maps"}, "maps")
    label_images(results / "checkpoints" / "warmup.pt", results / "manifests" / "target_train.json",
                 results / "maps" / "prototypes.h5", tmp_path / "whole", 0, 1, settings, torch.device("cpu"))
    whole = {path.name: path.read_bytes() for path in sorted((tmp_path / "whole").glob("*.png"))}
    assert len(whole) == TARGET_IMAGES and whole == workflow_pngs(results)


@pytest.mark.parametrize("strategy, sweep, label_settings", [
    ("maps", {"threshold_mode": "absolute", "thresholds": [-1e9, 0.0, 60.0]}, {"delta": 60.0}),
    ("cas", {"thresholds": [0.0, 0.5, 2.0]}, {"margin": 0.5}),
    ("confidence", {"thresholds": [0.5, 0.9]}, {"confidence": 0.9}),
    ("confidence_balanced", {"thresholds": [0.3, 1.0]}, {"fraction": 0.3}),
])
def test_report_row_equals_labelling_at_that_threshold(finished_tiny_run, tmp_path, strategy, sweep, label_settings):
    """One scoring per image and strategy, every threshold from it: the counts of label_images' PNGs."""
    results = seed_results(finished_tiny_run[0] / "results")
    inputs = (results / "checkpoints" / "warmup.pt", results / "manifests" / "target_train.json",
              results / "maps" / "prototypes.h5")
    settings = from_dict(ReportSettings, {"strategies": {strategy: sweep}, "coverage_levels": [0.5]}, "report")
    paths = ReportPaths(tmp_path / "t.md", tmp_path / "t.json", tmp_path / "t.png")
    report = pseudo_label_report(*inputs, paths, settings, torch.device("cpu"))
    threshold = next(iter(label_settings.values()))
    row = next(r for r in report["strategies"][strategy]["rows"] if r["threshold"] == threshold)
    labelled = label_images(*inputs, tmp_path / "png", 0, 1, PseudoLabelSettings(strategy=strategy, **label_settings),
                            torch.device("cpu"))
    assert row["labelled_per_class"] == labelled["labelled_per_class"]
    assert row["correct_per_class"] == labelled["correct_per_class"]
    assert row["coverage"] == pytest.approx(labelled["pl_ratio"])
    assert json.loads(paths.json.read_text())["strategies"][strategy]["rows"][0]["threshold"] == sweep["thresholds"][0]


def test_paper_config_with_maps_enabled_plans_the_gpu_stages(tmp_path):
    cityscapes = make_cityscapes(tmp_path / "cityscapes", "train", per_city=1, size=(64, 32))
    make_cityscapes(cityscapes, "val", per_city=1, size=(64, 32))
    config = yaml.safe_load((REPO / "config" / "gta5_to_cityscapes.yaml").read_text())
    config["results"] = str(tmp_path / "results")
    config["datasets"]["source"]["root"] = str(make_gta5(tmp_path / "gta5", 3, (64, 32)))
    for domain in ("target_train", "target_val"):
        config["datasets"][domain]["root"] = str(cityscapes)
    config["pretrained"]["imagenet"] = None
    config["maps"]["enabled"] = config["pseudo_label_report"]["enabled"] = True
    for later_stage in ("stm", "selftrain", "distill"):  # they need the SimCLRv2 file; planned in test_real_workflow
        config[later_stage]["enabled"] = False
    result = run_snakemake(tmp_path, write_config(tmp_path / "paper.yaml", config), "-n")
    jobs = planned_jobs(result.stdout)
    assert {rule: jobs.get(rule) for rule in ("extract_source_features", "fit_class_gmm", "pseudo_labels")} == {
        "extract_source_features": 1, "fit_class_gmm": 19, "pseudo_labels": config["maps"]["shards"]}
    assert jobs["pseudo_label_report"] == 1 and jobs["merge_class_gmms"] == 1
    block = re.search(r"^rule extract_source_features:\n((?:    .*\n)+)", result.stdout, flags=re.MULTILINE).group(1)
    assert "gpa/target_statistics.json" in block.split("\n")[0]  # features of the GPA-stylized source
    assert re.search(r"resources: .*\bgpu=1\b", block)
