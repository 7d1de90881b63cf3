"""Step checkpoints: everything a run needs to continue as if it had never stopped.

<run folder>/checkpoints/step-00000030/
    trainable.safetensors   the trainable weights (LoRA adapter, or the full/partial weights), by name
    state.pt                optimizer, scheduler and GradScaler states, every RNG state (python, numpy,
                            torch CPU and CUDA), the data position (epoch, micro-batches done in it),
                            the step, the unlogged loss window, counters, elapsed train time, memory peaks
    manifest.json           written last: each file's size. A folder without it, or whose files do not
                            have those sizes, is torn and never loaded (the previous one is used).
A run sharded with FSDP (train.strategy=fsdp) writes ``sharded/`` instead of the weights and the
optimizer states: torch.distributed.checkpoint's folder, one file per rank and its ``.metadata``,
each rank writing its own shards (no rank ever holds the whole model); state.pt keeps the rest.

A checkpoint is written into a temporary folder, each file fsynced, then renamed into place; the
newest ``keep`` are kept. ``state.pt`` holds only tensors and plain Python values and is read with
``weights_only=True``, so a checkpoint folder cannot run code.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("lorasweep")

FOLDER = "checkpoints"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
SHARDED = "sharded"


@dataclass
class Progress:
    """Where the loop is: what a resumed loop needs beyond the model and optimizer."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on
    tokens: int = 0
    loss_tokens: int = 0
    micro_batches: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    window: list = field(default_factory=list)  # [(token-mean loss, loss tokens)] since the last log line
    train_s: float = 0.0  # training time of all segments up to this step (after_step hooks excluded)
    hook_s: float = 0.0  # time in after_step hooks (train.eval_every's validation curve), all segments
    mem: dict = field(default_factory=dict)  # peak memory of the segments up to this step


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(_tuples(state["python"]))
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate wants the tuples it gave; a round trip may hand back lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Checkpointer:
    def __init__(self, run_dir: Path, every: int, keep: int, guard: Callable[[], None] | None = None):
        """``guard``: called before each write; raises where this process may no longer write the
        run folder (its lease was taken over)."""
        self.dir = Path(run_dir) / FOLDER
        self.every = every
        self.keep = max(1, keep)
        self.guard = guard

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, model: torch.nn.Module, opt, sched, scaler, progress: Progress, extra: dict | None = None) -> Path:
        """Write step ``progress.step``'s checkpoint atomically; returns its folder. ``extra``: more
        entries for state.pt (a run on several processes adds every rank's RNG state, ``rng_ranks``)."""
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        tmp = self.begin(progress.step)
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        self.write_state(tmp, sched, scaler, progress, {"optimizer": opt.state_dict(), **(extra or {})})
        final = self.commit(tmp, progress.step)
        log.info("checkpoint at step %d (%.2f s): %s", progress.step, time.perf_counter() - t0, final)
        return final

    def begin(self, step: int, tag: str | None = None) -> Path:
        """An empty temporary folder for step ``step``'s checkpoint (``tag``: a name every rank of a
        sharded run agrees on; by default this process's id)."""
        if self.guard is not None:
            self.guard()
        tmp = self.tmp_folder(step, tag)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def folder(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def tmp_folder(self, step: int, tag: str | None = None) -> Path:
        return self.dir / f".tmp-{self.folder(step).name}-{tag or os.getpid()}"

    @staticmethod
    def write_state(tmp: Path, sched, scaler, progress: Progress, extra: dict) -> None:
        torch.save({"scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                    "progress": asdict(progress), **extra}, tmp / STATE)

    def commit(self, tmp: Path, step: int) -> Path:
        """The manifest (every file's size) written last, everything fsynced, then the folder renamed
        into place and all but the newest ``keep`` checkpoints removed."""
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "sizes": sizes}))
        for p in [*files, tmp / MANIFEST]:
            _fsync(p)
        final = self.folder(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.dir)
        for old in self.list()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list(self) -> list[Path]:
        """Checkpoint folders, oldest first (torn ones included: see load_latest)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def load_latest(self) -> tuple[dict[str, torch.Tensor] | None, dict] | None:
        """(trainable weights, state) of the newest checkpoint that reads back whole, or None. A
        sharded (fsdp) checkpoint gives weights None and ``state["sharded"]``: its folder, which the
        ranks read together (shard.Shard.load_sharded)."""
        from safetensors.torch import load_file

        for folder in reversed(self.list()):
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
                for name, size in manifest["sizes"].items():
                    if (folder / name).stat().st_size != size:
                        raise ValueError(f"{name} has {(folder / name).stat().st_size} bytes, "
                                         f"the manifest says {size}")
                state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
                if any(name.startswith(SHARDED + "/") for name in manifest["sizes"]):
                    return None, {**state, "sharded": str(folder / SHARDED)}
                return load_file(str(folder / WEIGHTS)), state
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous
                log.warning("checkpoint %s is torn or unreadable (%s); trying the previous one", folder, e)
        return None

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)
