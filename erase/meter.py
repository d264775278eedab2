"""Wall time and peak memory of a block: CUDA peak allocated on GPU, peak resident set size on CPU."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own high-water mark (VmHWM) by writing 5 to clear_refs."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak: an upper bound


class Meter:
    """`with Meter(device) as m: ...` then `m.wall_time_s`, `m.peak_memory_bytes` and `m.memory_kind`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.wall_time_s = 0.0
        self.peak_memory_bytes = 0
        self.memory_kind = ""

    def __enter__(self) -> Meter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.memory_kind = "cuda_max_allocated"
        else:
            self.memory_kind = "peak_rss" if _reset_peak_rss() else "lifetime_peak_rss"
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_memory_bytes = _peak_rss_bytes()
        self.wall_time_s = time.perf_counter() - self._start
