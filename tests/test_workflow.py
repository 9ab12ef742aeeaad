"""The workflow end to end on the tiny config, rerun planning, config validation and lint."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bismap.report.stage_times import benchmark_seconds
from tests.conftest import planned_jobs, run_snakemake, seed_results, tiny_config, write_config

# STM (rules/stm.smk): all downstream of the warmup, whose encoder stands in for E-hat in the tiny config
STM_STAGES = {"extract_target_embeddings": 1, "target_prototypes": 1, "class_entropy": 1,
              "source_distance_statistics": 2, "source_transferability": 2, "merge_source_transferability": 1}
# MAPs (rules/maps.smk): 11 class GMMs in 2 jobs (maps.gmm_jobs); the MAPs and the baseline's confidence
# labels, 2 shards each; merges of maps, baseline and the two distillation stages' teacher labels
MAPS_STAGES = {"extract_source_features": 1, "fit_class_gmm": 2, "merge_class_gmms": 1, "pseudo_labels": 4,
               "merge_pseudo_labels": 4, "pseudo_label_report": 1}
# Self-training (5 variants; bismap in 2 rounds, the first labelling target-train in 2 shards for the second),
# two distillation stages (each labelling target-train in 2 shards) and the reports of the seed and over the
# seeds: 9 evaluations (warmup, 5 variants, bismap's first round, the 2 distillation stages)
ADAPTATION_STAGES = {"selftrain": 5, "selftrain_round": 1, "round_pseudo_labels": 2, "teacher_pseudo_labels": 2,
                     "distill_stage": 1, "stage_teacher_pseudo_labels": 2, "distill": 1, "evaluate": 9,
                     "qualitative_figure": 1, "report": 1, "report_seeds": 1}
# Every job of one run seed of the tiny config
ONE_SEED = {"make_digit_scenes": 3, "index_dataset": 3, "warmup": 1, "oracle": 1, **MAPS_STAGES, **STM_STAGES,
            **ADAPTATION_STAGES, "evaluate": 10}


def test_end_to_end_writes_metrics_and_report(finished_tiny_run):
    workdir, _ = finished_tiny_run
    results = seed_results(workdir / "results")
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
    assert {"warmup", "oracle", "gap_warmup_to_oracle"} <= set(summary)
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
    assert jobs == {"warmup": 1, "all": 1, **MAPS_STAGES, **STM_STAGES, **ADAPTATION_STAGES}


def test_editing_source_generator_leaves_target_data_and_oracle_alone(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["digit_scenes"]["splits"]["source"]["seed"] = 99
    edited = write_config(tmp_path / "edited.yaml", config)
    jobs = planned_jobs(run_snakemake(workdir, edited, "-n").stdout)
    assert jobs == {"make_digit_scenes": 1, "index_dataset": 1, "warmup": 1, "all": 1,
                    **MAPS_STAGES, **STM_STAGES, **ADAPTATION_STAGES}


def test_editing_stm_clusters_reruns_prototypes_and_maps_only(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["stm"]["clusters"] = 5
    edited = write_config(tmp_path / "edited.yaml", config)
    output = run_snakemake(workdir, edited, "-n").stdout
    jobs = planned_jobs(output)
    stm_reruns = {"target_prototypes": 1, "source_distance_statistics": 2, "source_transferability": 2,
                  "merge_source_transferability": 1}
    assert {rule: count for rule, count in jobs.items() if rule in STM_STAGES} == stm_reruns
    upstream = {"make_digit_scenes", "index_dataset", "warmup", "oracle", "extract_source_features", "fit_class_gmm",
                "merge_class_gmms", "extract_target_embeddings", "class_entropy"}
    assert not upstream & set(jobs)
    # only J's own rule reruns for a changed param; every other planned job consumes the new maps
    reasons = re.findall(r"^rule (\w+):\n(?:    (?!reason:).*\n)*    reason: (.*)$", output, flags=re.MULTILINE)
    assert len(reasons) == sum(jobs.values())
    assert {rule for rule, reason in reasons if not reason.startswith("Input files updated by another job")} == \
        {"target_prototypes"}


def test_stm_outputs_of_the_tiny_run(finished_tiny_run):
    from bismap.stm.source import read_weight_map, weight_map_paths

    results = seed_results(finished_tiny_run[0] / "results")
    summary = json.loads((results / "stm" / "summary.json").read_text())
    assert summary["images"] == 24 and summary["clusters"] == 4 and summary["d_mean"] > 0
    assert sum(summary["pixel_count_per_class"].values()) + summary["ignore_pixels"] == 24 * 32 * 32
    paths = weight_map_paths([results / "stm" / "weights" / f"shard_{shard}" for shard in (0, 1)])
    assert len(paths) == 24 and (results / "stm" / "preview.png").stat().st_size > 1000
    weights = read_weight_map(paths["source_00000"])
    assert weights.shape == (32, 32) and 0.0 <= weights.min() and weights.max() <= 1.0


def test_report_over_one_seed_and_a_benchmark_for_every_job(finished_tiny_run):
    results = finished_tiny_run[0] / "results"
    aggregate = json.loads((results / "report" / "summary.json").read_text())
    seed = json.loads((seed_results(results) / "report" / "summary.json").read_text())
    assert aggregate["seeds"] == [0] and aggregate["seed_count"] == 1
    for model in ("warmup", "selftrain_bismap", "distill", "oracle"):
        assert aggregate["models"][model]["miou"] == {"mean": seed[model]["miou"], "std": None, "ci95": None,
                                                      "values": [seed[model]["miou"]]}
        assert aggregate["models"][model]["per_class_iou"]["7"]["mean"] == seed[model]["per_class_iou"]["7"]
    assert aggregate["components"]["distill"]["distillation"] == 2  # stages
    # one benchmark file per job of the seed (the dry run of a fresh results folder plans them all)
    files = sorted(path.stem for path in (seed_results(results) / "benchmarks").glob("*.tsv"))
    stages = aggregate["stage_times"]["stages"]
    assert {rule: stage["jobs"] for rule, stage in stages.items()} == \
        {rule: count for rule, count in ONE_SEED.items() if rule != "report_seeds"}
    assert len(files) == sum(ONE_SEED.values()) - 1 and "fit_class_gmm_job_1" in files
    per_seed = aggregate["stage_times"]["per_seed"]["0"]
    assert sum(per_seed.values()) == pytest.approx(aggregate["stage_times"]["total"]["mean"])
    assert per_seed["evaluate"] == pytest.approx(sum(benchmark_seconds(path) for path in
                                                     (seed_results(results) / "benchmarks").glob("evaluate_*.tsv")))
    assert 0 < per_seed["warmup"] < 600
    markdown = (results / "report" / "summary.md").read_text()
    assert "## Time per stage" in markdown and "| selftrain_bismap | ✓ | ✓ | ✓ | ✓ | 2 |  |" in markdown
    assert (results / "benchmarks" / "report_seeds.tsv").is_file()


def test_adding_a_seed_plans_only_that_seeds_jobs_and_the_aggregate(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["seeds"] = [0, 1]
    output = run_snakemake(workdir, write_config(tmp_path / "two_seeds.yaml", config), "-n").stdout
    assert planned_jobs(output) == {**ONE_SEED, "all": 1}  # ONE_SEED has the one report_seeds job
    blocks = re.findall(r"^rule (\w+):\n((?:    .*\n)+)", output, flags=re.MULTILINE)
    assert len(blocks) == sum(ONE_SEED.values()) + 1
    for rule, block in blocks:
        if rule not in ("report_seeds", "all"):
            assert re.search(r"wildcards: seed=1\b", block), (rule, block)
            assert f"output: {workdir / 'results' / 'seed_1'}" in block, (rule, block)


def test_a_seed_has_its_own_digit_scenes(tmp_path):
    """Split seed + 1000 x run seed: seed 1's target-val is the generator's seed 1003 (tiny config: 3)."""
    from bismap.data.digit_scenes import generate_split, parse_settings

    config = tiny_config(tmp_path / "results")
    config["seeds"] = [0, 1]
    target = seed_results(tmp_path / "results", 1) / "data" / "digit_scenes" / "target_val"
    run_snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", config), str(target))
    generate_split(tmp_path / "by_hand", "target_val", 12, 1003, parse_settings(config["digit_scenes"]["settings"]))
    written = {path.relative_to(target): path.read_bytes() for path in sorted(target.rglob("*.png"))}
    by_hand = {path.relative_to(tmp_path / "by_hand"): path.read_bytes()
               for path in sorted((tmp_path / "by_hand").rglob("*.png"))}
    assert len(written) == 24 and written == by_hand  # 12 images, 12 labels
    generate_split(tmp_path / "seed_0", "target_val", 12, 3, parse_settings(config["digit_scenes"]["settings"]))
    assert all(path.read_bytes() != written[path.relative_to(tmp_path / "seed_0")]
               for path in (tmp_path / "seed_0" / "images").glob("*.png"))


@pytest.mark.parametrize(("device", "visible", "gpus"), [("auto", "", 0), ("auto", "0,1", 1), ("cpu", "0", 0),
                                                      ("cuda", "", 1)])
def test_gpu_rules_ask_for_a_gpu_only_where_jobs_can_get_one(device, visible, gpus, tmp_path, monkeypatch):
    """On a CPU-only machine a gpu=1 counter (capped at 1 by the default profile) would run one job at a time."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    config = {**tiny_config(tmp_path / "results"), "device": device}
    output = run_snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", config), "-n").stdout
    for rule in ("warmup", "evaluate", "selftrain", "pseudo_labels"):
        block = re.search(rf"^rule {rule}:\n((?:    .*\n)+)", output, flags=re.MULTILINE).group(1)
        assert re.search(rf"resources: .*\bgpu={gpus}\b", block), (rule, block)


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
    results = seed_results(tmp_path / "results")
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


def test_planning_raises_no_input_function_error_even_in_strict_mode(finished_tiny_run):
    """No rule's file pattern matches another's: rule selftrain's {variant} takes configured names only, so
    benchmarks/selftrain_round_bismap_round_1.tsv is not a file of a variant 'round_bismap_round_1'."""
    workdir, configfile = finished_tiny_run
    result = run_snakemake(workdir, configfile, "-n", "--forceall", "--strict-dag-evaluation", "functions")
    assert "Exception" not in result.stdout + result.stderr and "Error" not in result.stdout + result.stderr


def test_editing_execution_settings_plans_no_job_and_leaves_resume_keys_alone(finished_tiny_run, tmp_path):
    """Workers, log and checkpoint intervals and an evaluation's batch size change how a job runs, not what it
    computes: they are not in any rule's compared params, nor in the settings a resume state is keyed on."""
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["warmup"].update(workers=1, log_interval=1, checkpoint_interval=3)
    config["selftrain"]["training"].update(workers=1, log_interval=1, checkpoint_interval=2)
    config["stm"]["workers"] = 1
    config["maps"]["pseudo_labels"]["workers"] = 1
    config["evaluate"].update(batch_size=5, workers=1)
    result = run_snakemake(workdir, write_config(tmp_path / "execution.yaml", config), "-n")
    assert planned_jobs(result.stdout) == {}
    checkpoint = torch.load(seed_results(workdir / "results") / "checkpoints" / "warmup.pt", weights_only=False)
    assert not {"workers", "log_interval", "checkpoint_interval"} & set(checkpoint["settings"]["training"])


def test_checkpoints_and_report_record_what_each_training_ran(finished_tiny_run):
    results = seed_results(finished_tiny_run[0] / "results")
    record = torch.load(results / "checkpoints" / "warmup.pt", weights_only=False)["provenance"]
    assert (record["processes"], record["global_batch_size"], record["iterations"], record["amp"]) == (1, 4, 4, False)
    assert record["device"].startswith("cpu") and record["learning_rate"] == 0.01
    metrics = json.loads((results / "evaluation" / "selftrain_stm" / "metrics.json").read_text())
    assert metrics["provenance"]["global_batch_size"] == 2 and metrics["provenance"]["iterations"] == 2
    report = (results / "report" / "summary.md").read_text()
    assert "## What each model ran" in report and "| warmup | 1 | 4 | 0.01 | 4 | False | cpu" in report
