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
from typing import Any, Dict, List, Optional

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
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# lora.init values (peft's init_lora_weights; "default" = peft's True: A random, B = 0)
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_<n>", "olora", "loftq")
# inits that move part of W into the adapter (W = W_res + s*B*A): the base weights change
BASE_REWRITING_INITS = ("pissa", "olora")
# LoraConfig fields of the variants; at these values a run is plain LoRA and its id stays what
# it was before the fields existed
LORA_VARIANT_DEFAULTS = {"use_dora": False, "use_rslora": False, "init": "default", "loraplus_lr_ratio": None,
                         "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                         "exclude_modules": []}


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
    # attention kernel: auto (transformers' default: sdpa, eager where a model has no sdpa) | sdpa |
    # eager | flash_attention_2 | flash_attention_3 | flex_attention; every model build uses it
    attn_implementation: str = "auto"


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
    # Variants, each one peft field (docs/variants.md); the defaults are plain LoRA.
    use_dora: bool = False  # DoRA: a trained magnitude per output row on top of the LoRA direction
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) instead of alpha/r
    # default (A random, B = 0) | gaussian | pissa | pissa_niter_<n> (fast SVD) | olora | loftq
    init: str = "default"
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: B matrices train at optimizer.lr x ratio (e.g. 16)
    # regex (matched against the end of a module's full name, as peft does) -> rank / alpha
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    layers_to_transform: Optional[List[int]] = None  # only these decoder layers get LoRA (null = all)
    exclude_modules: List[str] = field(default_factory=list)  # module names never adapted


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
    # fp32 matmuls on CUDA use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation); no effect on a CPU
    tf32: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-4
    # a multiplier on lr: sweeping it (optimizer.lr_factor=0.3,1,3) gives every arm an lr grid around its
    # own rate (SGD's 1e-2, AdamW's 2e-4, full fine-tuning's 1e-5); the run trains at lr x lr_factor
    lr_factor: float = 1.0
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
    # save a resumable checkpoint every N optimizer steps (0 = only when a stop signal arrives);
    # a relaunch of the same run resumes from the newest whole one (see checkpoint.py)
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # keep the loaded base in memory for the next run of this process (LoRA on unquantized bases;
    # see basecache.py); a sweep under the basic launcher then loads each base once
    reuse_base: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # the loss: labelled = output head only at positions with a label, cross-entropy in chunks
    # (Liger's fused kernel on CUDA when liger-kernel is installed); full = the model's own
    # forward, logits at every position (for comparison). Same loss either way (loss.py).
    loss_head: str = "labelled"
    compile: bool = False  # torch.compile the decoder; its compile is timed apart (time/compile_s)
    # validation loss on a fixed subset every N optimizer steps, appended to <run>/val_curve.jsonl
    # (0 = off); what a pruner (pruner=median|asha) compares runs by
    eval_every: int = 0
    eval_examples: int = 32  # the first N validation examples: the same subset for every run
    # One run on several processes (distributed.py): devices = processes per node (1 = one process,
    # no torch.distributed), nodes = SLURM nodes; strategy ddp (each rank a full copy, gradients
    # all-reduced) | fsdp (FSDP2: weights, gradients and optimizer states sharded over the ranks).
    # batch_size stays the GLOBAL micro-batch, split by rows.
    devices: int = 1
    nodes: int = 1
    strategy: str = "ddp"


@dataclass
class DataConfig:
    name: str = MISSING  # arithmetic | alpaca | jsonl | sst2 | text_classification
    path: Optional[str] = None  # local file or folder; hub id for alpaca when online
    hub_id: Optional[str] = None
    # prompt rendering: alpaca | chat | auto (chat when the tokenizer has a chat template)
    template: str = "auto"
    train_on_prompt: bool = False
    val_fraction: float = 0.05
    # file data: a further share held out as the test split (eval.test_loss scores it as test/*)
    test_fraction: float = 0.0
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
    # more training examples from other sources (sources.py), e.g. [{name: arithmetic, n: 200}]:
    # the first n of each source's train split join this data's training rows
    mix: List[Any] = field(default_factory=list)


@dataclass
class EvalConfig:
    name: str = "val"
    val_loss: bool = True
    tasks: List[str] = field(default_factory=list)  # lm-eval task names
    include_path: Optional[str] = None
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: Any = 8  # a positive integer, or auto (lm-eval finds the largest that fits)
    baseline: bool = False
    max_new_tokens: int = 16
    log_samples: bool = False
    # further validation sets (sources.py): {lima: {name: alpaca, path: lima.json, n: 50}} adds
    # val/lima/loss and val/lima/perplexity, scored like val/loss with the run's template
    val_sets: Dict[str, Any] = field(default_factory=dict)
    # test/loss and test/perplexity on the data's held-out test split (arithmetic: data.n_test; file data:
    # data.test_fraction), never used to choose anything: a study that picks each arm's lr on val/loss
    # judges it here (reference.select)
    test_loss: bool = False


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
    # forecast the training time before it starts (run/forecast.py): from finished runs like this one,
    # else a probe of two micro-batches (time/probe_s); false: neither
    forecast: bool = True


@dataclass
class PrunerConfig:
    """Stops a losing run early (pruner.py): its periodic validation loss (train.eval_every) against
    the other runs of the study folder at the same step. Not part of a run's identity."""
    name: str = "none"  # none | median | asha
    warmup_steps: int = 0  # no run is stopped before this step
    # median: completed runs needed before any run is stopped; asha: runs that reached a rung
    min_runs: int = 3
    reduction_factor: int = 3  # asha: a rung keeps the best 1/reduction_factor of the runs that reached it
    min_steps: int = 0  # asha: step of the first rung (0 = train.eval_every); rung k at min_steps x factor^k


@dataclass
class SearchConfig:
    """An Optuna search (search.py), run by study files with `override /hydra/sweeper: search`.
    space: {config key: {type: int|float|categorical, low, high, log, step, choices, times}}."""
    n_trials: int = 20
    sampler: str = "tpe"  # tpe | random | grid
    metric: str = "val/loss"  # any metric of the record, e.g. eval/<task>/<metric>
    direction: str = "auto"  # minimize | maximize | auto (minimize losses and perplexity, else maximize)
    space: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    n_startup_trials: int = 10  # tpe: random trials before the model guides the sampling (Optuna's default)
    workers: Optional[int] = None  # trials at once; null = hydra.sweeper.max_batch_size, else 1


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
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    study: str = "default"
    results_dir: str = "results"
    seed: int = 0
    rerun: bool = False
    # launcher=parallel / submitit_local on a GPU machine: runs sharing one GPU at a time (more = oversubscribed)
    runs_per_gpu: int = 1
    # free-form block a study file may carry (article figures); not part of the run's identity
    reference: Optional[Any] = None


# Fields that do not change what a run computes: excluded from its identity hash.
# train fields that change how fast a run computes its loss, not the loss (equal to 1e-6):
# in the id only when set, so labelled-vs-full or compiled-vs-eager comparisons get their own runs
TRAIN_SPEED_DEFAULTS = {"loss_head": "labelled", "compile": False}
NON_IDENTITY_KEYS = ("logger", "results_dir", "study", "rerun", "reference", "planner", "pruner", "search",
                     "runs_per_gpu")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve(cfg: RunConfig, device_type: str | None = None) -> RunConfig:
    """A copy with every machine-dependent ``auto`` replaced by what this machine runs: train.device
    (cpu / cuda), precision.compute_dtype (the forward's dtype: the 4-bit compute dtype, else the
    autocast or weights dtype), precision.tf32 (false off CUDA) and model.attn_implementation
    (transformers' default, sdpa). The run id hashes these, so a CPU run and a GPU run of one config
    never share a folder or a cached base score. ``device_type`` plans for another machine."""
    tr, pr, mo = cfg.train, cfg.precision, cfg.model
    if device_type is None:
        device_type = tr.device if tr.device != "auto" else ("cuda" if _cuda_visible() else "cpu")
    cdt = pr.compute_dtype
    if cdt == "auto":
        if pr.quant != "none":
            cdt = "bfloat16" if device_type == "cuda" and _bf16_gpu() else "float32"
        else:
            cdt = pr.autocast if pr.autocast != "none" else pr.weights_dtype
    attn = "sdpa" if mo.attn_implementation == "auto" else mo.attn_implementation
    return dataclasses.replace(
        cfg, train=dataclasses.replace(tr, device=device_type),
        precision=dataclasses.replace(pr, compute_dtype=cdt, tf32=bool(pr.tf32 and device_type == "cuda")),
        model=dataclasses.replace(mo, attn_implementation=attn))


def _bf16_gpu() -> bool:
    """bf16 tensor cores on the GPU (Ampere+); a machine without one plans for a current GPU."""
    import torch

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True


def config_hash(cfg: RunConfig) -> str:
    d = to_dict(resolve(cfg))  # resolved: `auto` means different runs on different machines
    for k in NON_IDENTITY_KEYS:
        d.pop(k, None)
    # the number of torch threads does not change the maths
    d["train"].pop("num_threads", None)
    d["train"].pop("checkpoint_every", None)  # checkpoints change when a run can stop, not what it computes
    d["train"].pop("keep_checkpoints", None)
    d["train"].pop("reuse_base", None)
    for k, default in TRAIN_SPEED_DEFAULTS.items():  # at their defaults, ids stay what they were
        if d["train"].get(k) == default:
            d["train"].pop(k, None)
    d["train"].pop("eval_every", None)  # periodic validation adds a curve; weights and metrics are unchanged
    d["train"].pop("eval_examples", None)
    for k in ("devices", "nodes", "strategy"):  # N processes compute what one process computes
        d["train"].pop(k, None)
    for k, default in LORA_VARIANT_DEFAULTS.items():
        if d["lora"].get(k) == default:
            d["lora"].pop(k, None)
    if not d["data"].get("mix"):  # fields added later: at their empty default, ids stay what they were
        d["data"].pop("mix", None)
    if d.get("optimizer", {}).get("lr_factor") == 1.0:
        d["optimizer"].pop("lr_factor", None)
    if not d["data"].get("test_fraction"):
        d["data"].pop("test_fraction", None)
    if "eval" in d and not d["eval"].get("val_sets"):
        d["eval"].pop("val_sets", None)
    if "eval" in d and not d["eval"].get("test_loss"):
        d["eval"].pop("test_loss", None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x).replace(".", "p")


def rewrites_base(lo: LoraConfig) -> bool:
    """PiSSA/OLoRA subtract their start from the base weights: disable_adapter() is no longer the base."""
    return lo.method == "lora" and (lo.init in BASE_REWRITING_INITS or lo.init.startswith("pissa_niter_"))


def exact_base_at_start(lo: LoraConfig) -> bool:
    """True when a fresh adapter adds exactly zero (B = 0), so the fresh model scores as the base.
    PiSSA/OLoRA (base rewritten) and LoftQ (fitted to the quantization error) do not."""
    return not (rewrites_base(lo) or (lo.method == "lora" and lo.init == "loftq"))


def lora_variant(lo: LoraConfig) -> str:
    """What a reader calls the method: lora, dora, rslora, pissa, loraplus_x16, or a '+' of them."""
    if lo.method != "lora":
        return lo.method
    parts = (["dora"] if lo.use_dora else []) + (["rslora"] if lo.use_rslora else []) \
        + ([lo.init] if lo.init != "default" else []) \
        + ([f"loraplus_x{_fmt_num(lo.loraplus_lr_ratio)}"] if lo.loraplus_lr_ratio else [])
    return "+".join(parts) or "lora"


def lora_scaling(lo: LoraConfig, r: int | None = None, alpha: float | None = None) -> float:
    """The factor on B*A: alpha/r, or alpha/sqrt(r) with rsLoRA (for one module's r/alpha if given)."""
    r, alpha = r or lo.r, lo.alpha if alpha is None else alpha
    return alpha / (r ** 0.5 if lo.use_rslora else r)


def run_id(cfg: RunConfig) -> str:
    """A readable prefix (what differs between typical sweep runs) plus the config hash."""
    lo = cfg.lora
    if lo.method == "lora":
        tgt = "-".join(lo.targets) if len(lo.targets) <= 2 else f"{len(lo.targets)}mods"
        method = f"r{lo.r}a{_fmt_num(lo.alpha)}-{tgt}"
        if lora_variant(lo) != "lora":
            method += "-" + lora_variant(lo)
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


def _check_lora_variant(cfg: RunConfig, bad) -> None:
    """The variant fields, alone and in the combinations peft refuses or gets silently wrong."""
    lo, quant = cfg.lora, cfg.precision.quant != "none"
    if lo.method != "lora":
        for k, default in LORA_VARIANT_DEFAULTS.items():
            if getattr(lo, k) != default:
                bad(f"lora.{k}", getattr(lo, k), f"a LoRA variant field; lora.method={lo.method} trains the weights "
                    f"themselves (use lora.method=lora or drop the field)")
        return
    if not (lo.init in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", str(lo.init))):
        bad("lora.init", lo.init, f"must be one of {', '.join(LORA_INITS)} (e.g. lora.init=pissa_niter_4)")
    if lo.loraplus_lr_ratio is not None and not lo.loraplus_lr_ratio > 0:
        bad("lora.loraplus_lr_ratio", lo.loraplus_lr_ratio, "must be > 0 (LoRA+ suggests 16), or null for plain LoRA")
    for name, pat, kind in (("rank_pattern", lo.rank_pattern, int), ("alpha_pattern", lo.alpha_pattern, float)):
        for key, v in (pat or {}).items():
            try:
                re.compile(str(key))
            except re.error as e:
                bad(f"lora.{name}", key, f"not a regular expression ({e}); keys match the end of a module name, "
                    f"e.g. 'layers.0.self_attn.q_proj'")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (kind is int and v != int(v)):
                bad(f"lora.{name}[{key}]", v, f"must be a positive {'integer rank' if kind is int else 'number'}")
    if lo.layers_to_transform is not None and (not lo.layers_to_transform or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in lo.layers_to_transform)):
        bad("lora.layers_to_transform", lo.layers_to_transform, "must list layer indices >= 0 (e.g. [0, 1]), or null for all")
    base_rewrite = rewrites_base(lo)
    if base_rewrite and quant:
        bad("lora.init", lo.init, f"rewrites the base weights, which peft does at full precision only (4-bit: PiSSA raises, "
            f"OLoRA re-quantizes the residual so the start is no longer the base); use precision=fp32/bf16_true "
            f"with lora.init={lo.init}, or lora.init=default with precision={cfg.precision.name}")
    saves = cfg.train.save_adapter
    if base_rewrite and saves and lo.use_dora:
        bad("lora.use_dora", lo.use_dora, f"with lora.init={lo.init} the saved adapter loses DoRA's magnitudes (peft "
            f"converts PiSSA/OLoRA adapters to plain LoRA on save); drop one, or set train.save_adapter=false")
    if base_rewrite and saves and lo.use_rslora and (lo.rank_pattern or lo.alpha_pattern):
        bad("lora.use_rslora", lo.use_rslora, f"with lora.init={lo.init} and a rank/alpha pattern peft cannot convert the "
            f"saved adapter to plain LoRA; drop one, or set train.save_adapter=false")
    if lo.init == "loftq":
        if not quant:
            bad("lora.init", lo.init, "LoftQ fits LoRA to the 4-bit quantization error: use it with precision=nf4/nf4_dq/fp4")
        else:
            import torch

            if cfg.train.device == "cpu" or not torch.cuda.is_available():
                bad("lora.init", lo.init, "peft's LoftQ computes on CUDA only (peft 0.21); on a CPU use lora.init=default "
                    "or pissa (at full precision)")


PRUNERS = ("none", "median", "asha")


def _check_pruning(cfg: RunConfig, bad) -> None:
    tr, pu = cfg.train, cfg.pruner
    if tr.eval_every < 0:
        bad("train.eval_every", tr.eval_every, "must be >= 0 (0 = no periodic validation)")
    if tr.eval_examples <= 0:
        bad("train.eval_examples", tr.eval_examples, "must be a positive integer (e.g. train.eval_examples=32)")
    if pu.name not in PRUNERS:
        bad("pruner.name", pu.name, f"must be one of {', '.join(PRUNERS)} (e.g. pruner=median)")
    elif pu.name != "none":
        if tr.eval_every <= 0:
            bad("train.eval_every", tr.eval_every, f"pruner={pu.name} compares periodic validation losses; "
                f"set train.eval_every=N (e.g. train.eval_every=10), or pruner=none")
        if not cfg.eval.val_loss:
            bad("eval.val_loss", cfg.eval.val_loss, f"pruner={pu.name} needs the validation split; set eval.val_loss=true")
    if pu.warmup_steps < 0:
        bad("pruner.warmup_steps", pu.warmup_steps, "must be >= 0")
    if pu.min_runs < 1:
        bad("pruner.min_runs", pu.min_runs, "must be >= 1")
    if pu.reduction_factor < 2:
        bad("pruner.reduction_factor", pu.reduction_factor, "must be >= 2 (asha keeps the best 1/factor at each rung)")
    if pu.min_steps < 0:
        bad("pruner.min_steps", pu.min_steps, "must be >= 0 (0 = train.eval_every)")


STRATEGIES = ("ddp", "fsdp")


def world_size(tc: TrainConfig) -> int:
    """Processes of one run: devices per node x nodes."""
    return tc.devices * tc.nodes


def _check_distributed(cfg: RunConfig, bad) -> None:
    """train.devices / nodes / strategy, and what a run on several processes cannot do yet."""
    tr = cfg.train
    for name in ("devices", "nodes"):
        v = getattr(tr, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(f"train.{name}", v, "must be a positive integer (1 = today's one-process run)")
            return
    if tr.strategy not in STRATEGIES:
        bad("train.strategy", tr.strategy, f"must be one of {', '.join(STRATEGIES)}")
    world = world_size(tr)
    if world == 1:
        return
    if tr.strategy == "fsdp":
        if cfg.precision.quant != "none":  # peft's QLoRA+FSDP needs bnb_4bit_quant_storage; users report silent failures
            bad("train.strategy", tr.strategy, "fsdp with a 4-bit base is refused (bitsandbytes' quant_storage "
                "path is untested here); use precision=bf16_true or fp32 with fsdp, or strategy=ddp")
    if tr.batch_size % world:
        bad("train.batch_size", tr.batch_size, f"is the global micro-batch and must divide evenly over "
            f"train.devices x train.nodes = {world} processes (e.g. train.batch_size={max(1, tr.batch_size // world) * world})")
    if tr.device != "cpu" and _cuda_visible():
        import torch

        if tr.devices > torch.cuda.device_count():
            bad("train.devices", tr.devices, f"only {torch.cuda.device_count()} GPU(s) visible on this node; "
                f"one process per GPU")
    if tr.compile:
        bad("train.compile", tr.compile, "torch.compile on several processes is not available yet; set train.compile=false")


# ----------------------------------------------------------------------------- data sources
# data.mix / eval.val_sets entries: {name: arithmetic | alpaca | jsonl, path: <file>, n: <examples>}
# plus any other data.* field; checked here, read by run/data.py.
SOURCE_NAMES = ("arithmetic", "alpaca", "jsonl")
_SOURCE_FIELDS = {f.name for f in dataclasses.fields(DataConfig)} - {"mix", "name"}


def source_problems(spec: Any, field: str, *, needs_n: bool) -> list[str]:
    """Every problem with one source, each naming ``field`` and the fix (checked before weights load)."""
    if not isinstance(spec, dict):
        return [f"{field}={spec!r}: must be a mapping like {{name: arithmetic, n: 200}} or {{name: jsonl, path: FILE, n: 500}}"]
    out = []
    name = spec.get("name")
    if name not in SOURCE_NAMES:
        out.append(f"{field}.name={name!r}: must be one of {', '.join(SOURCE_NAMES)}")
    unknown = sorted(set(spec) - _SOURCE_FIELDS - {"name", "n"})
    if unknown:
        out.append(f"{field}: unknown key(s) {', '.join(unknown)}; use name, path, n or a data.* field")
    n = spec.get("n")
    if (needs_n or n is not None) and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        out.append(f"{field}.n={n!r}: must be a positive number of examples")
    path = spec.get("path")
    if name in ("alpaca", "jsonl") and not path:
        out.append(f"{field}.path=None: {name} needs a local file (path: /path/to/file.json)")
    elif path and not os.path.exists(os.path.expanduser(str(path))):
        out.append(f"{field}.path={path!r}: no such file; give an existing path")
    return out


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
    _check_lora_variant(cfg, bad)

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
    if not op.lr_factor > 0:
        bad("optimizer.lr_factor", op.lr_factor, "must be > 0 (the run trains at optimizer.lr x lr_factor)")
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
    if tr.checkpoint_every < 0:
        bad("train.checkpoint_every", tr.checkpoint_every, "must be >= 0 (0 = save only on a stop signal)")
    if tr.keep_checkpoints < 1:
        bad("train.keep_checkpoints", tr.keep_checkpoints, "must be >= 1")
    if tr.device not in ("auto", "cpu", "cuda"):
        bad("train.device", tr.device, "must be auto, cpu or cuda")
    elif tr.device == "cuda" and not _cuda_visible():
        bad("train.device", tr.device, "no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use train.device=auto or cpu, or expose a GPU")
    if tr.packing and tr.group_by_length:
        bad("train.packing", tr.packing, "packing and group_by_length exclude each other; set one to false")
    if tr.packing and cfg.model.task != "causal_lm":
        bad("train.packing", tr.packing, "packing is for causal_lm instruction data; set train.packing=false")
    if tr.loss_head not in ("labelled", "full"):
        bad("train.loss_head", tr.loss_head, "must be labelled (head only where a label is) or full (every position)")
    _check_distributed(cfg, bad)

    da = cfg.data
    if da.template not in ("auto", "alpaca", "chat"):
        bad("data.template", da.template, "must be auto, alpaca or chat")
    if not (0.0 < da.val_fraction < 1.0):
        bad("data.val_fraction", da.val_fraction, "must be in (0, 1)")
    if da.name in ("jsonl", "text_classification") and not da.path:
        bad("data.path", da.path, f"data={da.name} needs a local file: data.path=/path/to/file")
    if da.path and not da.path.startswith(("hf://",)) and not os.path.exists(os.path.expanduser(da.path)):
        bad("data.path", da.path, "no such file or folder; give an existing path")
    if da.mix and cfg.model.task != "causal_lm":
        bad("data.mix", da.mix, "mixing instruction sources is for causal_lm data; remove data.mix")
    for i, spec in enumerate(da.mix or []):
        p.extend(source_problems(spec, f"data.mix[{i}]", needs_n=True))
    for name, spec in (cfg.eval.val_sets or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(name)):
            bad("eval.val_sets", name, "a set's name becomes val/<name>/loss: use letters, digits, _ or -")
        p.extend(source_problems(spec, f"eval.val_sets.{name}", needs_n=False))
    if cfg.eval.val_sets and cfg.model.task != "causal_lm":
        bad("eval.val_sets", dict(cfg.eval.val_sets), "further validation sets are for causal_lm runs; remove them")
    if not 0 <= da.test_fraction < 1 or da.test_fraction + da.val_fraction >= 1:
        bad("data.test_fraction", da.test_fraction, "must be >= 0 and leave training rows: data.val_fraction + "
            "data.test_fraction < 1")
    if cfg.eval.test_loss:
        if cfg.model.task != "causal_lm":
            bad("eval.test_loss", True, "the held-out test loss is for causal_lm runs; remove it")
        elif da.name == "arithmetic" and da.n_test < 1:
            bad("eval.test_loss", True, "the arithmetic data has no test split: set data.n_test (e.g. 200)")
        elif da.name in ("alpaca", "jsonl") and not da.test_fraction:
            bad("eval.test_loss", True, "file data has no test split: hold one out with data.test_fraction (e.g. 0.05)")

    mo = cfg.model
    if not mo.name_or_path.startswith("builtin:") and not _is_hub_id(mo.name_or_path):
        if not os.path.isdir(os.path.expanduser(mo.name_or_path)):
            bad("model.name_or_path", mo.name_or_path, "no such local model folder; give an existing folder or a hub id like org/name")
    if mo.task not in ("causal_lm", "sequence_classification"):
        bad("model.task", mo.task, "must be causal_lm or sequence_classification")
    if mo.attn_implementation not in ATTN_IMPLEMENTATIONS:
        bad("model.attn_implementation", mo.attn_implementation, f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    elif mo.attn_implementation.startswith("flash") and tr.device == "cpu":
        bad("model.attn_implementation", mo.attn_implementation, "flash attention needs a GPU; use sdpa on a CPU")

    ev = cfg.eval
    if ev.limit is not None and ev.limit <= 0:
        bad("eval.limit", ev.limit, "must be > 0 (a count, or a fraction below 1), or null for all")
    if ev.batch_size != "auto" and (not isinstance(ev.batch_size, int) or isinstance(ev.batch_size, bool)
                                    or ev.batch_size <= 0):
        bad("eval.batch_size", ev.batch_size, "must be a positive integer, or auto (the largest that fits)")

    lg = cfg.logger
    if lg.backend not in ("wandb", "none"):
        bad("logger.backend", lg.backend, "must be wandb or none")
    if lg.mode not in ("offline", "online"):
        bad("logger.mode", lg.mode, "must be offline or online")

    if cfg.planner.budget_gb is not None and cfg.planner.budget_gb <= 0:
        bad("planner.budget_gb", cfg.planner.budget_gb, "must be > 0 GB, or null for no budget")
    if not isinstance(cfg.runs_per_gpu, int) or cfg.runs_per_gpu < 1:
        bad("runs_per_gpu", cfg.runs_per_gpu, "must be a positive integer (runs sharing one GPU; 1 = one each)")
    _check_pruning(cfg, bad)
    if isinstance(cfg.reference, dict) and ("claims" in cfg.reference or "claim" in cfg.reference):
        from .claims import claim_problems  # a study's claims fail at launch, not at report time

        p.extend(claim_problems(cfg.reference))

    if p:
        raise ConfigError(p)
