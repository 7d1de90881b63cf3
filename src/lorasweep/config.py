"""Typed run configuration: the schema Hydra composes into, and its validation.

YAML becomes these dataclasses once, at the CLI edge (``OmegaConf.to_object``).
Below that no DictConfig is passed around.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names every bad field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# Target-module presets, resolved against the model's architecture (see adapter.py).
TARGET_PRESETS = ("qv", "attention", "all_linear")
PRECISIONS = ("fp32", "bf16_mixed", "bf16_true", "fp16_mixed", "nf4", "nf4_dq", "fp4")
OPTIMIZERS = ("adamw", "sgd", "paged_adamw_8bit", "adamw_8bit")
SCHEDULES = ("constant", "linear", "cosine")
METHODS = ("lora", "full", "partial")


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run ids, e.g. smollm2_135m
    # hub id or local folder; "builtin:tiny_llama" / "builtin:smollm2_135m" are built or converted locally
    name_or_path: str = MISSING
    task: str = "causal_lm"  # causal_lm | sequence_classification
    num_labels: int = 2
    trust_remote_code: bool = False
    # only for builtin:tiny_llama
    tiny_layers: int = 2
    tiny_hidden: int = 64


@dataclass
class LoraConfig:
    method: str = "lora"  # lora | full | partial
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # module names (e.g. [q_proj, v_proj]) or one preset: qv | attention | all_linear
    targets: List[str] = field(default_factory=lambda: ["qv"])
    # for method=partial: module patterns to unfreeze (same presets or names as targets)
    trainable: List[str] = field(default_factory=list)
    bias: str = "none"


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    # dtype the base weights are loaded in: float32 | bfloat16 | float16
    weights_dtype: str = "float32"
    # autocast dtype for the forward pass: none | bfloat16 | float16
    autocast: str = "none"
    # bitsandbytes 4-bit quantization: none | nf4 | fp4
    quant: str = "none"
    double_quant: bool = False
    # compute dtype of the 4-bit matmuls; auto = bfloat16 on a bf16-capable GPU, float32 on CPU
    compute_dtype: str = "auto"


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine
    max_grad_norm: Optional[float] = 1.0


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # overrides epochs when set; 0 = evaluate the model as loaded
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    # batches of similar length (sorted within 50-batch chunks, batch order shuffled): little padding
    group_by_length: bool = False
    # whole examples packed into rows of max_seq_len, kept apart by per-example position ids (no
    # cross-example attention, no cross-example loss); no padding but a row's tail; val stays unpacked
    packing: bool = False
    save_adapter: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # keep the loaded base in memory for the next run of this process (LoRA on unquantized bases;
    # see basecache.py); a sweep under the basic launcher then loads each base once
    reuse_base: bool = False
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DataConfig:
    name: str = MISSING  # arithmetic | alpaca | jsonl | sst2 | text_classification
    path: Optional[str] = None  # local file or folder; hub id for alpaca when online
    hub_id: Optional[str] = None
    # prompt rendering: alpaca | chat | auto (chat when the tokenizer has a chat template)
    template: str = "auto"
    train_on_prompt: bool = False
    val_fraction: float = 0.05
    max_train_examples: Optional[int] = None
    max_val_examples: Optional[int] = 200
    # arithmetic generator sizes
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    seed: int = 1234
    # classification columns
    text_column: str = "sentence"
    label_column: str = "label"
    # classification: which labelled split is scored as val/* (dev, or test when test.tsv holds labels)
    val_split: str = "dev"


@dataclass
class EvalConfig:
    name: str = "val"
    val_loss: bool = True
    tasks: List[str] = field(default_factory=list)  # lm-eval task names
    include_path: Optional[str] = None
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    baseline: bool = False
    max_new_tokens: int = 16
    log_samples: bool = False


@dataclass
class LoggerConfig:
    name: str = "wandb_offline"
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online
    project: str = "lorasweep"
    entity: Optional[str] = None
    init_timeout: float = 60.0


@dataclass
class PlannerConfig:
    budget_gb: Optional[float] = None  # skip runs predicted above this peak


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    study: str = "default"
    results_dir: str = "results"
    seed: int = 0
    rerun: bool = False
    # free-form block a study file may carry (article figures); not part of the run's identity
    reference: Optional[Any] = None


# Fields that do not change what a run computes: excluded from its identity hash.
NON_IDENTITY_KEYS = ("logger", "results_dir", "study", "rerun", "reference", "planner")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: RunConfig) -> str:
    d = to_dict(cfg)
    for k in NON_IDENTITY_KEYS:
        d.pop(k, None)
    # the number of torch threads and the device choice do not change the maths
    d["train"].pop("num_threads", None)
    d["train"].pop("reuse_base", None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x).replace(".", "p")


def run_id(cfg: RunConfig) -> str:
    """A readable prefix (what differs between typical sweep runs) plus the config hash."""
    lo = cfg.lora
    if lo.method == "lora":
        tgt = "-".join(lo.targets) if len(lo.targets) <= 2 else f"{len(lo.targets)}mods"
        method = f"r{lo.r}a{_fmt_num(lo.alpha)}-{tgt}"
    elif lo.method == "partial":
        method = "partial-" + "-".join(lo.trainable)[:24]
    else:
        method = "full"
    parts = [cfg.model.name, method, cfg.precision.name, cfg.optimizer.name, f"s{cfg.train.seed}"]
    prefix = re.sub(r"[^A-Za-z0-9_.\-]+", "_", "_".join(parts))
    return f"{prefix}-{config_hash(cfg)}"


def _is_hub_id(s: str) -> bool:
    """org/name with no path-like prefix: resolved by the hub, not the file system."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s)) and not os.path.exists(s)


def validate(cfg: RunConfig) -> None:
    """Check every field that can be checked without the model; raise one ConfigError naming all."""
    p: list[str] = []

    def bad(name: str, value: Any, why: str) -> None:
        p.append(f"{name}={value!r}: {why}")

    lo = cfg.lora
    if lo.method not in METHODS:
        bad("lora.method", lo.method, f"must be one of {', '.join(METHODS)}")
    if lo.method == "lora":
        if not isinstance(lo.r, int) or lo.r <= 0:
            bad("lora.r", lo.r, "must be a positive integer (e.g. lora.r=8)")
        if lo.alpha <= 0:
            bad("lora.alpha", lo.alpha, "must be > 0 (e.g. lora.alpha=16, often 2*r)")
        if not (0.0 <= lo.dropout < 1.0):
            bad("lora.dropout", lo.dropout, "must be in [0, 1) (e.g. lora.dropout=0.05)")
        if not lo.targets:
            bad("lora.targets", lo.targets, f"must name modules or a preset ({', '.join(TARGET_PRESETS)})")
    if lo.method == "partial" and not lo.trainable:
        bad("lora.trainable", lo.trainable, "method=partial needs module patterns, e.g. lora.trainable=[attention]")

    pr = cfg.precision
    if pr.weights_dtype not in ("float32", "bfloat16", "float16"):
        bad("precision.weights_dtype", pr.weights_dtype, "must be float32, bfloat16 or float16")
    if pr.autocast not in ("none", "bfloat16", "float16"):
        bad("precision.autocast", pr.autocast, "must be none, bfloat16 or float16")
    if pr.quant not in ("none", "nf4", "fp4"):
        bad("precision.quant", pr.quant, "must be none, nf4 or fp4")
    if pr.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
        bad("precision.compute_dtype", pr.compute_dtype, "must be auto, float32, bfloat16 or float16")
    if pr.quant != "none" and lo.method == "full":
        bad("lora.method", lo.method, "full fine-tuning of 4-bit weights is impossible; use precision=fp32/bf16_true or lora.method=lora")

    op = cfg.optimizer
    if op.name not in OPTIMIZERS:
        bad("optimizer.name", op.name, f"must be one of {', '.join(OPTIMIZERS)}")
    if not op.lr > 0:
        bad("optimizer.lr", op.lr, "must be > 0 (e.g. optimizer.lr=2e-4)")
    if op.weight_decay < 0:
        bad("optimizer.weight_decay", op.weight_decay, "must be >= 0")
    if op.warmup_steps < 0:
        bad("optimizer.warmup_steps", op.warmup_steps, "must be >= 0")
    if op.schedule not in SCHEDULES:
        bad("optimizer.schedule", op.schedule, f"must be one of {', '.join(SCHEDULES)}")
    if op.max_grad_norm is not None and op.max_grad_norm <= 0:
        bad("optimizer.max_grad_norm", op.max_grad_norm, "must be > 0, or null to disable clipping")

    tr = cfg.train
    if tr.max_steps is not None and tr.max_steps < 0:
        bad("train.max_steps", tr.max_steps, "must be >= 0 (0 = evaluate only), or null to train for train.epochs")
    if tr.max_steps is None and tr.epochs <= 0:
        bad("train.epochs", tr.epochs, "must be >= 1 (or set train.max_steps)")
    for name in ("batch_size", "grad_accum", "max_seq_len", "log_every"):
        v = getattr(tr, name)
        if v <= 0:
            bad(f"train.{name}", v, "must be a positive integer")
    if tr.device not in ("auto", "cpu", "cuda"):
        bad("train.device", tr.device, "must be auto, cpu or cuda")
    if tr.packing and tr.group_by_length:
        bad("train.packing", tr.packing, "packing and group_by_length exclude each other; set one to false")
    if tr.packing and cfg.model.task != "causal_lm":
        bad("train.packing", tr.packing, "packing is for causal_lm instruction data; set train.packing=false")

    da = cfg.data
    if da.template not in ("auto", "alpaca", "chat"):
        bad("data.template", da.template, "must be auto, alpaca or chat")
    if not (0.0 < da.val_fraction < 1.0):
        bad("data.val_fraction", da.val_fraction, "must be in (0, 1)")
    if da.name in ("jsonl", "text_classification") and not da.path:
        bad("data.path", da.path, f"data={da.name} needs a local file: data.path=/path/to/file")
    if da.path and not da.path.startswith(("hf://",)) and not os.path.exists(os.path.expanduser(da.path)):
        bad("data.path", da.path, "no such file or folder; give an existing path")

    mo = cfg.model
    if not mo.name_or_path.startswith("builtin:") and not _is_hub_id(mo.name_or_path):
        if not os.path.isdir(os.path.expanduser(mo.name_or_path)):
            bad("model.name_or_path", mo.name_or_path, "no such local model folder; give an existing folder or a hub id like org/name")
    if mo.task not in ("causal_lm", "sequence_classification"):
        bad("model.task", mo.task, "must be causal_lm or sequence_classification")

    ev = cfg.eval
    if ev.limit is not None and ev.limit <= 0:
        bad("eval.limit", ev.limit, "must be > 0 (a count, or a fraction below 1), or null for all")
    if ev.batch_size <= 0:
        bad("eval.batch_size", ev.batch_size, "must be a positive integer")

    lg = cfg.logger
    if lg.backend not in ("wandb", "none"):
        bad("logger.backend", lg.backend, "must be wandb or none")
    if lg.mode not in ("offline", "online"):
        bad("logger.mode", lg.mode, "must be offline or online")

    if cfg.planner.budget_gb is not None and cfg.planner.budget_gb <= 0:
        bad("planner.budget_gb", cfg.planner.budget_gb, "must be > 0 GB, or null for no budget")

    if p:
        raise ConfigError(p)
