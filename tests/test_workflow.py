"""The workflow end to end on the tiny config, rerun planning, config validation and lint."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image

from tests.conftest import planned_jobs, run_snakemake, tiny_config, write_config


def test_end_to_end_writes_metrics_and_report(finished_tiny_run):
    workdir, _ = finished_tiny_run
    results = workdir / "results"
    for model in ("warmup", "oracle"):
        metrics = json.loads((results / "evaluation" / model / "metrics.json").read_text())
        confusion = np.array(metrics["confusion"])
        assert metrics["images"] == 12
        assert confusion.sum() == metrics["pixels"] > 0
        assert 0.0 <= metrics["miou"] <= 100.0
        assert (results / "evaluation" / model / "confusion.png").stat().st_size > 1000
        checkpoint_step = metrics["checkpoint"]
        assert checkpoint_step.endswith(f"{model}.pt")
    summary = json.loads((results / "report" / "summary.json").read_text())
    assert set(summary) == {"warmup", "oracle", "gap_warmup_to_oracle"}
    assert abs(summary["gap_warmup_to_oracle"] - (summary["oracle"]["miou"] - summary["warmup"]["miou"])) < 1e-9
    loss_lines = (results / "training" / "warmup_loss.tsv").read_text().splitlines()
    assert len(loss_lines) == 1 + 4  # header + one row per iteration
    assert not (results / ".state" / "warmup.pt").exists()  # resume state removed once the output exists


def test_nothing_to_do_after_a_complete_run(finished_tiny_run):
    workdir, configfile = finished_tiny_run
    result = run_snakemake(workdir, configfile, "-n")
    assert planned_jobs(result.stdout) == {}


def test_editing_warmup_learning_rate_reruns_warmup_and_downstream_only(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["warmup"]["optimizer"]["learning_rate"] = 0.02
    edited = write_config(tmp_path / "edited.yaml", config)
    jobs = planned_jobs(run_snakemake(workdir, edited, "-n").stdout)
    maps_stages = {"extract_source_features": 1, "fit_class_gmm": 11, "merge_class_gmms": 1, "pseudo_labels": 2,
                   "merge_pseudo_labels": 1, "pseudo_label_report": 1}  # all downstream of the warmup
    assert jobs == {"warmup": 1, "evaluate": 1, "report": 1, "all": 1, **maps_stages}


def test_editing_source_generator_leaves_target_data_and_oracle_alone(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["digit_scenes"]["splits"]["source"]["seed"] = 99
    edited = write_config(tmp_path / "edited.yaml", config)
    jobs = planned_jobs(run_snakemake(workdir, edited, "-n").stdout)
    maps_stages = {"extract_source_features": 1, "fit_class_gmm": 11, "merge_class_gmms": 1, "pseudo_labels": 2,
                   "merge_pseudo_labels": 1, "pseudo_label_report": 1}  # all downstream of the warmup
    assert jobs == {"make_digit_scenes": 1, "index_dataset": 1, "warmup": 1, "evaluate": 1, "report": 1, "all": 1,
                    **maps_stages}


def test_unknown_config_key_fails_before_any_job(tmp_path):
    config = tiny_config(tmp_path / "results")
    config["warmup"]["learning_rat"] = 0.1
    result = run_snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0
    assert "learning_rat" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_wrong_type_fails_naming_the_value(tmp_path):
    config = tiny_config(tmp_path / "results")
    config["warmup"]["iterations"] = "many"
    result = run_snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0
    assert "many" in result.stdout + result.stderr


def test_missing_imagenet_weights_fail_early_with_the_key(tmp_path):
    config = tiny_config(tmp_path / "results")
    config["pretrained"] = {"imagenet": str(tmp_path / "no_such_resnet.pth")}
    result = run_snakemake(tmp_path, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0
    assert "pretrained.imagenet" in result.stdout + result.stderr


def test_bad_label_fails_naming_file_and_keeps_earlier_outputs(tmp_path):
    config = tiny_config(tmp_path / "results")
    configfile = write_config(tmp_path / "tiny.yaml", config)
    results = tmp_path / "results"
    run_snakemake(tmp_path, configfile, str(results / "manifests" / "target_val.json"))
    manifest_before = (results / "manifests" / "target_val.json").read_bytes()
    label = results / "data" / "digit_scenes" / "target_val" / "labels" / "target_val_00003.png"
    Image.fromarray(np.full((32, 32), 42, dtype=np.uint8)).save(label)
    # the generated folder is older than the manifest, so force the index to run again
    result = run_snakemake(tmp_path, configfile, "--forcerun", "index_dataset",
                           str(results / "manifests" / "target_val.json"), check=False)
    assert result.returncode != 0
    log = (results / "logs" / "index_dataset" / "target_val.log").read_text()
    assert "target_val_00003.png" in log and "[42]" in log
    assert not (results / "manifests" / "target_val.json").exists()  # Snakemake removes a failed output
    assert (results / "data" / "digit_scenes" / "target_val" / "images").is_dir()  # input untouched
    assert manifest_before  # the failed job left nothing half-written in its place


def test_lint_reports_nothing():
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--workflow-profile", "none"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr
