"""Peak memory added by one stage of a program: host (resident set) and CUDA (torch's allocator).

Used by ``labelling_memory.py`` and ``device_check.py``::

    with PeakMemory(device) as peak:
        run_the_stage()
    print(peak.host_mb, peak.device_mb, peak.seconds)

Host: freed heap pages are handed back first (glibc ``malloc_trim``), so that
memory an earlier stage freed does not hide what this one needs; then the
kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``
and read at the end. Where that reset is not possible (not Linux, a sandbox),
a thread samples the resident set every millisecond instead (``method`` says
which). CUDA: ``torch.cuda.max_memory_allocated`` over the stage minus what was
allocated when it started.
"""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path
from types import TracebackType

import torch

MB = 1024 * 1024
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (VmRSS, VmHWM); None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> int:
    """The resident set of this process now, bytes (0 where unknown)."""
    value = _status_bytes("VmRSS")
    if value is not None:
        return value
    try:
        import psutil
    except ImportError:
        return 0
    return int(psutil.Process().memory_info().rss)


def release_free_heap() -> None:
    """glibc only: give freed heap pages back to the kernel (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current resident set; True if the kernel did."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    high, now = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return high is not None and now is not None and high <= now + 4 * MB


class PeakMemory:
    """Context manager: ``host_mb``, ``device_mb`` (None without CUDA) and ``seconds`` of its block."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.host_mb = self.device_mb = self.seconds = 0.0
        self.method = ""
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, resident_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._device_start = torch.cuda.memory_allocated(self.device)
        self._host_start = resident_bytes()
        self._sampled = self._host_start
        self.method = "VmHWM" if _reset_high_water_mark() else "sampled every 1 ms"
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_mb = (torch.cuda.max_memory_allocated(self.device) - self._device_start) / MB
        else:
            self.device_mb = None
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        peak = max(self._sampled, resident_bytes())
        if self.method == "VmHWM":
            peak = max(peak, _status_bytes("VmHWM") or 0)
        self.host_mb = (peak - self._host_start) / MB
