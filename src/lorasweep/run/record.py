"""The per-run record under <results_dir>/<study>/<run_id>/, written atomically.

record.json  {run_id, study, status, error, config, metrics, env, ...}
steps.jsonl  one line per logged step
config.yaml  the resolved config
"""
from __future__ import annotations

import logging
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("lorasweep")

RECORD = "record.json"
STATUSES = ("running", "completed", "failed", "skipped", "interrupted", "pruned")


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are meant to be read by others
    os.replace(tmp, path)


def read_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        **{p: _version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "lm_eval", "hydra-core", "wandb", "datasets")},
        "lorasweep": _version("lorasweep"),
        "git_commit": _git_commit(),
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if os.environ.get("SLURM_JOB_ID"):
        env["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            env["slurm_array"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return env


def _whole_lines(path: Path, lines: list[str]) -> list[str]:
    """The lines of a JSON-lines file that parse; a line torn by a crash mid-write (a node lost,
    a full disk) is dropped with a warning instead of making the run unresumable."""
    whole = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            log.warning("%s line %d is torn (%r); dropped, its step is redone", path, i, line[:60])
            continue
        whole.append(line)
    return whole


class RunRecord:
    """Owns one run folder: its record.json status and steps.jsonl."""

    def __init__(self, run_dir: Path, run_id: str, study: str, config: dict):
        self.dir = Path(run_dir)
        self.data = {"run_id": run_id, "study": study, "status": "running", "error": None,
                     "config": config, "metrics": {}, "env": {}, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "finished_at": None}
        self._steps = None

    def start(self, config_yaml: str) -> None:
        """Begin afresh: leftovers of a killed or failed attempt are removed first (all but the
        lease this launch holds, see lease.py)."""
        from .lease import LEASE

        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.iterdir():
            if p.name == LEASE or p.name.startswith(f".{LEASE}."):  # the lease and its heartbeat writes
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        (self.dir / "config.yaml").write_text(config_yaml)
        self.data["env"] = environment()
        self.save()
        # Line-buffered: a step line reaches the disk without an explicit flush per step.
        self._steps = open(self.dir / "steps.jsonl", "w", buffering=1)

    def resume(self, from_step: int) -> None:
        """Continue a checkpointed attempt: keep its folder and record (start time, W&B id), and
        its step lines up to the checkpoint's step (later ones are redone)."""
        prev = read_record(self.dir) or {}
        for k in ("started_at", "wandb_id", "segments"):
            if k in prev:
                self.data[k] = prev[k]
        self.data["resumed_from_step"] = from_step
        self.data["env"] = environment()
        self.save()
        steps = self.dir / "steps.jsonl"
        lines = steps.read_text().splitlines() if steps.exists() else []
        kept = [l for l in _whole_lines(steps, lines) if json.loads(l).get("step", 0) <= from_step]
        steps.write_text("".join(l + "\n" for l in kept))
        self._steps = open(steps, "a", buffering=1)

    def log_step(self, step: int, metrics: dict) -> None:
        if self._steps is not None:
            self._steps.write(json.dumps({"step": step, **metrics}) + "\n")

    def save(self) -> None:
        write_json_atomic(self.dir / RECORD, self.data)

    def finish(self, status: str, metrics: dict, error: str | None = None, **extra) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        self.data.update(status=status, error=error, metrics=metrics,
                         finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra)
        self.save()
