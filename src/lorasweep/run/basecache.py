"""Reuse one loaded base model across the runs of a process (``train.reuse_base=true``).

A sweep under Hydra's basic launcher runs its jobs in one process; reloading the same base for
every run is pure overhead. When the next run asks for the same model, precision, device and
checkpointing, it gets the base that is already in memory. Only LoRA runs on unquantized bases
are eligible: they never write the base weights (full/partial runs do, and the 4-bit path prepares
the base in place). After each run the adapter is unloaded and the base weights are hashed; if a
single element differs from the fingerprint taken at load, the base is dropped and the next run loads afresh.

Peak memory stays per run: the reused base is resident when the run's peak counter is reset, as
it would be after a fresh load, so a run's peak still includes its base. What a reused run does
not see is the transient peak of loading; its record says ``model/base_reused = 1``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import torch

from . import compiling
from . import model as model_stage
from ..config import RunConfig, rewrites_base

log = logging.getLogger("lorasweep")


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def weights_hash(model: torch.nn.Module) -> str:
    """Fingerprint of every parameter and buffer, computed where the tensor lives (no copy to the host).

    Per tensor: its raw bits viewed as integers and summed (int64) in 7 interleaved slices, plus a
    tail. Any changed element changes a sum; the slices make it position-sensitive. Well under a
    second for SmolLM2-135M on a CPU, milliseconds on a GPU, where hashing the bytes on the host
    would take seconds per GB.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        v = t.detach().reshape(-1)
        if v.dtype == torch.bool:
            v = v.view(torch.uint8)
        elif v.is_floating_point():
            v = v.view(_INT_VIEW[v.element_size()])
        m = v.numel() - v.numel() % 7
        stats = torch.cat([v[:m].view(-1, 7).sum(0, dtype=torch.int64), v[m:].sum(dtype=torch.int64).view(1)])
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{stats.tolist()};".encode())
    return h.hexdigest()


def eligible(cfg: RunConfig) -> bool:
    """Only bases a run never changes and owns nothing of. A classification model's head is
    initialised at load under the run's seed: reusing it would give every later seed the first
    run's head (seed 1 after seed 0 scored exactly like seed 0), so those always load afresh."""
    return (cfg.train.reuse_base and cfg.lora.method == "lora" and cfg.precision.quant == "none"
            and cfg.model.task == "causal_lm" and not rewrites_base(cfg.lora))  # PiSSA/OLoRA rewrite W


def _key(cfg: RunConfig, device: torch.device) -> str:
    # lora.bias: a base loaded for a frozen-bias run may store its linears in 16 bits (model.load_kwargs)
    return json.dumps([asdict(cfg.model), asdict(cfg.precision), str(device), cfg.train.grad_checkpointing,
                       cfg.lora.bias], sort_keys=True)


@dataclass
class _Entry:
    key: str
    loaded: model_stage.LoadedModel
    digest: str
    use_cache: object


_entry: _Entry | None = None


def drop() -> None:
    global _entry
    _entry = None


def evict_unless(cfg: RunConfig, device: torch.device) -> None:
    """Call before the run's peak counter is reset: a base this run will not use must not count."""
    if _entry is not None and not (eligible(cfg) and _entry.key == _key(cfg, device)):
        drop()


def acquire(cfg: RunConfig, device: torch.device) -> tuple[model_stage.LoadedModel, bool]:
    """(loaded base, reused?). Loads and remembers the base when the run is eligible."""
    global _entry
    if eligible(cfg) and _entry is not None and _entry.key == _key(cfg, device):
        return _entry.loaded, True
    loaded = model_stage.build_model(cfg.model, cfg.precision, device, cfg.train.grad_checkpointing,
                                     frozen_base=cfg.lora.method == "lora" and cfg.lora.bias == "none")
    if eligible(cfg):
        _entry = _Entry(_key(cfg, device), loaded, weights_hash(loaded.model),
                        getattr(loaded.model.config, "use_cache", None))
    return loaded, False


def release(model: torch.nn.Module | None) -> bool:
    """After a run: take the adapter off the cached base and check its weights. True if kept."""
    global _entry
    if _entry is None:
        return False
    base = _entry.loaded.model
    try:
        if model is not None and model is not base and hasattr(model, "unload"):
            model.unload()  # replaces LoRA layers by their original base layers, no merge
        if hasattr(base, "peft_config"):
            del base.peft_config
        if hasattr(base, "disable_input_require_grads"):
            try:
                base.disable_input_require_grads()
            except AttributeError:
                pass  # no hook was registered
        base.config.use_cache = _entry.use_cache
        compiling.uncompile(base)  # train.compile ends with its run, a failed one too
        for p in base.parameters():
            p.requires_grad_(False)
        if weights_hash(base) != _entry.digest:
            log.warning("reused base model changed during the run; it will be reloaded")
            drop()
            return False
        return True
    except Exception as e:  # noqa: BLE001 - a bad cache entry only costs a reload
        log.warning("could not restore the reused base model (%s); it will be reloaded", e)
        drop()
        return False
