"""Processes for data-parallel training: who each one is, and starting N of them.

:func:`launch` runs ``worker(context, *args)`` in this process when there is one
device (the single-device path is then exactly a plain call), else in N fresh
Python processes (``python -c``, like torchrun: a Snakemake ``script:`` has no
``__main__`` guard, so ``multiprocessing`` spawn would rerun the rule, and fork
is unsafe once CUDA was touched). The processes meet through a file store in a
temporary folder (no TCP port to pick), use NCCL on CUDA and gloo on the CPU,
log to the parent's log files (rank 0 everything, the others warnings), and are
stopped together when one fails or the parent dies. The training-side helpers
are in :mod:`bismap.training.distributed`, which re-exports these names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

R = TypeVar("R")

_CHILD_COMMAND = "from bismap.training.processes import _child_main; _child_main()"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s"


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_devices(device: torch.device, count: int) -> list[torch.device]:
    """One device per process for ``count`` processes, from what ``acquire_devices(count)`` yielded.

    ``acquire_devices`` puts the ``count`` taken GPUs in ``CUDA_VISIBLE_DEVICES`` and yields
    ``cuda:0``; the processes inherit the variable and rank r uses ``cuda:r``. On the CPU
    every process gets ``cpu`` (and with ``count > 1`` a warning: gloo CPU mode).
    """
    if count < 1:
        raise ValueError(f"need at least one process, got {count}")
    if device.type == "cuda":
        first = device.index or 0
        return [torch.device("cuda", first + rank) for rank in range(count)]
    if count > 1:
        logger.warning("no CUDA device: running %d CPU processes with gloo (equivalent results, no speed-up "
                       "expected; meant for tests and laptops)", count)
    return [device] * count


def launch(worker: Callable[..., R], devices: Sequence[torch.device], *args: Any, backend: str | None = None) -> R:
    """Run ``worker(context, *args)`` once per device and return rank 0's result.

    One device: called in this process with ``DistributedContext(0, 1, device)``, nothing
    else. Several: one child process each (the worker and ``args`` must pickle; the worker
    must be importable by name); an exception or signal in any child stops all and raises
    ``RuntimeError`` naming the rank. ``backend``: NCCL on CUDA and gloo on the CPU unless
    given; NCCL needs a distinct GPU per process, so several processes on one GPU (a
    one-GPU check of the multi-GPU path) need ``backend="gloo"``.
    """
    if len(devices) == 1:
        return worker(DistributedContext(0, 1, devices[0]), *args)
    backend = backend or ("nccl" if devices[0].type == "cuda" else "gloo")
    with tempfile.TemporaryDirectory(prefix="bismap-ddp-") as folder:
        job = _Job(worker, args, [str(device) for device in devices], str(Path(folder) / "store"),
                   str(Path(folder) / "result.pkl"), _parent_log_files(), logging.getLogger().level,
                   max(1, torch.get_num_threads() // len(devices)), os.getpid(), backend)
        payload = Path(folder) / "job.pkl"
        payload.write_bytes(pickle.dumps(job))
        logger.info("launching %d processes on %s (%s)", len(devices), ", ".join(job.devices), backend)
        _flush_log_files()
        processes = [_start_child(payload, rank, job) for rank in range(len(devices))]
        try:
            _wait_all(processes)
        finally:
            _stop(processes)
            _seek_log_files_to_end()  # the children appended to the rule's log
        return pickle.loads(Path(job.result_path).read_bytes())


@dataclass(frozen=True)
class _Job:
    worker: Callable[..., Any]
    args: tuple[Any, ...]
    devices: list[str]
    store_path: str
    result_path: str
    log_files: list[str]
    log_level: int
    threads: int
    parent_pid: int
    backend: str


def _start_child(payload: Path, rank: int, job: _Job) -> subprocess.Popen:
    python_path = os.pathsep.join(path for path in sys.path if path)  # what this process imports from
    environment = {**os.environ, "PYTHONPATH": python_path, "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": str(len(job.devices)), "LOCAL_WORLD_SIZE": str(len(job.devices)),
                   "OMP_NUM_THREADS": str(job.threads)}
    return subprocess.Popen([sys.executable, "-c", _CHILD_COMMAND, str(payload), str(rank)], env=environment)


def _wait_all(processes: list[subprocess.Popen], grace_s: float = 2.0) -> None:
    """Until every child exited 0. On a failure, give the others ``grace_s`` to end, then raise naming all."""
    failed_at = None
    while True:
        codes = [process.poll() for process in processes]
        if all(code == 0 for code in codes):
            return
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = time.monotonic()  # peers of a failed rank usually fail too, soon after
        if failed_at is not None and (None not in codes or time.monotonic() - failed_at > grace_s):
            failures = [f"rank {rank} ({_cause(code)})" for rank, code in enumerate(codes) if code not in (None, 0)]
            raise RuntimeError(f"{len(failures)} of {len(processes)} training processes failed: "
                               f"{', '.join(failures)}; the others were stopped; their errors are in the log")
        time.sleep(0.1)


def _cause(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _child_main() -> None:
    """Entry point of one child: ``python -c ... <job.pkl> <rank>``."""
    job: _Job = pickle.loads(Path(sys.argv[1]).read_bytes())
    rank = int(sys.argv[2])
    _exit_with_parent(job.parent_pid)
    _configure_child_logging(job, rank)
    torch.set_num_threads(job.threads)
    context = DistributedContext(rank, len(job.devices), torch.device(job.devices[rank]))
    if context.device.type == "cuda":
        torch.cuda.set_device(context.device)
    dist.init_process_group(job.backend, init_method=f"file://{job.store_path}", rank=rank,
                            world_size=context.world_size, device_id=_device_id(context, job.backend))
    try:
        result = job.worker(context, *job.args)
        if context.is_main:
            Path(job.result_path).write_bytes(pickle.dumps(result))
        barrier(context)
    except Exception:
        logger.exception("rank %d of %d failed", rank, context.world_size)  # to the rule's log, once
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


def _device_id(context: DistributedContext, backend: str) -> torch.device | None:
    """The GPU an NCCL process group binds to; none for gloo (also gloo on CUDA tensors)."""
    return context.device if context.device.type == "cuda" and backend == "nccl" else None


def _exit_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends SIGTERM when the launching process dies (e.g. Snakemake killed it)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before prctl took effect
        raise SystemExit("parent process gone")


def _configure_child_logging(job: _Job, rank: int) -> None:
    """Rank 0 logs like the parent (its log files, appended, and stderr); the others warnings only."""
    handlers: list[logging.Handler] = [logging.FileHandler(path, mode="a") for path in job.log_files]
    handlers.append(logging.StreamHandler(sys.stderr))
    level = job.log_level if rank == 0 else max(job.log_level, logging.WARNING)
    logging.basicConfig(level=level, format=_LOG_FORMAT.format(rank=rank), handlers=handlers, force=True)
    logging.captureWarnings(True)


def _parent_log_files() -> list[str]:
    return [handler.baseFilename for handler in logging.getLogger().handlers
            if isinstance(handler, logging.FileHandler)]


def _flush_log_files() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def _seek_log_files_to_end() -> None:
    """Write after what the children appended, not over it (the parent's file may not be in append mode)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            handler.stream.seek(0, os.SEEK_END)


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        nccl = context.device.type == "cuda" and dist.get_backend() == "nccl"
        dist.barrier(device_ids=[context.device.index] if nccl else None)
