"""Peak memory of one run, never inherited from an earlier run in the same process.

CPU: the kernel's resident high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs;
where that is not allowed, a background sampler. CUDA: torch's allocator peaks, reset per phase.
"""
from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import torch

GB = 1e9  # decimal GB, as the articles report


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _page_size()


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Give freed memory back to the OS so the next run starts from what is really live."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakTracker:
    """Tracks peaks per named phase (load, train, eval) and over the whole run."""

    def __init__(self, device: torch.device, sample_every_s: float = 0.05):
        self.device = device
        self.phases: dict[str, dict[str, float]] = {}
        self._phase: str | None = None
        self._use_hwm = _hwm_bytes() is not None and _reset_hwm()
        self._sampled = 0
        self._stop = threading.Event()
        self._thread = None
        if not self._use_hwm:
            self._thread = threading.Thread(target=self._sample, args=(sample_every_s,), daemon=True)
            self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self._sampled = max(self._sampled, rss_bytes())

    def _reset(self) -> None:
        if self._use_hwm:
            _reset_hwm()
        self._sampled = rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _read(self) -> dict[str, float]:
        rss = max(_hwm_bytes() or 0, self._sampled, rss_bytes()) if self._use_hwm else max(self._sampled, rss_bytes())
        out = {"peak_rss_gb": rss / GB}
        if self.device.type == "cuda":
            out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / GB
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / GB
        return out

    def start(self, phase: str) -> None:
        """Close the current phase and open another; the first call also resets the process peak."""
        self.stop()
        self._phase = phase
        self._reset()

    def stop(self) -> None:
        if self._phase is not None:
            self.phases[self._phase] = self._read()
            self._phase = None

    def current(self) -> dict[str, float]:
        """Live figures for step logs (cheap: no device sync on CPU)."""
        out = {"rss_gb": rss_bytes() / GB}
        if self.device.type == "cuda":
            out["allocated_gb"] = torch.cuda.memory_allocated(self.device) / GB
        return out

    def close(self) -> None:
        self.stop()
        self._stop.set()

    def snapshot(self) -> dict[str, float]:
        """mem/peak_* so far, the open phase included (what a checkpoint carries to the next segment)."""
        phases = dict(self.phases)
        if self._phase is not None:
            phases[self._phase] = self._read()
        return {f"mem/{k}": max(p[k] for p in phases.values() if k in p)
                for k in ("peak_rss_gb", "peak_allocated_gb", "peak_reserved_gb")
                if any(k in p for p in phases.values())}

    def metrics(self) -> dict[str, float]:
        """mem/<phase>_peak_* per phase, and mem/peak_* over the whole run."""
        out: dict[str, float] = {}
        for phase, vals in self.phases.items():
            for k, v in vals.items():
                out[f"mem/{phase}_{k}"] = v
        for k in ("peak_rss_gb", "peak_allocated_gb", "peak_reserved_gb"):
            vals = [p[k] for p in self.phases.values() if k in p]
            if vals:
                out[f"mem/{k}"] = max(vals)
        return out


def with_earlier_segments(now: dict, earlier: dict) -> dict:
    """A resumed run's mem/peak_* are the max over its segments; mem/peak_segment says which
    (0 = the segments before the resume, 1 = this one)."""
    out = dict(now)
    for k, v in earlier.items():
        if v > out.get(k, 0.0):
            out[k] = v
    if earlier:
        out["mem/peak_segment"] = int(now.get("mem/peak_rss_gb", 0.0) >= earlier.get("mem/peak_rss_gb", 0.0))
    return out
