"""Check a GPU machine for BiSMAP in under 5 minutes, and print what ran, how fast, and peak GPU memory.

Run from the repository root (one GPU is enough)::

    python benchmarks/device_check.py --output device-check      # table also as .md and .json there
    python benchmarks/device_check.py --quick                    # small sizes, no workflow: seconds

Checks, each on the library's own code path (``gpu_checks.py``):

* ResNet-101 DeepLabV3+ forward/backward/SGD step with AMP (float16 autocast +
  GradScaler, as the training stages) at the paper's crop and batch;
* a 2-process DDP step with SyncBatchNorm: NCCL where 2 GPUs exist, otherwise
  gloo with both processes on the one GPU;
* MAPs scoring (Eq. 6, 19 classes x 8 x 256-d) on the GPU, labels checked
  against float64 on the CPU;
* FAISS K-Means and the Eq. 7 nearest-prototype search as the STM rules run
  them (GPU FAISS with a GPU build of faiss, else the fallbacks, said so);
* peak host and device memory of labelling one 1024x2048 image
  (``labelling_memory.py``);
* the tiny workflow end to end (2 iterations per stage) with
  ``--resources gpu=1``, when snakemake is installed.

Without CUDA the GPU checks are skipped with the reason and the CPU ones run;
the exit status is 1 only when a check FAILED.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpu_checks import (CheckResult, amp_training_step, backend_summary, ddp_step, faiss_kmeans, gmm_scoring,
                        prototype_search)
from labelling_memory import measure_labelling, paper_model_settings

from bismap.stm.clustering import faiss_build

REPOSITORY = Path(__file__).resolve().parents[1]
CLASSES = 19


@dataclasses.dataclass(frozen=True)
class Sizes:
    train_batch: int = 8  # the paper's warmup batch and crop (896 x 512)
    train_size: tuple[int, int] = (512, 896)
    train_steps: int = 5
    ddp_batch: int = 4
    ddp_size: tuple[int, int] = (512, 512)
    gmm_pixels: int = 524_288  # the features of two 1024x2048 images
    kmeans_rows: int = 47_600  # Cityscapes train x 16 sampled pixels, in the 4096-d SimCLRv2 space
    kmeans_dim: int = 4096
    kmeans_iterations: int = 20
    search_rows: int = 131_072
    label_size: tuple[int, int] = (1024, 2048)


QUICK = Sizes(train_batch=2, train_size=(128, 256), train_steps=2, ddp_batch=2, ddp_size=(128, 128),
              gmm_pixels=20_000, kmeans_rows=4_000, kmeans_dim=64, kmeans_iterations=10, search_rows=8_192,
              label_size=(128, 256))


def environment(no_gpu_reason: str | None) -> list[str]:
    snakemake = importlib.util.find_spec("snakemake")
    lines = [f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"{os.cpu_count()} CPU cores",
             f"faiss: {faiss_build()}",
             f"snakemake: {_snakemake_version() if snakemake else 'not installed'}"]
    if no_gpu_reason:
        lines.append(f"GPU: none ({no_gpu_reason})")
    else:
        properties = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {torch.cuda.device_count()} x {properties.name}, {properties.total_memory / 2**30:.0f} GiB"
                     f"; FAISS paths of a GPU job: {backend_summary(torch.device('cuda', 0))}")
    return lines


def _snakemake_version() -> str:
    from importlib.metadata import version

    return version("snakemake")


def run_check(name: str, device: str, function: Callable[[], CheckResult | list[CheckResult]]) -> list[CheckResult]:
    """Run one check; an exception becomes a FAILED row that names it (the other checks still run)."""
    start = time.perf_counter()
    try:
        result = function()
    except Exception as error:  # noqa: BLE001 - reported, not hidden: the row says FAILED and why
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        return [CheckResult(name, device, "FAILED", f"{time.perf_counter() - start:.1f} s", None, message[:300])]
    return result if isinstance(result, list) else [result]


def labelling_rows(device: torch.device, sizes: Sizes, quick: bool) -> list[CheckResult]:
    settings = paper_model_settings(quick)
    stages = measure_labelling(device, sizes.label_size, settings, CLASSES, 8, 65_536, warmup=device.type == "cuda")
    size = f"{sizes.label_size[0]}x{sizes.label_size[1]}"
    return [CheckResult(f"label one {size} image: {stage.stage}", str(device), "ok", f"{stage.seconds:.2f} s",
                        stage.device_mb, f"host peak added {stage.host_mb:.0f} MB ({stage.method})"
                        + ("; target <= 500 MB" if stage.stage.startswith("scoring") else ""))
            for stage in stages]


def gpu_checks(sizes: Sizes, quick: bool) -> list[tuple[str, str, Callable[[], CheckResult | list[CheckResult]]]]:
    cuda = torch.device("cuda", 0)
    model = paper_model_settings(quick)
    return [
        ("AMP training step", "cuda:0", lambda: amp_training_step(cuda, model, CLASSES, sizes.train_batch,
                                                                  sizes.train_size, sizes.train_steps)),
        ("DDP step, 2 processes", "cuda", lambda: ddp_step(model, CLASSES, sizes.ddp_batch, sizes.ddp_size, 2)),
    ]


def common_checks(device: torch.device, sizes: Sizes, quick: bool
                  ) -> list[tuple[str, str, Callable[[], CheckResult | list[CheckResult]]]]:
    """What runs on the GPU when there is one, else on the CPU."""
    pixels = sizes.gmm_pixels if device.type == "cuda" or quick else sizes.gmm_pixels // 10
    search_rows = sizes.search_rows if device.type == "cuda" or quick else sizes.search_rows // 4
    return [
        ("GMM scoring", str(device), lambda: gmm_scoring(device, pixels, CLASSES, 8, 256)),
        ("FAISS K-Means", str(device), lambda: faiss_kmeans(device, sizes.kmeans_rows, sizes.kmeans_dim, 40,
                                                            sizes.kmeans_iterations)),
        ("nearest prototype", str(device), lambda: prototype_search(device, search_rows, sizes.kmeans_dim, 40)),
        ("labelling memory", str(device), lambda: labelling_rows(device, sizes, quick)),
    ]


def workflow_config(results: Path) -> dict:
    """The tests' tiny config, cut to one path through every GPU rule: 2 iterations per training stage,
    one shard, one self-training variant (bismap), FAISS K-Means asking for the GPU."""
    from tests.conftest import tiny_config

    config = tiny_config(results)
    config["warmup"].update(iterations=2, log_interval=1, checkpoint_interval=1)
    config["oracle"]["enabled"] = False
    config["pseudo_label_report"]["enabled"] = False
    config["distill"]["enabled"] = False
    config["maps"]["shards"] = 1
    config["stm"].update(shards=1, kmeans_gpu=True)
    config["selftrain"]["variants"] = [variant for variant in config["selftrain"]["variants"]
                                       if variant["name"] == "bismap"]
    return config


def _run_snakemake(workdir: Path, configfile: Path, cores: int, timeout_s: float) -> tuple[int | None, str]:
    """The workflow in ``workdir``, its own process group (killed whole on timeout); (exit status or None, output)."""
    from tests.conftest import REPO, SNAKEMAKE

    command = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
               str(configfile), "--workflow-profile", "none", "--cores", str(cores), "--resources", "gpu=1",
               "--scheduler", "greedy"]
    environment = {**os.environ, "BISMAP_GPU_LOCK_DIR": str(workdir / "gpu-locks")}
    with subprocess.Popen(command, cwd=workdir, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout_s)
            return process.returncode, output
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return None, process.communicate()[0]


def _kmeans_line(results: Path) -> str:
    """What the target_prototypes job logged about where K-Means ran."""
    log = results / "logs" / "target_prototypes.log"
    if not log.is_file():
        return "no target_prototypes log"
    lines = [line.split(": ", 1)[-1] for line in log.read_text().splitlines() if "K-Means" in line or "k-means" in line]
    return "; ".join(lines)[:200]


def tiny_workflow(cores: int, timeout_s: float, output: Path | None) -> CheckResult:
    name, device = "tiny workflow, --resources gpu=1", "cuda" if torch.cuda.is_available() else "cpu"
    if importlib.util.find_spec("snakemake") is None:
        return CheckResult(name, device, "skipped", note="snakemake is not installed (pip install -e ., or carry it)")
    workdir = Path(tempfile.mkdtemp(prefix="bismap-device-check-"))
    from tests.conftest import write_config

    configfile = write_config(workdir / "tiny.yaml", workflow_config(workdir / "results"))
    start = time.perf_counter()
    status, log = _run_snakemake(workdir, configfile, cores, timeout_s)
    seconds = time.perf_counter() - start
    if output is not None:
        (output / "workflow.log").write_text(log)
    summary = workdir / "results" / "report" / "summary.json"
    if status != 0 or not summary.is_file():
        reason = f"timed out after {timeout_s:.0f} s" if status is None else f"snakemake exit status {status}"
        tail = " | ".join(log.strip().splitlines()[-3:])
        return CheckResult(name, device, "FAILED", f"{seconds:.0f} s", None, f"{reason}: {tail}"[:300])
    models = sorted(key for key, value in json.loads(summary.read_text()).items() if isinstance(value, dict))
    done = [line for line in log.splitlines() if "steps (100%) done" in line]
    return CheckResult(name, device, "ok", f"{seconds:.0f} s", None,
                       f"{done[-1].strip() if done else 'done'}; evaluated {', '.join(models)}; "
                       f"target_prototypes: {_kmeans_line(workdir / 'results')}")


def format_table(results: list[CheckResult]) -> str:
    header = ["check", "device", "status", "figure", "peak GPU [MB]", "note"]
    rows = [[result.check, result.device, result.status, result.figure,
             "-" if result.peak_gpu_mb is None else f"{result.peak_gpu_mb:,.0f}", result.note] for result in results]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and no workflow run (seconds)")
    parser.add_argument("--output", type=Path, default=None, help="folder for device_check.md/.json, workflow.log")
    parser.add_argument("--workflow-timeout", type=float, default=200.0, help="seconds for the tiny workflow")
    parser.add_argument("--skip-workflow", action="store_true")
    parser.add_argument("--cores", type=int, default=min(16, os.cpu_count() or 1), help="snakemake --cores")
    return parser.parse_args()


def collect(arguments: argparse.Namespace, no_gpu_reason: str | None) -> list[CheckResult]:
    sizes = QUICK if arguments.quick else Sizes()
    device = torch.device("cpu") if no_gpu_reason else torch.device("cuda", 0)
    results: list[CheckResult] = []
    for name, where, function in gpu_checks(sizes, arguments.quick):
        results += ([CheckResult(name, where, "skipped", note=no_gpu_reason)] if no_gpu_reason
                    else run_check(name, where, function))
    for name, where, function in common_checks(device, sizes, arguments.quick):
        results += run_check(name, where, function)
    if arguments.quick or arguments.skip_workflow:
        flag = "--quick" if arguments.quick else "--skip-workflow"
        results.append(CheckResult("tiny workflow, --resources gpu=1", str(device), "skipped",
                                   note=f"{flag} given (tests/test_workflow.py runs the tiny workflow on the CPU)"))
    else:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the workflow's jobs share the GPU with this process
        results += run_check("tiny workflow", str(device),
                             lambda: tiny_workflow(arguments.cores, arguments.workflow_timeout, arguments.output))
    return results


def main() -> int:
    arguments = parse_arguments()
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))  # tests.conftest (the tiny config)
    no_gpu_reason = None if torch.cuda.is_available() else "no CUDA device: torch.cuda.is_available() is False"
    start = time.perf_counter()
    header = environment(no_gpu_reason)
    print("\n".join(header), flush=True)
    if arguments.output is not None:
        arguments.output.mkdir(parents=True, exist_ok=True)
    results = collect(arguments, no_gpu_reason)
    peaks = [result.peak_gpu_mb for result in results if result.peak_gpu_mb is not None]
    footer = [f"total {time.perf_counter() - start:.0f} s; peak GPU memory of any check: "
              + (f"{max(peaks):,.0f} MB" if peaks else "- (no GPU check ran)"),
              f"{sum(result.status == 'FAILED' for result in results)} FAILED, "
              f"{sum(result.status == 'skipped' for result in results)} skipped, "
              f"{sum(result.status == 'ok' for result in results)} ok"]
    text = "\n".join([*header, "", format_table(results), "", *footer])
    print("\n" + format_table(results) + "\n\n" + "\n".join(footer))
    if arguments.output is not None:
        (arguments.output / "device_check.md").write_text(text + "\n")
        (arguments.output / "device_check.json").write_text(json.dumps(
            {"environment": header, "results": [dataclasses.asdict(result) for result in results],
             "summary": footer}, indent=2))
    return 1 if any(result.status == "FAILED" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
