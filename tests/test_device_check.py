"""benchmarks/device_check.py on a machine without CUDA: the GPU parts are skipped, saying why; the rest runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, planned_jobs, run_snakemake, write_config

NO_GPU = "no CUDA device: torch.cuda.is_available() is False"


def test_quick_pass_without_cuda_skips_gpu_checks_with_the_reason(tmp_path):
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU, whatever the machine
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--quick",
                             "--output", str(tmp_path)], capture_output=True, text=True, env=environment, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["check"]: row for row in json.loads((tmp_path / "device_check.json").read_text())["results"]}
    skipped = {name: row["note"] for name, row in rows.items() if row["status"] == "skipped"}
    assert skipped["AMP training step"] == NO_GPU and skipped["DDP step, 2 processes"] == NO_GPU
    assert skipped["tiny workflow, --resources gpu=1"].startswith("--quick given")
    ran = [row for row in rows.values() if row["status"] == "ok"]
    assert {row["device"] for row in ran} == {"cpu"} and len(ran) == 5, rows
    assert "nearest prototype (Eq. 7), faiss-cpu" in rows and "GMM scoring 19x8x256 diag" in rows
    assert "labels = float64 CPU labels on 100.0000% of 20,000" in rows["GMM scoring 19x8x256 diag"]["note"]
    assert f"GPU: none ({NO_GPU})" in result.stdout and "0 FAILED, 3 skipped, 5 ok" in result.stdout
    table = (tmp_path / "device_check.md").read_text()
    for line in result.stdout.splitlines():
        if line.startswith("| "):
            assert line in table  # the file holds the printed table
    assert table.count("| skipped |") == 3


def test_workflow_part_plans_one_pass_through_every_gpu_rule(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from device_check import workflow_config
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    configfile = write_config(tmp_path / "tiny.yaml", workflow_config(tmp_path / "results"))
    jobs = planned_jobs(run_snakemake(tmp_path, configfile, "-n", "--resources", "gpu=1").stdout)
    gpu_rules = {"warmup": 1, "evaluate": 3, "extract_source_features": 1, "pseudo_labels": 1,
                 "extract_target_embeddings": 1, "target_prototypes": 1, "class_entropy": 1,
                 "source_distance_statistics": 1, "source_transferability": 1, "selftrain": 1,
                 "selftrain_round": 1, "round_pseudo_labels": 1, "qualitative_figure": 1}
    assert {rule: count for rule, count in jobs.items() if rule in gpu_rules} == gpu_rules
    assert "oracle" not in jobs and "distill" not in jobs and sum(jobs.values()) == 29  # one job per fan-out (shards, gmm_jobs = 1)
