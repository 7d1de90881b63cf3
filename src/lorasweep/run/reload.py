"""Reopen a finished run from its folder: its config, its adapter, its validation data and score.

Shared by ``lorasweep-merge`` and ``lorasweep-eval``; rebuilds with the run's own code paths
(model.build_model, classification/data.prepare_data) so a re-score matches the run's record.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import classification as cls_stage
from . import data as data_stage
from . import evaluate as eval_stage
from . import model as model_stage
from ..config import ConfigError, RunConfig, validate

# What an evaluation may change about a run without changing the trained weights it reads.
EVAL_OVERRIDE_PREFIXES = ("eval.", "data.", "train.device", "train.num_threads", "train.max_seq_len")


class RunFolderError(ValueError):
    """A run folder that cannot be reopened; the message names the folder and the fix."""


def load_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's RunConfig from record.json (or config.yaml), with key=value overrides applied."""
    run_dir = Path(run_dir)
    rec = run_dir / "record.json"
    if rec.is_file():
        raw = json.loads(rec.read_text()).get("config")
    elif (run_dir / "config.yaml").is_file():
        raw = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    else:
        raise RunFolderError(f"{run_dir}: not a run folder (no record.json or config.yaml); "
                             f"give <results_dir>/<study>/<run_id>")
    bad = [o for o in overrides or [] if not o.split("=", 1)[0].startswith(EVAL_OVERRIDE_PREFIXES)]
    if bad:
        raise RunFolderError(f"override {bad[0]!r}: only {', '.join(p.rstrip('.') + ('*' if p.endswith('.') else '') for p in EVAL_OVERRIDE_PREFIXES)} "
                             f"may change at evaluation (the rest defines the trained weights)")
    try:
        base = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(base, raw or {}, OmegaConf.from_dotlist(list(overrides or [])))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise RunFolderError(f"{run_dir}: config does not fit this lorasweep version ({str(e).splitlines()[0]})") from None
    try:
        validate(cfg)
    except ConfigError as e:
        raise RunFolderError(f"{run_dir}: {e}") from None
    return cfg


def adapter_dir(run_dir: str | Path, cfg: RunConfig) -> Path:
    d = Path(run_dir) / "adapter"
    if cfg.lora.method != "lora":
        raise RunFolderError(f"{run_dir}: lora.method={cfg.lora.method} trains the weights themselves; "
                             f"only LoRA runs have an adapter to merge or switch")
    if not (d / "adapter_config.json").is_file():
        raise RunFolderError(f"{run_dir}: no saved adapter in {d}; rerun with train.save_adapter=true (and train.max_steps>0)")
    init = json.loads((d / "adapter_config.json").read_text()).get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda")):
        # peft would decompose the base again on load and subtract the start a second time
        raise RunFolderError(f"{d}: a {init} adapter saved without conversion only fits its residual base; "
                             f"lorasweep saves PiSSA/OLoRA runs as plain LoRA (rerun with this version)")
    return d


def autocast_of(cfg: RunConfig) -> torch.dtype | None:
    return model_stage.DTYPES[cfg.precision.autocast] if cfg.precision.autocast != "none" else None


def val_batches(cfg: RunConfig, tokenizer):
    """The run's validation batches, prepared exactly as the run (pipeline.train_run) prepared them."""
    if cfg.model.task == "sequence_classification":
        prepared = cls_stage.prepare_data(cfg.data, tokenizer, num_labels=cfg.model.num_labels,
                                          max_seq_len=cfg.train.max_seq_len, batch_size=cfg.train.batch_size,
                                          seed=cfg.train.seed,
                                          eval_batch_size=None if cfg.eval.batch_size == "auto" else cfg.eval.batch_size)
    else:
        prepared = data_stage.prepare_data(cfg.data, tokenizer, max_seq_len=cfg.train.max_seq_len,
                                           batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    if prepared.val is None:
        raise RunFolderError(f"data={cfg.data.name}: no validation examples to score")
    return prepared.val


def score(model: torch.nn.Module, cfg: RunConfig, val, device: torch.device) -> dict[str, float]:
    fn = cls_stage.evaluate if cfg.model.task == "sequence_classification" else eval_stage.validation_loss
    return fn(model, val, device=device, autocast_dtype=autocast_of(cfg))


@torch.no_grad()
def logits_on(model: torch.nn.Module, batch: dict, device: torch.device, autocast: torch.dtype | None) -> torch.Tensor:
    was = model.training
    model.eval()
    ctx = torch.autocast(device_type=device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    model.train(was)
    return out.logits.float().cpu()
