"""Tests for the GPU device-slot allocator (fake device ids, no CUDA needed)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from bismap import devices as devmod
from bismap.devices import acquire_devices, visible_devices

HOLD_S = 1.0
POLL_S = 0.05

# fork: no pickling of the worker, no re-import of torch per child (fast). Fork is
# safe here because the parent never initialises CUDA.
CTX = multiprocessing.get_context("fork")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SLURM, no inherited CUDA_VISIBLE_DEVICES, no configured lock dir."""
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "BISMAP_GPU_LOCK_DIR"):
        monkeypatch.delenv(name, raising=False)


def _worker(lock_dir: str, fake: list[str], barrier, results) -> None:
    barrier.wait()
    start = time.monotonic()
    with acquire_devices(1, lock_dir=lock_dir, devices=fake, timeout_s=30, poll_s=POLL_S) as device:
        got = time.monotonic()
        visible = os.environ["CUDA_VISIBLE_DEVICES"]
        time.sleep(HOLD_S)
        released = time.monotonic()
    results.put((visible, str(device), got - start, got, released))


def _run_workers(n: int, fake: list[str], lock_dir: Path) -> list[tuple]:
    barrier = CTX.Barrier(n)
    results = CTX.Queue()
    args = (str(lock_dir), fake, barrier, results)
    procs = [CTX.Process(target=_worker, args=args) for _ in range(n)]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=20) for _ in range(n)]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    return out


def _assert_no_overlap(results: list[tuple]) -> None:
    """Two holders of the same device never held it at the same time."""
    by_device: dict[str, list[tuple[float, float]]] = {}
    for visible, _, _, got, released in results:
        by_device.setdefault(visible, []).append((got, released))
    for spans in by_device.values():
        spans.sort()
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            assert begin >= end


def test_four_processes_get_four_distinct_devices(tmp_path: Path) -> None:
    results = _run_workers(4, ["0", "1", "2", "3"], tmp_path / "locks")
    visibles = sorted(r[0] for r in results)
    assert visibles == ["0", "1", "2", "3"]
    assert {r[1] for r in results} == {"cuda:0"}
    assert max(r[2] for r in results) < HOLD_S / 2  # nobody had to wait
    # Every worker held its slot for the whole hold time, all at once.
    assert max(r[3] for r in results) < min(r[4] for r in results)


def test_third_process_waits_for_a_free_device(tmp_path: Path) -> None:
    t0 = time.monotonic()
    results = _run_workers(3, ["0", "1"], tmp_path / "locks")
    elapsed = time.monotonic() - t0
    waits = sorted(r[2] for r in results)
    assert waits[0] < HOLD_S / 2 and waits[1] < HOLD_S / 2
    assert waits[2] >= HOLD_S * 0.9
    visibles = sorted(r[0] for r in results)
    assert visibles in (["0", "0", "1"], ["0", "1", "1"])
    _assert_no_overlap(results)
    assert elapsed >= 2 * HOLD_S * 0.9


def test_timeout_names_lock_dir_and_devices(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    with acquire_devices(1, lock_dir=lock_dir, devices=["7"], poll_s=POLL_S):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            with acquire_devices(1, lock_dir=lock_dir, devices=["7"], timeout_s=0.3, poll_s=POLL_S):
                pytest.fail("slot 7 is held; must not be acquired twice")
        assert time.monotonic() - t0 >= 0.3
    message = str(info.value)
    assert str(lock_dir) in message
    assert "['7']" in message
    # Released after the outer block: taken again at once.
    with acquire_devices(1, lock_dir=lock_dir, devices=["7"], timeout_s=0.0) as device:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
        assert device == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2,3", ["2", "3"]),
        ("0,2", ["0", "2"]),
        ("", []),
        ("-1", []),
        (" 1 , 4 ", ["1", "4"]),
        ("1,-1,2", ["1"]),
    ],
)
def test_visible_devices_respects_env(value: str, expected: list[str]) -> None:
    assert visible_devices({"CUDA_VISIBLE_DEVICES": value}, cuda_count=8) == expected


def test_visible_devices_without_env_counts_cuda() -> None:
    assert visible_devices({}, cuda_count=3) == ["0", "1", "2"]
    assert visible_devices({}, cuda_count=0) == []


def test_no_devices_runs_on_cpu(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    with acquire_devices(1, lock_dir=lock_dir, devices=[]) as device:
        assert device == torch.device("cpu")
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with acquire_devices(0, lock_dir=lock_dir, devices=["0"]) as device:
        assert device == torch.device("cpu")
    assert not lock_dir.exists()


def test_two_devices_are_taken_together_and_env_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    lock_dir = tmp_path / "locks"
    with acquire_devices(2, lock_dir=lock_dir, devices=["4", "5", "6"], timeout_s=0.0) as device:
        first = os.environ["CUDA_VISIBLE_DEVICES"]
        assert first == "4,5"
        assert device == torch.device("cuda", 0)
        with acquire_devices(1, lock_dir=lock_dir, devices=["4", "5", "6"], timeout_s=0.0):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
        with pytest.raises(TimeoutError):  # only "6" is free: a pair cannot be taken
            with acquire_devices(2, lock_dir=lock_dir, devices=["4", "5", "6"], timeout_s=0.0):
                pass
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"
    assert sorted(p.name for p in lock_dir.iterdir()) == ["gpu-4.lock", "gpu-5.lock", "gpu-6.lock"]


def test_more_than_available_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"3 GPU\(s\) but only 2"):
        with acquire_devices(3, lock_dir=tmp_path, devices=["0", "1"]):
            pass


def test_slurm_job_uses_its_devices_without_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    lock_dir = tmp_path / "locks"
    with acquire_devices(2, lock_dir=lock_dir, devices=["3", "1"]) as device:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,1"
        assert device == torch.device("cuda", 0)
        # A second job of the same allocation is not blocked: no lock was taken.
        with acquire_devices(1, lock_dir=lock_dir, devices=["0"], timeout_s=0.0):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not lock_dir.exists()


def test_slurm_allocation_shared_by_jobs_locks_per_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock_dir = tmp_path / "locks"
    fake = ["0", "1", "2"]
    with acquire_devices(1, lock_dir=lock_dir, devices=fake, timeout_s=0.0):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        with acquire_devices(1, lock_dir=lock_dir, devices=fake, timeout_s=0.0):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert sorted(p.name for p in (lock_dir / "slurm-777").iterdir()) == [
        "gpu-0.lock",
        "gpu-1.lock",
    ]


def test_initialised_cuda_keeps_env_and_indexes_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    lock_dir = tmp_path / "locks"
    with acquire_devices(1, lock_dir=lock_dir, devices=["0", "1"], timeout_s=0.0) as first:
        with acquire_devices(1, lock_dir=lock_dir, devices=["0", "1"], timeout_s=0.0) as second:
            assert (first, second) == (torch.device("cuda", 0), torch.device("cuda", 1))
            assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    with acquire_devices(1, lock_dir=lock_dir, devices=["5"], timeout_s=0.0) as device:
        assert device == torch.device("cuda", 1)  # physical 5 is logical 1
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"


def test_default_lock_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert devmod.default_lock_dir().name == f"bismap-gpu-slots-{os.getuid()}"
    monkeypatch.setenv("BISMAP_GPU_LOCK_DIR", str(tmp_path / "x"))
    assert devmod.default_lock_dir() == tmp_path / "x"
    assert devmod.lock_path(tmp_path, "MIG-GPU-ab/1/0").name == "gpu-MIG-GPU-ab_1_0.lock"


def test_gpu_ids_without_a_working_cuda_run_on_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A scheduler may set CUDA_VISIBLE_DEVICES on a machine whose CUDA does not work (the SLURM test's fake GPUs)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with acquire_devices(1, lock_dir=tmp_path) as device:
        assert device == torch.device("cpu")
    assert not list(tmp_path.iterdir())  # no slot was locked


@pytest.mark.parametrize(("visible", "count"), [("", 0), ("0,1", 2), ("-1", 0), ("0,-1,2", 1), (" 1 , 2", 2)])
def test_local_cuda_devices_follow_cuda_visible_devices(visible, count, monkeypatch):
    """What the workflow counts at parse time, without torch: the ids before the first negative one."""
    from bismap.runtime import local_cuda_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_cuda_devices() == count
