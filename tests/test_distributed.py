"""Multi-process training (DDP) on the CPU with gloo: N processes train like one process on the same global batch.

Tolerance. With the same global batch, synchronised BatchNorm and the loss
divided by the global count of valid pixels, two processes compute the same
function as one; in float64 the gradients agree to ~1e-14 (test below). In
float32 only the order of summation differs (per-rank partial sums, then an
all-reduce), ~1e-7 relative per operation. Training amplifies such rounding:
at the learning rate of tests/test_training.py (0.01, head x10) a random thin
net moves so fast that the two runs drift apart to ~1e-3 by iteration 5 (and a
1-process run with another thread count drifts the same way), so the end-to-end
comparisons use a 10x smaller learning rate, where the observed difference
stays below 1e-6, and assert ``LOSS_RTOL = 1e-4`` relative per iteration.
ASPP dropout is off: dropout masks are drawn per process (equal in
distribution, not bit for bit).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from bismap.data.digit_scenes import DigitScenesSettings, generate_split
from bismap.data.index import index_dataset
from bismap.data.loading import AugmentSettings, ResumableBatchSampler
from bismap.devices import acquire_devices
from bismap.training import supervised
from bismap.training.checkpoint import load_model
from bismap.training.distributed import (DistributedContext, RankSliceBatchSampler, global_mean_loss, launch,
                                         local_batch_size, process_devices, rank_slice)
from bismap.training.optim import OptimizerSettings
from bismap.training.supervised import RunPaths, TrainSettings, train_supervised
from tests import distributed_workers
from tests.conftest import dies_on_call
from tests.test_training import CLASSES, MODEL as TRAINING_MODEL

MODEL = dataclasses.replace(TRAINING_MODEL, aspp_dropout=0.0)  # dropout masks are drawn per process
LOSS_RTOL = 1e-4  # relative, per iteration; see the module docstring
WEIGHT_ATOL = 1e-4  # largest absolute difference of any weight after 4 iterations
ITERATIONS = 4
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # and so one thread per child process


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    settings = DigitScenesSettings(image_size=32, digit_size=(12, 16), digits_per_image=(1, 2))
    generate_split(folder / "source", "source", count=16, seed=5, settings=settings)
    index_dataset("digit_scenes", folder / "source", "", 11, True, folder / "source.json")
    return folder / "source.json"


def settings(batch_size: int = 4) -> TrainSettings:
    return TrainSettings(iterations=ITERATIONS, batch_size=batch_size, seed=7, log_interval=1, checkpoint_interval=2,
                         optimizer=OptimizerSettings(learning_rate=0.001, head_lr_multiplier=10.0),
                         augment=AugmentSettings(crop_size=(32, 32), scale_range=(0.8, 1.2), horizontal_flip=False))


def paths(folder: Path, state: Path | None = None) -> RunPaths:
    return RunPaths(folder / "model.pt", folder / "loss.tsv", state or folder / "state" / "model.pt")


def train(manifest: Path, run_paths: RunPaths, world_size: int) -> None:
    train_supervised(manifest, run_paths, settings(), MODEL, CLASSES, CPU, run_settings={"test": "ddp"},
                     world_size=world_size)


def losses(folder: Path) -> list[float]:
    rows = (folder / "loss.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == list(range(1, ITERATIONS + 1))
    return [float(row.split("\t")[1]) for row in rows]


def assert_same_training(reference: Path, other: Path) -> None:
    expected, got = losses(reference), losses(other)
    print("losses 1 process :", expected)
    print("losses compared  :", got)
    print("max relative difference:", max(abs(a - b) / abs(a) for a, b in zip(expected, got)))
    assert got == pytest.approx(expected, rel=LOSS_RTOL)
    weights, checkpoint = load_model(other / "model.pt")  # a checkpoint of N processes loads in one
    assert checkpoint["step"] == ITERATIONS
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    reference_weights = load_model(reference / "model.pt")[0].state_dict()
    for key, value in weights.state_dict().items():
        assert torch.allclose(value.double(), reference_weights[key].double(), rtol=0, atol=WEIGHT_ATOL), key


@pytest.fixture(scope="module")
def one_process(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("one_process")
    train(manifest, paths(folder), world_size=1)
    return folder


def test_two_processes_train_like_one(manifest, one_process, tmp_path):
    train(manifest, paths(tmp_path), world_size=2)
    assert_same_training(one_process, tmp_path)
    assert not (tmp_path / "state" / "model.pt").exists()


def test_one_process_state_resumes_in_two(manifest, one_process, tmp_path, monkeypatch):
    original_step = supervised.train_step
    # killed during iteration 4, after the state saved at iteration 2
    monkeypatch.setattr(supervised, "train_step", dies_on_call(original_step, 4))
    with pytest.raises(KeyboardInterrupt):
        train(manifest, paths(tmp_path), world_size=1)
    monkeypatch.setattr(supervised, "train_step", original_step)
    train(manifest, paths(tmp_path), world_size=2)
    assert_same_training(one_process, tmp_path)


def test_two_process_state_resumes_in_one(manifest, one_process, tmp_path):
    state = tmp_path / "state" / "model.pt"
    (tmp_path / "failed" / "loss.tsv").mkdir(parents=True)  # rank 0 fails writing it, after all iterations
    with pytest.raises(RuntimeError, match=r"rank 0 \(exit status 1\)"):
        train(manifest, paths(tmp_path / "failed", state), world_size=2)
    saved = torch.load(state, weights_only=False)
    assert saved["iteration"] == 2 and len(saved["rank_rng"]) == 2
    assert not any(key.startswith("module.") for key in saved["model"])
    train(manifest, paths(tmp_path, state), world_size=1)
    assert_same_training(one_process, tmp_path)


def test_batch_size_not_divisible_by_world_size_fails_naming_both(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size 4 .*world_size, one per GPU\) 3"):
        train_supervised(manifest, paths(tmp_path), settings(batch_size=4), MODEL, CLASSES, CPU, world_size=3)
    assert not tmp_path.joinpath("model.pt").exists()
    with pytest.raises(ValueError, match=r"batch_size 6 .* 4"):
        rank_slice(list(range(6)), DistributedContext(rank=1, world_size=4))
    assert local_batch_size(8, 4) == 2


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_are_contiguous_and_cover_the_global_batch(world_size):
    global_batches = list(ResumableBatchSampler(10, 4, seed=3, iterations=5, start_iteration=1))
    per_rank = [list(RankSliceBatchSampler(ResumableBatchSampler(10, 4, seed=3, iterations=5, start_iteration=1),
                                           DistributedContext(rank, world_size))) for rank in range(world_size)]
    for iteration, batch in enumerate(global_batches):
        assert [item for rank in range(world_size) for item in per_rank[rank][iteration]] == batch


def test_two_process_gradient_is_the_global_batch_gradient():
    """Relative differences of loss and gradients, absolute of BN running statistics, after one step."""
    differences = launch(distributed_workers.gradient_differences, process_devices(CPU, 2), MODEL, len(CLASSES),
                         [torch.float64, torch.float32])
    print("2 processes vs 1 on the same global batch:", differences)
    assert max(differences["torch.float64"].values()) < 1e-12  # the same function, exactly
    assert max(differences["torch.float32"].values()) < LOSS_RTOL  # rounding only
    assert global_mean_loss(torch.tensor(6.0), torch.tensor(3), DistributedContext()) == 2.0


def test_a_failing_rank_stops_the_others():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"1 of 2 training processes failed: rank 1 \(exit status 1\)"):
        launch(distributed_workers.fail_on_rank_one, [CPU, CPU])  # rank 0 would sleep for 600 s
    assert time.monotonic() - started < 60


def test_process_devices(caplog):
    assert process_devices(torch.device("cuda", 0), 3) == [torch.device("cuda", i) for i in range(3)]
    assert process_devices(CPU, 1) == [CPU]
    with caplog.at_level(logging.WARNING):
        assert process_devices(CPU, 2) == [CPU, CPU]
    assert "2 CPU processes with gloo" in caplog.text
    with pytest.raises(ValueError):
        process_devices(CPU, 0)


def _two_gpu_job(lock_dir: str, barrier_, results) -> None:
    barrier_.wait()
    with acquire_devices(2, lock_dir=lock_dir, devices=["0", "1", "2", "3"], timeout_s=10, poll_s=0.05) as device:
        results.put((os.environ["CUDA_VISIBLE_DEVICES"], [str(d) for d in process_devices(device, 2)]))
        time.sleep(0.5)  # hold the slots while the other job takes its own


def test_concurrent_two_gpu_jobs_get_distinct_device_slots(tmp_path):
    context = multiprocessing.get_context("fork")  # the parent never initialises CUDA
    barrier_, results = context.Barrier(2), context.Queue()
    jobs = [context.Process(target=_two_gpu_job, args=(str(tmp_path), barrier_, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    got = [results.get(timeout=20) for _ in jobs]
    for job in jobs:
        job.join(timeout=10)
        assert job.exitcode == 0
    print("two concurrent gpu=2 jobs on 4 GPUs:", got)
    slots = [set(visible.split(",")) for visible, _ in got]
    assert all(len(job_slots) == 2 for job_slots in slots)
    assert slots[0].isdisjoint(slots[1]) and slots[0] | slots[1] == {"0", "1", "2", "3"}
    assert all(ranks == ["cuda:0", "cuda:1"] for _, ranks in got)  # rank r -> r-th of the job's own GPUs


def test_ddp_buffer_sync_switch_follows_the_installed_torch():
    from bismap.training.distributed import _no_forward_buffer_sync

    class OlderDDP:  # torch < 2.14: only broadcast_buffers
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    class NewerDDP:  # torch >= 2.14: forward_sync_buffers (broadcast_buffers deprecated)
        def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None):
            pass

    assert _no_forward_buffer_sync(OlderDDP) == {"broadcast_buffers": False}
    assert _no_forward_buffer_sync(NewerDDP) == {"forward_sync_buffers": False}
    from packaging.version import Version

    newer = Version(torch.__version__.split("+")[0]) >= Version("2.14")
    assert _no_forward_buffer_sync() == ({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False})
