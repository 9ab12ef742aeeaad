"""profiles/slurm, checked statically and through a live single-node SLURM cluster.

`test_every_gpu_rule_asks_the_gpu_partition_for_a_gpu` needs no cluster: a dry
run of the tiny config through the profile shows each rule's resources.

The other tests start munged, slurmctld and slurmd (tests/slurm/cluster.py;
Debian's munge and slurm-wlm packages are installed with apt-get when missing)
and run Snakemake with ``--workflow-profile profiles/slurm``, adding only what a
cluster without an accounting database and a test in a hurry need:
``--slurm-status-command squeue`` and a 1 s status-check interval (with the
plugin's back-off capped at 2 s, tests/slurm/snakemake_capped_poll.py). Where
the cluster cannot be installed or started they are skipped with the reason
(shown by ``-ra``/``-rs``); BISMAP_SLURM_TESTS=require turns that skip into a
failure, BISMAP_SLURM_TESTS=skip skips without trying.

Every job's states are sampled from squeue every 0.5 s; the summary (jobs,
partitions, GPUs, state sequences, wall time) is printed (``pytest -s``) and
written to slurm-report.txt in the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SNAKEMAKE, seed_results, tiny_config, write_config
from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, ensure_installed

PROFILE = REPO / "profiles" / "slurm"
PROFILE_SETTINGS = yaml.safe_load((PROFILE / "config.yaml").read_text())
CAPPED_POLL = REPO / "tests" / "slurm" / "snakemake_capped_poll.py"
RETRY_SNAKEFILE = REPO / "tests" / "slurm" / "retry" / "Snakefile"
TEST_CLUSTER_OPTIONS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
                        "--seconds-between-status-checks", "1"]
GPU_RESOURCES = ("gpu", "gpus", "gpu_model", "gres")
RUN_TIMEOUT_S = 420


def job_resources(dry_run_output: str) -> dict[str, dict[str, str]]:
    """{rule: resources} from the job blocks of a dry run (one entry per rule)."""
    resources: dict[str, dict[str, str]] = {}
    rule = None
    for line in dry_run_output.splitlines():
        match = re.match(r"(?:local)?rule (\w+):$", line.strip())
        if match:
            rule = match.group(1)
        elif rule and line.strip().startswith("resources:"):
            pairs = (item.split("=", 1) for item in line.split(":", 1)[1].split(", "))
            resources[rule] = {key.strip(): value.strip() for key, value in pairs}
            rule = None
    return resources


def test_every_gpu_rule_asks_the_gpu_partition_for_a_gpu(tmp_path):
    """GPU rules get their own set-resources entry (partition, runtime, memory, gpu); CPU rules no GPU."""
    config = tiny_config(tmp_path / "results")
    config.setdefault("gpa", {})["enabled"] = True  # every optional stage in the DAG
    configfile = write_config(tmp_path / "tiny.yaml", config)
    result = subprocess.run([*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                             "--configfile", str(configfile), "--workflow-profile", str(PROFILE), "-n"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rules = job_resources(result.stdout)
    assert {"warmup", "evaluate", "make_digit_scenes", "report"} <= set(rules)
    set_resources = PROFILE_SETTINGS["set-resources"]
    default_partition = PROFILE_SETTINGS["default-resources"]["slurm_partition"]
    gpu_rules = sorted(rule for rule, res in rules.items() if int(res.get("gpu", "0") or 0) > 0)
    assert gpu_rules, "no GPU rule in the tiny DAG"
    for rule in gpu_rules:
        assert rule in set_resources, f"GPU rule {rule} has no set-resources entry in {PROFILE}/config.yaml"
        entry = set_resources[rule]
        for key in ("slurm_partition", "runtime", "mem_mb", "gpu"):
            assert key in entry, f"set-resources.{rule} lacks {key}"
        assert entry["slurm_partition"] != default_partition, f"{rule} would run in the CPU partition"
        assert rules[rule]["slurm_partition"] == str(entry["slurm_partition"])
        assert rules[rule]["runtime"] == str(entry["runtime"])
    for rule, res in rules.items():
        if rule not in gpu_rules:
            assert not any(res.get(key) not in (None, "0") for key in GPU_RESOURCES), f"CPU rule {rule} asks for a GPU"
            assert res["slurm_partition"] == default_partition, f"CPU rule {rule} is in {res['slurm_partition']}"


# --- the live cluster ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    mode = os.environ.get("BISMAP_SLURM_TESTS", "auto")
    if mode == "skip":
        pytest.skip("BISMAP_SLURM_TESTS=skip")
    started = time.monotonic()
    try:
        installed = ensure_installed()
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except ClusterUnavailable as error:
        if mode == "require":
            pytest.fail(f"BISMAP_SLURM_TESTS=require but no SLURM test cluster: {error}")
        pytest.skip(f"no SLURM test cluster on this machine: {error}")
    print(f"\n[slurm] {installed}; cluster up in {time.monotonic() - started:.1f} s "
          f"(SLURM_CONF={cluster.conf}, {cluster.cpus} CPUs, 2 GPUs as gres)")
    yield cluster
    cluster.stop()


class JobStates:
    """Sample squeue every `interval` s in a thread: each job's state sequence, with times since start."""

    def __init__(self, cluster: SlurmCluster, interval: float = 0.5):
        self.cluster, self.interval = cluster, interval
        self.history: dict[str, list[tuple[float, str]]] = {}
        self.jobs: dict[str, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = time.monotonic() - self.start
        for job in self.cluster.squeue():
            self.jobs[job["id"]] = job
            states = self.history.setdefault(job["id"], [])
            if not states or states[-1][1] != job["state"]:
                states.append((now, job["state"]))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> JobStates:
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # final states


@dataclass
class ProfileRun:
    result: subprocess.CompletedProcess
    wall_s: float
    run_id: str
    jobs: list[dict] = field(default_factory=list)  # this run's SLURM jobs, in submission order

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr

    def by_rule(self, rule: str) -> list[dict]:
        return [job for job in self.jobs if job["rule"] == rule]

    def report(self, title: str) -> str:
        lines = [f"== {title}: snakemake exit {self.result.returncode}, wall {self.wall_s:.1f} s, "
                 f"{len(self.jobs)} SLURM jobs (run id {self.run_id})",
                 f"{'id':>4} {'rule / wildcards':42} {'partition':9} {'gpus':5} {'cpus':4} {'mem':>7} "
                 f"{'limit':>10}  states (s since start)"]
        for job in self.jobs:
            states = " > ".join(f"{state}@{t:.1f}" for t, state in job["states"])
            lines.append(f"{job['id']:>4} {job['comment']:42} {job['partition']:9} {job['gpus']:5} "
                         f"{job['cpus']:4} {job['mem']:>7} {job['limit']:>10}  {states}")
        return "\n".join(lines)


def scontrol_jobs(cluster: SlurmCluster) -> dict[str, dict[str, str]]:
    """`scontrol show job -o`: every job the controller still holds, as key=value fields."""
    result = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True,
                            env=cluster.client_env(), timeout=30)
    jobs = {}
    for line in result.stdout.splitlines():
        fields = dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def run_through_profile(cluster: SlurmCluster, workdir: Path, *arguments: str,
                        snakefile: Path = REPO / "Snakefile") -> ProfileRun:
    """Snakemake with --workflow-profile profiles/slurm on `cluster`; collects the run's SLURM jobs."""
    command = [sys.executable, str(CAPPED_POLL), "--snakefile", str(snakefile), "--directory", str(workdir),
               "--workflow-profile", str(PROFILE), *TEST_CLUSTER_OPTIONS, *arguments]
    environment = {**cluster.client_env(), "BISMAP_GPU_LOCK_DIR": str(workdir / "gpu-locks")}
    with JobStates(cluster) as states:
        result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=workdir,
                                timeout=RUN_TIMEOUT_S)
    wall_s = time.monotonic() - states.start
    match = re.search(r"SLURM run ID: (\S+)", result.stdout + result.stderr)
    run = ProfileRun(result, wall_s, match.group(1) if match else "?")
    details = scontrol_jobs(cluster)
    for job_id, job in sorted(states.jobs.items(), key=lambda item: int(item[0])):
        if job["name"] != run.run_id:
            continue
        info = details.get(job_id, {})
        tres = info.get("TresPerJob", "") + info.get("TresPerNode", "")
        gpus = re.search(r"gpu(?::\w+)?:(\d+)", tres)
        rule = re.sub(r"^rule_", "", job["comment"]).split("_wildcards_")[0]
        run.jobs.append(dict(id=job_id, comment=job["comment"], rule=rule, partition=job["partition"],
                             gpus=gpus.group(1) if gpus else "-", cpus=info.get("NumCPUs", "?"),
                             mem=info.get("MinMemoryNode", "?"), limit=info.get("TimeLimit", "?"),
                             exit_code=info.get("ExitCode", "?"), states=states.history[job_id]))
    return run


def publish(run: ProfileRun, title: str, folder: Path) -> None:
    text = run.report(title)
    with open(folder / "slurm-report.txt", "a") as report:
        report.write(text + "\n\n")
    print(f"\n{text}\n[slurm] report: {folder / 'slurm-report.txt'}")


def minutes(limit: str) -> int:
    """SLURM's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    hours, mins, _ = (int(part) for part in clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + mins


def megabytes(memory: str) -> float:
    """SLURM's MinMemoryNode (e.g. 16000M, 62.50G) in MB."""
    value, unit = re.fullmatch(r"([\d.]+)([KMGT]?)", memory).groups()
    return float(value) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[unit]


def test_tiny_workflow_runs_through_the_slurm_profile(slurm_cluster, tmp_path):
    """Data, indexing, warmup and oracle training and their evaluation as SLURM jobs, two GPU jobs at a time."""
    config = tiny_config(tmp_path / "results")
    config["threads"] = {name: 1 for name in config["threads"]}  # two jobs fit the 2-CPU node at once
    configfile = write_config(tmp_path / "tiny.yaml", config)
    results = seed_results(tmp_path / "results")
    targets = [str(results / "evaluation" / model / "metrics.json") for model in ("warmup", "oracle")]
    run = run_through_profile(slurm_cluster, tmp_path, *targets, "--configfile", str(configfile))
    publish(run, "tiny config through profiles/slurm (targets: warmup and oracle metrics)", tmp_path)
    assert run.result.returncode == 0, run.output[-6000:]
    for target in targets:
        assert Path(target).stat().st_size > 0
    expected = {"make_digit_scenes": 3, "index_dataset": 3, "warmup": 1, "oracle": 1, "evaluate": 2}
    assert {rule: len(run.by_rule(rule)) for rule in expected} == expected
    assert len(run.jobs) == sum(expected.values())
    set_resources = PROFILE_SETTINGS["set-resources"]
    defaults = PROFILE_SETTINGS["default-resources"]
    for job in run.jobs:
        assert job["states"][-1][1] == "COMPLETED", job
        if job["rule"] in set_resources:  # GPU rules: --gpus=1 in the GPU partition, limits from the profile
            entry = set_resources[job["rule"]]
            assert (job["partition"], job["gpus"]) == (entry["slurm_partition"], str(entry["gpu"])), job
            assert minutes(job["limit"]) == int(entry["runtime"]), job
            assert megabytes(job["mem"]) == int(entry["mem_mb"]), job
        else:  # CPU rules: no GPU
            assert (job["partition"], job["gpus"]) == (defaults["slurm_partition"], "-"), job
            assert minutes(job["limit"]) == int(defaults["runtime"]), job
            assert megabytes(job["mem"]) == int(defaults["mem_mb"]), job


def test_failed_cluster_job_is_retried_and_leaves_no_partial_output(slurm_cluster, tmp_path):
    """tests/slurm/retry/Snakefile: `flaky` fails once then succeeds; `broken` fails on every attempt."""
    run = run_through_profile(slurm_cluster, tmp_path, snakefile=RETRY_SNAKEFILE)
    publish(run, "retry workflow through profiles/slurm", tmp_path)
    retries = int(PROFILE_SETTINGS["retries"])
    assert run.result.returncode != 0  # `broken` never succeeds
    assert (tmp_path / "flaky.txt").read_text() == "complete\n"
    assert (tmp_path / "attempts" / "flaky.log").read_text().split() == ["1", "2"]
    assert (tmp_path / "attempts" / "broken.log").read_text().split() == [str(n) for n in range(1, retries + 2)]
    assert not (tmp_path / "broken.txt").exists(), "a failed job left its partial output"
    final = {rule: [job["states"][-1][1] for job in run.by_rule(rule)] for rule in ("flaky", "broken")}
    assert final == {"flaky": ["FAILED", "COMPLETED"], "broken": ["FAILED"] * (retries + 1)}
    assert "SLURM-job" in run.output and "failed" in run.output
