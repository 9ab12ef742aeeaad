"""The checks of ``device_check.py``, one function each, returning a :class:`CheckResult`.

A separate module (not the script) because the DDP worker must be importable
by name in the child processes that :func:`bismap.training.processes.launch`
starts (which is also why the benchmarks that pull in scikit-learn are imported
inside the checks that use them). Each check runs the library's own code path: ``train_step`` of the
supervised stages (AMP, GradScaler), ``wrap_model`` (SyncBatchNorm + DDP),
``assign_maps`` (Eq. 6 scoring), :mod:`bismap.stm.clustering` (FAISS K-Means and
the Eq. 7 search).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from bismap.labels.strategies import assign_maps
from bismap.models import ModelSettings, build_model
from bismap.stm.clustering import PrototypeSearch, faiss_gpu_support, kmeans, kmeans_on_gpu, search_backend
from bismap.training.distributed import DistributedContext, launch, rank_slice, wrap_model
from bismap.training.optim import OptimizerSettings, make_optimizer
from bismap.training.supervised import train_step

MB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class CheckResult:
    check: str
    device: str
    status: str  # "ok", "skipped" or "FAILED"
    figure: str = ""  # throughput or the measured quantity
    peak_gpu_mb: float | None = None  # torch's peak CUDA allocation during the check
    note: str = ""  # the reason for a skip or a failure, or what the figure means


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def random_batch(batch: int, size: tuple[int, int], classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A segmentation batch on ``device``: images (B, 3, H, W), labels (B, H, W) with some ignore pixels."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (batch, *size), generator=generator)
    labels[:, : size[0] // 8] = 255
    return {"image": torch.randn(batch, 3, *size, generator=generator).to(device), "label": labels.to(device)}


def _train_steps(context: DistributedContext, settings: ModelSettings, classes: int, batch: int,
                 size: tuple[int, int], steps: int) -> dict[str, float]:
    """``steps`` timed SGD steps (after one warm-up) of the supervised stages' AMP step on ``context``."""
    torch.manual_seed(0)
    model = build_model(settings, classes).to(context.device)
    optimizer = make_optimizer(model, OptimizerSettings())
    network = wrap_model(model, context)  # SyncBN + DDP with several processes
    network.train()
    use_amp = context.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    global_batch = random_batch(batch, size, classes, context.device)
    local = {key: rank_slice(value, context) for key, value in global_batch.items()}  # this process's slice
    train_step(network, local, optimizer, scaler, context, use_amp)  # warm-up: cuDNN plans, allocator
    reset_peak(context.device)
    seconds, losses = timed(lambda: [train_step(network, local, optimizer, scaler, context, use_amp)
                                     for _ in range(steps)], context.device)
    return {"seconds": seconds, "images_per_second": steps * batch / seconds, "loss": float(losses[-1]),
            "peak_mb": peak_mb(context.device) or 0.0, "amp": float(use_amp)}


def ddp_worker(context: DistributedContext, settings: ModelSettings, classes: int, batch: int,
               size: tuple[int, int], steps: int) -> dict[str, float]:
    """Run in each DDP process; rank 0's figures come back to the launcher."""
    return _train_steps(context, settings, classes, batch, size, steps)


def amp_training_step(device: torch.device, settings: ModelSettings, classes: int, batch: int,
                      size: tuple[int, int], steps: int) -> CheckResult:
    """Forward/backward/SGD step of the model with AMP (float16 autocast + GradScaler) on one GPU."""
    figures = _train_steps(DistributedContext(0, 1, device), settings, classes, batch, size, steps)
    name = f"ResNet-{settings.backbone_depth} DeepLabV3+ fwd/bwd, AMP"
    return CheckResult(name, str(device), "ok", f"{figures['images_per_second']:.1f} img/s",
                       figures["peak_mb"], f"batch {batch} at {size[0]}x{size[1]}, {steps} steps, "
                       f"{1000 * figures['seconds'] / steps:.0f} ms/step, loss {figures['loss']:.3f}")


def ddp_step(settings: ModelSettings, classes: int, batch: int, size: tuple[int, int], steps: int) -> CheckResult:
    """2-process DDP (SyncBatchNorm): NCCL on two GPUs, else gloo with both processes on the one GPU."""
    two_gpus = torch.cuda.device_count() >= 2
    devices = [torch.device("cuda", 0), torch.device("cuda", 1 if two_gpus else 0)]
    backend = "nccl" if two_gpus else "gloo"
    figures = launch(ddp_worker, devices, settings, classes, batch, size, steps, backend=backend)
    return CheckResult(f"DDP step, 2 processes, {backend}", ", ".join(map(str, devices)), "ok",
                       f"{figures['images_per_second']:.1f} img/s", figures["peak_mb"],
                       f"global batch {batch} at {size[0]}x{size[1]}, {steps} steps, rank 0's peak"
                       + ("" if two_gpus else "; one GPU: gloo (NCCL needs one GPU per process)"))


def gmm_scoring(device: torch.device, pixels: int, classes: int, components: int, dim: int,
                checked: int = 20_000) -> CheckResult:
    """Eq. 6 (assign_maps, float32, chunks of 65,536) on ``device``; labels checked against float64 on the CPU."""
    from gmm_benchmark import random_prototypes, sample_pixels  # scikit-learn: not in the DDP processes

    rng = np.random.default_rng(0)
    prototypes = random_prototypes(rng, classes, components, dim)
    features = torch.from_numpy(sample_pixels(rng, prototypes, pixels)).float()  # (N, D)
    thresholds = torch.full((classes,), -torch.inf, dtype=torch.float64)  # every pixel labelled
    on_device = features.to(device)
    assign_maps(on_device[:1024], prototypes, thresholds)  # stacked parameters built once, kernels loaded
    reset_peak(device)
    seconds, (labels, _) = timed(lambda: assign_maps(on_device, prototypes, thresholds), device)
    reference, _ = assign_maps(features[:checked].double(), prototypes, thresholds, torch.float64)  # (n,)
    agreement = float((labels[:checked].cpu() == reference).double().mean())
    status = "ok" if agreement >= 0.999 else "FAILED"
    return CheckResult(f"GMM scoring {classes}x{components}x{dim} diag", str(device), status,
                       f"{pixels / seconds / 1e6:.1f} Mpx/s", peak_mb(device),
                       f"{pixels:,} px; labels = float64 CPU labels on {agreement:.4%} of {checked:,}")


def faiss_kmeans(device: torch.device, rows: int, dim: int, clusters: int, iterations: int) -> CheckResult:
    """FAISS K-Means as the target_prototypes rule runs it on ``device`` (GPU only with a GPU build of faiss)."""
    from kmeans_benchmark import synthetic_embeddings  # scikit-learn: not in the DDP processes

    embeddings = synthetic_embeddings(rows, dim, 2 * clusters, seed=0)  # (N, D)
    on_gpu = kmeans_on_gpu(device, faiss_gpu_support())
    reset_peak(device)
    seconds, centroids = timed(lambda: kmeans(embeddings, clusters, 0, iterations, device=device), device)
    finite = bool(np.isfinite(centroids).all()) and centroids.shape == (clusters, dim)
    where = str(device) if on_gpu else "cpu"
    note = f"{rows:,} x {dim}, J = {clusters}, {iterations} iterations"
    if device.type == "cuda" and not on_gpu:
        where, note = "cpu (fallback)", note + "; faiss has no GPU support here (faiss-cpu): ran on the CPU"
    return CheckResult("FAISS K-Means (target prototypes)", where, "ok" if finite else "FAILED",
                       f"{seconds:.2f} s", None, note)


def prototype_search(device: torch.device, rows: int, dim: int, clusters: int, checked: int = 4096) -> CheckResult:
    """Eq. 7 search with the backend the rules pick for ``device``; argmin and distances checked vs faiss-cpu."""
    generator = torch.Generator(device=device).manual_seed(0)
    embeddings = torch.randn(rows, dim, device=device, generator=generator)  # (N, D)
    centroids = torch.randn(clusters, dim, generator=torch.Generator().manual_seed(1)).numpy()  # (J, D)
    search = PrototypeSearch(centroids, device, chunk_rows=16_384)
    search.search(embeddings[:1024])  # warm-up
    reset_peak(device)
    seconds, (distances, indices) = timed(lambda: search.search(embeddings), device)
    reference_distances, reference_indices = PrototypeSearch(centroids, "cpu").search(embeddings[:checked].cpu())
    agreement = float((indices[:checked] == reference_indices).mean())
    difference = float(np.abs(distances[:checked] - reference_distances).max())
    ok = agreement >= 0.999 and difference <= 1e-4 * float(reference_distances.max())
    return CheckResult(f"nearest prototype (Eq. 7), {search.backend}", str(device), "ok" if ok else "FAILED",
                       f"{rows / seconds / 1e6:.2f} Mrows/s", peak_mb(device),
                       f"{rows:,} x {dim}, J = {clusters}; vs faiss-cpu: argmin equal on {agreement:.4%}, "
                       f"max abs distance difference {difference:.1e}")


def backend_summary(device: torch.device) -> str:
    """Which FAISS paths a job on ``device`` takes (no log line: decided from the build alone)."""
    support = faiss_gpu_support()
    kmeans_where = "GPU" if device.type == "cuda" and support else "CPU"
    return f"K-Means on the {kmeans_where}, search by {search_backend(device, support)}"
