"""How much of the machine other work took while a run trained.

A time measured while other processes share the cores (or the GPU) is not this configuration's
time: on a 2-core CPU the same run took 69.5 s alone and 126 s beside another. So the training
loop notes, for its own span, the CPU time every process on the machine used (``/proc/stat``)
minus this run's own (this process, and on several ranks the sibling ranks started by the same
torchrun), as a share of the machine's capacity; the 1-minute load average at the end; and on
CUDA the other processes on the device. The report judges a time claim only on runs whose share
is under ``QUIET_SHARE`` (docs/record.md, docs/studies.md).
"""
from __future__ import annotations

import os
import time

import torch

QUIET_SHARE = 0.10  # others' CPU time under 10% of the machine's capacity: a run "alone"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (all cores; idle and iowait
    excluded), or None where /proc/stat is not there (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]]
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (total - idle) / _TICK


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / _TICK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return 0.0


def own_cpu_s() -> float:
    """CPU seconds of this run: this process (all its threads) and, when torchrun started it as
    one of several local ranks, its sibling ranks."""
    t = os.times()
    own = t.user + t.system
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        parent = os.getppid()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                siblings = [int(p) for p in f.read().split() if int(p) != os.getpid()]
        except (OSError, ValueError):
            siblings = []
        own += sum(_proc_cpu_s(p) for p in siblings)
    return own


def other_gpu_processes(device: torch.device) -> int | None:
    """Processes other than this run's on the CUDA device (NVML, where pynvml is installed)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml  # optional: torch.cuda.list_gpu_processes needs it too
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        mine = {os.getpid(), os.getppid()}
        return sum(1 for p in procs if p.pid not in mine)
    except Exception:  # NVML missing or refused (containers): unknown, not zero
        return None


class Watch:
    """Started where the training loop starts its clock, read where it stops it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_s()
        self.own0 = own_cpu_s()
        self.gpu_others = other_gpu_processes(device)

    def read(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy = machine_busy_s()
        out: dict = {}
        if busy is not None and self.busy0 is not None and wall > 0:
            others = max(0.0, (busy - self.busy0) - (own_cpu_s() - self.own0))
            out["contention/others_cpu_s"] = others
            out["contention/others_share"] = others / (wall * (os.cpu_count() or 1))
        if hasattr(os, "getloadavg"):
            out["contention/load_1m"] = os.getloadavg()[0]
        out["contention/cpus"] = os.cpu_count() or 1
        end = other_gpu_processes(self.device)
        if end is not None or self.gpu_others is not None:
            out["contention/gpu_other_processes"] = max(end or 0, self.gpu_others or 0)
        return out


def quiet(metrics: dict) -> bool | None:
    """Did this run train alone? None when its record does not say (older records)."""
    share = metrics.get("contention/others_share")
    if share is None:
        return None
    return share < QUIET_SHARE and not metrics.get("contention/gpu_other_processes")
