"""GPU device slots for Snakemake jobs that share one machine.

Snakemake's ``resources: gpu=1`` is only a counter: with ``--resources gpu=4``
it starts at most four GPU jobs at a time, but never tells a job *which* GPU to
use. Each GPU job therefore takes a free device slot itself::

    with acquire_devices(1) as device:
        model.to(device)

A slot is an exclusive ``fcntl.flock`` on ``<lock_dir>/gpu-<id>.lock``, held for
the whole ``with`` block. The kernel drops the lock when the process dies, so a
crashed or killed job never leaves a stale slot behind (a plain "lock file
exists" check would). The lock directory must be on a host-local file system
(the default is under the temporary directory): GPUs are per host, and
``flock`` over NFS is not reliable.

Inside a SLURM job (``SLURM_JOB_ID`` set) that was given exactly the devices
it asks for (one Snakemake job per SLURM job), the scheduler has already
isolated them, so they are used without locks. When several Snakemake jobs
share one multi-GPU allocation (``snakemake`` started inside ``salloc``), slots
are locked as usual, in a ``slurm-<jobid>`` subfolder of the lock directory,
since device ids are relative to the allocation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CUDA_ENV = "CUDA_VISIBLE_DEVICES"
LOCK_DIR_ENV = "BISMAP_GPU_LOCK_DIR"

_Slot = tuple[str, int]  # (device id, open file descriptor holding the flock)


def visible_devices(
    environ: Mapping[str, str] | None = None, cuda_count: int | None = None
) -> list[str]:
    """Return the ids of the GPUs this process may use.

    An existing ``CUDA_VISIBLE_DEVICES`` is respected: ``"0,2"`` gives
    ``["0", "2"]``, and ``""`` or ``"-1"`` give ``[]``. As in CUDA, the list
    ends at the first negative id. Without the variable, the ids are
    ``"0" .. "n-1"`` for the ``n`` devices torch sees (``cuda_count``
    overrides that query; ``torch.cuda.device_count`` does not initialise
    CUDA).
    """
    env = os.environ if environ is None else environ
    if CUDA_ENV in env:
        ids: list[str] = []
        for item in env[CUDA_ENV].split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return ids
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    return [str(index) for index in range(count)]


def default_lock_dir() -> Path:
    """``$BISMAP_GPU_LOCK_DIR``, else ``<tmp>/bismap-gpu-slots-<uid>``."""
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"bismap-gpu-slots-{os.getuid()}"


def lock_path(lock_dir: Path, device_id: str) -> Path:
    """The lock file of one device; characters unsafe in a file name become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", device_id)
    return lock_dir / f"gpu-{safe}.lock"


def _try_lock(path: Path) -> int | None:
    """Open ``path`` and take an exclusive non-blocking flock; ``None`` if held elsewhere."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    # Who holds the slot, for a human reading the lock directory.
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} pid={os.getpid()}\n".encode())
    return fd


def _release(slots: list[_Slot]) -> None:
    """Unlock explicitly (a forked child may share the descriptor) and close."""
    for _, fd in slots:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _take_free(devices: list[str], count: int, lock_dir: Path) -> list[_Slot]:
    """One pass over ``devices``: all ``count`` slots, or none (partial takes are released)."""
    taken: list[_Slot] = []
    for device_id in devices:
        fd = _try_lock(lock_path(lock_dir, device_id))
        if fd is not None:
            taken.append((device_id, fd))
            if len(taken) == count:
                return taken
    _release(taken)
    return []


def _wait_for_slots(
    devices: list[str], count: int, lock_dir: Path, timeout_s: float, poll_s: float
) -> list[_Slot]:
    """Poll every ``poll_s`` seconds until ``count`` slots are free, or raise ``TimeoutError``."""
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    start = time.monotonic()
    logged_wait = False
    while True:
        taken = _take_free(devices, count, lock_dir)
        if taken:
            return taken
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise TimeoutError(
                f"no {count} free GPU slot(s) among devices {devices} after {waited:.1f} s; "
                f"the slots are flock'ed files in lock dir {lock_dir} (held by running jobs)"
            )
        if not logged_wait:
            logger.info(
                "waiting for %d free GPU slot(s) among %s (lock dir %s)", count, devices, lock_dir
            )
            logged_wait = True
        time.sleep(min(poll_s, max(timeout_s - waited, 0.0)))


def _logical_index(device_id: str) -> int:
    """Index of a physical id among the devices this (already initialised) process sees."""
    current = visible_devices(cuda_count=0) if CUDA_ENV in os.environ else []
    if device_id in current:
        return current.index(device_id)
    return int(device_id)


@contextlib.contextmanager
def _use_devices(ids: list[str]) -> Iterator[torch.device]:
    """Make ``ids`` the visible devices for the block and yield the first one."""
    if torch.cuda.is_initialized():
        index = _logical_index(ids[0])
        logger.warning(
            "CUDA already initialised; cannot narrow %s, using cuda:%d (physical id %s)",
            CUDA_ENV, index, ids[0],
        )
        yield torch.device("cuda", index)
        return
    previous = os.environ.get(CUDA_ENV)
    os.environ[CUDA_ENV] = ",".join(ids)
    try:
        yield torch.device("cuda", 0)
    finally:
        if previous is None:
            os.environ.pop(CUDA_ENV, None)
        else:
            os.environ[CUDA_ENV] = previous


@contextlib.contextmanager
def _locked_devices(
    devices: list[str], count: int, lock_dir: Path, timeout_s: float, poll_s: float
) -> Iterator[torch.device]:
    """Hold ``count`` flock'ed slots of ``devices`` for the block."""
    slots = _wait_for_slots(devices, count, lock_dir, timeout_s, poll_s)
    ids = [device_id for device_id, _ in slots]
    try:
        logger.info("took GPU slot(s) %s (lock dir %s)", ids, lock_dir)
        with _use_devices(ids) as device:
            yield device
    finally:
        _release(slots)
        logger.info("released GPU slot(s) %s", ids)


def _check_args(count: int, timeout_s: float, poll_s: float) -> None:
    if count < 0 or poll_s <= 0 or timeout_s < 0:
        raise ValueError(
            f"need count >= 0, poll_s > 0, timeout_s >= 0; got {count}, {poll_s}, {timeout_s}"
        )


@contextlib.contextmanager
def acquire_devices(
    count: int = 1,
    lock_dir: str | Path | None = None,
    devices: list[str] | None = None,
    timeout_s: float = 24 * 3600,
    poll_s: float = 2.0,
) -> Iterator[torch.device]:
    """Hold ``count`` GPUs for the ``with`` block and yield the torch device to use.

    ``devices`` defaults to :func:`visible_devices`; with none (no CUDA) or ``count == 0``
    it yields ``cpu``. A SLURM job given exactly ``count`` devices uses them without locks.
    Otherwise free slots are flock'ed in ``lock_dir`` (default :func:`default_lock_dir`,
    plus ``slurm-<jobid>/`` under SLURM), polling every ``poll_s`` s; ``TimeoutError``
    after ``timeout_s``. The taken ids go into ``CUDA_VISIBLE_DEVICES`` (restored on exit)
    and ``cuda:0`` is yielded, so children (torchrun) see only them. This needs CUDA not yet
    initialised in this process (call it first); if it is, the variable is left alone and
    the index of the first taken device among the visible ones is yielded instead.
    """
    _check_args(count, timeout_s, poll_s)
    if devices is None and count > 0 and not torch.cuda.is_available():
        if os.environ.get(CUDA_ENV):  # e.g. a scheduler's GPU allocation on a machine without a driver
            logger.warning("%s=%s but CUDA is not available: running on CPU", CUDA_ENV, os.environ[CUDA_ENV])
        devices = []
    devices = visible_devices() if devices is None else list(devices)
    if not devices or count == 0:
        logger.info("no CUDA device; running on CPU")
        yield torch.device("cpu")
        return
    if count > len(devices):
        raise ValueError(f"asked for {count} GPU(s) but only {len(devices)} visible: {devices}")
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job and count == len(devices):
        logger.info("SLURM job %s: using its GPU(s) %s without slot locks", slurm_job, devices)
        with _use_devices(devices) as device:
            yield device
        return
    directory = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    if slurm_job:  # several jobs share one allocation; its device ids are job-relative
        directory = directory / f"slurm-{slurm_job}"
    with _locked_devices(devices, count, directory, timeout_s, poll_s) as device:
        yield device
