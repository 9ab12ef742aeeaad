"""The paper configurations (GTA5/SYNTHIA -> Cityscapes) through the workflow, on tiny fixture datasets.

Each paper config is loaded, its dataset roots pointed at fixtures in the real
on-disk layouts (tests/real_fixtures.py), and either dry-run unchanged or
shrunk to seconds (width-8 ResNet-18, 2 iterations on 32x32 crops) and run end
to end, with Global Photometric Alignment (BiSMAP Sec. 3.5) enabled.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from bismap.data.photometric import STATISTICS_KEYS
from bismap.data.real_datasets import CITYSCAPES_CLASS_NAMES, SYNTHIA_16_CLASSES
from tests.conftest import REPO, planned_jobs, run_snakemake, seed_results, write_config
from tests.real_fixtures import gta5_name, make_cityscapes, make_gta5, make_synthia, write_palette_label

SIZE = (64, 32)  # (width, height) of every fixture image
STM_STAGES = {"extract_target_embeddings": 1, "target_prototypes": 1, "class_entropy": 1,
              "source_distance_statistics": 4, "source_transferability": 4, "merge_source_transferability": 1}
PAPER_CONFIGS = {"gta5": "gta5_to_cityscapes.yaml", "synthia": "synthia_to_cityscapes.yaml"}


@pytest.fixture(scope="module")
def dataset_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GTA5 (3 images), SYNTHIA (3) and Cityscapes train/val (2 each), all 64x32."""
    root = tmp_path_factory.mktemp("datasets")
    cityscapes = make_cityscapes(root / "cityscapes", "train", per_city=1, size=SIZE)
    make_cityscapes(cityscapes, "val", per_city=1, size=SIZE)
    return {"gta5": make_gta5(root / "gta5", 3, SIZE), "synthia": make_synthia(root / "synthia", 3, SIZE),
            "cityscapes": cityscapes}


def paper_config(source: str, roots: dict[str, Path], results: Path, imagenet: str | None,
                 embedding: str | None = None) -> dict:
    """A paper config as shipped, with only the dataset roots, results and weights redirected.

    ``embedding``: the STM's SimCLRv2 checkpoint; None = the warmup encoder stands in.
    """
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / PAPER_CONFIGS[source]).read_text()))
    config["results"] = str(results)
    config["datasets"]["source"]["root"] = str(roots[source])
    for domain in ("target_train", "target_val"):
        config["datasets"][domain]["root"] = str(roots["cityscapes"])
    config["pretrained"]["imagenet"] = imagenet
    config["stm"]["embedding_checkpoint"] = embedding
    return config


def shrink(config: dict) -> dict:
    """Seconds on a CPU: a width-8 ResNet-18 DeepLabV3+, 2 iterations of batch 2 on 32x32 crops."""
    config = copy.deepcopy(config)
    config["threads"] = {"train": 1, "evaluate": 1, "data": 1}
    config["model"] = {"backbone_depth": 18, "backbone_width": 8, "output_stride": 16, "aspp_rates": [1, 2],
                       "aspp_channels": 8, "low_level_channels": 8, "feature_dim": 8}
    training = copy.deepcopy(config["warmup"])
    training.update(iterations=2, batch_size=2, workers=0, amp=False, log_interval=1, checkpoint_interval=1)
    training["augment"]["crop_size"] = [32, 32]
    config["warmup"] = training
    config["oracle"]["training"] = copy.deepcopy(training)
    config["evaluate"].update(batch_size=1, workers=0)
    config["gpa"].update(enabled=True, max_images=2, preview_rows=2)
    config["maps"]["enabled"] = False  # 19 per-class GMM jobs; the MAPs stages have their own tests
    config["stm"]["enabled"] = False  # the STM stages have their own tests (tests/test_transferability.py)
    config["selftrain"]["enabled"] = False  # needs MAPs and the STM; tests/test_adaptation_workflow.py runs it
    config["distill"]["enabled"] = False
    return config


def job_block(output: str, rule: str) -> str:
    """The dry-run paragraph of the first job of ``rule``."""
    match = re.search(rf"^rule {rule}:\n((?:    .*\n)+)", output, flags=re.MULTILINE)
    assert match, f"no job of rule {rule} in the plan:\n{output[-3000:]}"
    return match.group(1)


@pytest.mark.parametrize("source", sorted(PAPER_CONFIGS))
def test_paper_config_plans_gpu_jobs_and_gpa(source, dataset_roots, tmp_path):
    imagenet = tmp_path / "resnet101-imagenet.pth"
    imagenet.touch()  # a dry run never loads it
    embedding = tmp_path / "r152_2x_sk0.pth"
    embedding.touch()
    config = paper_config(source, dataset_roots, tmp_path / "results", str(imagenet), str(embedding))
    config["oracle"]["enabled"] = True  # to check that the target oracle is not stylized
    result = run_snakemake(tmp_path, write_config(tmp_path / "paper.yaml", config), "-n")
    jobs = planned_jobs(result.stdout)
    # two distillation stages (distill.stages: 2), each labelling target-train in 4 shards
    adaptation = {"selftrain": 1, "teacher_pseudo_labels": 4, "distill_stage": 1, "stage_teacher_pseudo_labels": 4,
                  "distill": 1, "qualitative_figure": 1}
    assert jobs == {"index_dataset": 3, "gpa_statistics": 1, "warmup": 1, "oracle": 1, "evaluate": 5,
                    "report": 1, "extract_source_features": 1, "fit_class_gmm": 19, "merge_class_gmms": 1,
                    "pseudo_labels": 4, "merge_pseudo_labels": 3, "report_seeds": 1, "all": 1, **STM_STAGES,
                    **adaptation}
    for rule in ("warmup", "evaluate", "oracle", "extract_source_features", "pseudo_labels",
                 "extract_target_embeddings", "class_entropy", "source_distance_statistics", "source_transferability",
                 "selftrain", "teacher_pseudo_labels", "distill_stage", "stage_teacher_pseudo_labels", "distill",
                 "qualitative_figure"):
        assert re.search(r"resources: .*\bgpu=1\b", job_block(result.stdout, rule)), rule
    assert not re.search(r"resources: .*\bgpu=1\b", job_block(result.stdout, "target_prototypes"))
    assert str(embedding) in job_block(result.stdout, "extract_target_embeddings").split("\n")[0]
    assert "gpa/target_statistics.json" in job_block(result.stdout, "source_transferability").split("\n")[0]
    assert "gpa/target_statistics.json" in job_block(result.stdout, "warmup").split("\n")[0]
    for rule in ("selftrain", "distill"):  # the stylized source is used in self-training too (Sec. 3.5)
        assert "gpa/target_statistics.json" in job_block(result.stdout, rule).split("\n")[0], rule
    assert str(imagenet) in job_block(result.stdout, "distill").split("\n")[0]  # the student starts from ImageNet
    assert "gpa" not in job_block(result.stdout, "oracle").split("\n")[0]
    assert not (tmp_path / "results").exists()


def test_the_family_in_a_paper_config_plans_gpu_jobs_with_the_papers_margin(dataset_roots, tmp_path):
    """The four methods added to the GTA5 config as its comments say: one GPU job each (CAG-UDA: three stages,
    the later two on anchors and labels of the previous stage's model), anchor labels with Delta_d = 2.5."""
    config = paper_config("gta5", dataset_roots, tmp_path / "results", None)
    config["selftrain"]["variants"] += [{"name": "proda", "method": "proda"}, {"name": "cpsl", "method": "cpsl"},
                                        {"name": "contrastive", "method": "contrastive"},
                                        {"name": "cag", "method": "cag", "rounds": 3}]
    result = run_snakemake(tmp_path, write_config(tmp_path / "family.yaml", config), "-n", "-p")
    jobs = planned_jobs(result.stdout)
    assert jobs["selftrain"] == 5 and jobs["selftrain_round"] == 2 and jobs["stage_anchor_labels"] == 2 * 4
    assert re.search(r"resources: .*\bgpu=1\b", job_block(result.stdout, "selftrain_round"))
    assert config["selftrain"]["cag"]["margin"] == 2.5 and config["selftrain"]["cpsl"]["consistency_weight"] == 5.0


def test_gpa_disabled_leaves_it_out_of_the_plan(dataset_roots, tmp_path):
    config = paper_config("gta5", dataset_roots, tmp_path / "results", None)
    config["gpa"]["enabled"] = False
    jobs = planned_jobs(run_snakemake(tmp_path, write_config(tmp_path / "paper.yaml", config), "-n").stdout)
    assert "gpa_statistics" not in jobs and jobs["warmup"] == 1


@pytest.mark.parametrize("source", sorted(PAPER_CONFIGS))
def test_tiny_paper_run_end_to_end(source, dataset_roots, tmp_path):
    config = shrink(paper_config(source, dataset_roots, tmp_path / "results", None))
    run_snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", config))
    results = seed_results(tmp_path / "results")
    metrics = json.loads((results / "evaluation" / "warmup" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["pixels"] == 2 * SIZE[0] * SIZE[1] - ignored_pixels(results)
    assert np.array(metrics["confusion"]).shape == (19, 19)
    if source == "gta5":
        assert list(metrics["per_class_iou"]) == list(CITYSCAPES_CLASS_NAMES)
    else:
        assert metrics["evaluated_classes"] == list(SYNTHIA_16_CLASSES) and len(metrics["per_class_iou"]) == 16
    stats = json.loads((results / "gpa" / "target_statistics.json").read_text())
    assert set(STATISTICS_KEYS) <= set(stats) and stats["num_images"] == 2
    assert (results / "gpa" / "preview.png").stat().st_size > 1000
    assert "stylized on the fly by GPA" in (results / "logs" / "warmup.log").read_text()
    assert (results / "report" / "summary.md").is_file()
    assert json.loads((tmp_path / "results" / "report" / "summary.json").read_text())["seeds"] == [0]


def ignored_pixels(results: Path) -> int:
    return json.loads((results / "manifests" / "target_val.json").read_text())["ignored_pixels"]


def test_missing_dataset_root_fails_before_any_job(dataset_roots, tmp_path):
    config = shrink(paper_config("gta5", dataset_roots, tmp_path / "results", None))
    config["datasets"]["source"]["root"] = str(tmp_path / "no_such_gta5")
    result = run_snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0
    assert "datasets.source.root" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_gta5_label_id_fails_in_index_naming_the_file(tmp_path):
    gta5 = make_gta5(tmp_path / "gta5", 3, SIZE)
    cityscapes = make_cityscapes(tmp_path / "cityscapes", "train", per_city=1, size=SIZE)
    bad_label = gta5 / "labels" / f"{gta5_name(1)}.png"
    ids = np.zeros(SIZE[::-1], dtype=np.uint8)
    ids[3, 5] = 200  # not a Cityscapes labelId
    write_palette_label(bad_label, ids)
    roots = {"gta5": gta5, "cityscapes": cityscapes}
    config = shrink(paper_config("gta5", roots, tmp_path / "results", None))
    manifest = seed_results(tmp_path / "results") / "manifests" / "source.json"
    result = run_snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", config), str(manifest), check=False)
    assert result.returncode != 0
    log = (seed_results(tmp_path / "results") / "logs" / "index_dataset" / "source.log").read_text()
    assert str(bad_label) in log and "[200]" in log
    assert not manifest.exists()
