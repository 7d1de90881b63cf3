"""Forecast a run's training (and validation) time before it trains: FLOPs / this machine's throughput.

FLOPs come from what determines them, read off the model skeleton and the run's own batches:
every linear layer of the decoder costs 2 x in x out per token forward; attention 4 x T x d per token
of a row of T; the output head 2 x d x vocab per position it runs on (the labelled positions only,
train.loss_head=labelled). Backward costs 1x the forward for a frozen weight (the input's gradient
only: LoRA's base, a 4-bit base) and 2x for a trained one; gradient checkpointing adds one more
forward of the decoder. Padding counts (the matmuls run on it); a packed row is one row.

Throughput (FLOP/s) comes from the best evidence at hand, in this order:
  1. finished runs of the same model, precision, device and thread count in the results folder,
     of a similar micro-batch (within 2x in tokens): their FLOPs over their time/train_s;
  2. else a short probe: two micro-batches of this run's first batches, forward and backward with no
     optimizer step (RNG restored, gradients dropped), the second one timed (time/probe_s apart);
  3. on CUDA, the device's bf16 peak caps the result (an MFU above 1 is a measuring error).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig

log = logging.getLogger("lorasweep")

IGNORE = -100
# Dense bf16 peaks (FLOP/s) of the GPUs lorasweep is run on: an upper bound for a measured throughput.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
SIMILAR_SHAPE = 2.0  # a finished run counts when its tokens per micro-batch are within this factor


# ---------------------------------------------------------------- FLOPs

@dataclass
class Shape:
    """The per-token and per-row costs of one model as this run trains it."""
    frozen_linear: float  # forward FLOPs per token of the decoder's frozen linear weights
    trained_linear: float  # ... of its trained ones (LoRA A/B, or every weight in full fine-tuning)
    attn_width: int  # q width (heads x head_dim) summed over layers: attention costs 4 T d per token
    head: float  # forward FLOPs of the output head per position it runs on
    head_trained: bool
    labelled_head: bool
    checkpointing: bool


def model_shape(cfg: RunConfig, skeleton) -> Shape:
    """From the meta skeleton (and the LoRA targets the planner resolves), no weights."""
    from .adapter import resolve_targets

    head_mod = skeleton.get_output_embeddings()
    head_name = next((n for n, m in skeleton.named_modules() if m is head_mod), None)
    lo = cfg.lora
    lora_targets = set()
    if lo.method == "lora":
        lora_targets = set(resolve_targets(list(lo.targets), skeleton))
    frozen = trained = 0.0
    for name, mod in skeleton.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == head_name:
            continue
        f = 2.0 * mod.in_features * mod.out_features
        if lo.method == "lora":
            frozen += f
            if name in lora_targets or name.rsplit(".", 1)[-1] in lora_targets:
                trained += 2.0 * lo.r * (mod.in_features + mod.out_features)
        else:  # full (and partial) fine-tuning: count every weight as trained
            trained += f
    hf = skeleton.config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or (getattr(text, "hidden_size", 0) // max(heads, 1)))
    head = 2.0 * head_mod.in_features * head_mod.out_features if isinstance(head_mod, torch.nn.Linear) else 0.0
    head_trained = lo.method != "lora" or any(t in ("lm_head",) for t in lora_targets)
    return Shape(frozen, trained, layers * heads * head_dim, head, head_trained,
                 cfg.train.loss_head == "labelled", cfg.train.grad_checkpointing)


def micro_batch_flops(shape: Shape, rows: int, length: int, labelled: int, *, backward: bool = True) -> float:
    """FLOPs of one micro-batch of ``rows`` x ``length`` tokens with ``labelled`` loss positions."""
    tokens = rows * length
    linear = tokens * (shape.frozen_linear + shape.trained_linear)
    attn = tokens * 4.0 * length * shape.attn_width
    head = (labelled if shape.labelled_head else tokens) * shape.head
    fwd = linear + attn + head
    if not backward:
        return fwd
    bwd = tokens * (shape.frozen_linear + 2.0 * shape.trained_linear) + 2.0 * attn + head * (2.0 if shape.head_trained else 1.0)
    recompute = (linear + attn) if shape.checkpointing else 0.0
    return fwd + bwd + recompute


def batch_shapes(batches, epoch: int) -> list[tuple[int, int, int]]:
    """(rows, padded length, labelled positions) of each micro-batch of an epoch, in order, without
    collating (Batches' own seeded order; no global RNG drawn)."""
    order = batches.order(epoch)
    out = []
    for s in range(0, len(order), batches.batch_size):
        exs = [batches.examples[i] for i in order[s:s + batches.batch_size]]
        length = max(len(e["input_ids"]) for e in exs)
        labelled = sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in exs)
        out.append((len(exs), length, labelled))
    return out


def trained_micro_batches(batches, grad_accum: int, n_steps: int) -> list[tuple[int, int, int]]:
    """The micro-batches ``n_steps`` optimizer steps go through (an epoch's last step may be short:
    steps do not cross epochs, train._optimizer_steps)."""
    out: list[tuple[int, int, int]] = []
    epoch, steps = 0, 0
    while steps < n_steps and len(batches):
        shapes = batch_shapes(batches, epoch)
        for s in range(0, len(shapes), grad_accum):
            if steps == n_steps:
                break
            out.extend(shapes[s:s + grad_accum])
            steps += 1
        epoch += 1
    return out


# ---------------------------------------------------------------- throughput

@dataclass
class Throughput:
    flops_per_s: float
    source: str  # "runs" | "probe"
    detail: str
    probe_s: float = 0.0


def machine_key(cfg: RunConfig, device: torch.device) -> dict:
    """What a throughput belongs to: the same model and precision on the same kind of device, with
    the same number of threads (a 2-core CPU at 1 thread is another machine)."""
    from .record import cpu_model

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return {"model": cfg.model.name, "precision": cfg.precision.name, "device": device.type,
            "hardware": gpu or cpu_model(), "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "world_size": cfg.train.devices * cfg.train.nodes}


LOOSE_KEY = ("model", "precision", "device", "world_size")  # another host of the same kind (a cluster's nodes)


@dataclass(frozen=True)
class FinishedRun:
    """What a completed run's record says about this machine's throughput."""
    run_id: str
    key: dict
    tokens_per_micro_batch: float
    flops_per_s: float


def finished_runs(results_dir: Path) -> list[FinishedRun]:
    """Every completed run under ``results_dir`` that carries a forecast and a training time (read once
    per question: a sweep's forecasts ask it for each of their runs)."""
    out = []
    for rec_path in Path(results_dir).glob("*/*/record.json"):
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        fc, m = rec.get("forecast") or {}, rec.get("metrics") or {}
        flops, secs, tok = m.get("plan/train_flops"), m.get("time/train_s"), fc.get("tokens_per_micro_batch")
        if rec.get("status") == "completed" and fc.get("key") and flops and secs and tok and secs > 0:
            out.append(FinishedRun(str(rec.get("run_id")), fc["key"], float(tok), flops / secs))
    return out


def from_finished_runs(runs: list[FinishedRun], key: dict, tokens_per_micro_batch: float,
                       exclude: str | None = None, loose: bool = False) -> Throughput | None:
    """The median FLOP/s of finished runs with this key and a similar micro-batch, or None. ``loose``:
    the same model, precision, device type and process count on any host (a SLURM sweep planned on
    its login node for its compute nodes)."""
    seen = []
    for r in runs:
        same = ({k: r.key.get(k) for k in LOOSE_KEY} == {k: key.get(k) for k in LOOSE_KEY}) if loose else r.key == key
        tok = r.tokens_per_micro_batch
        if r.run_id == exclude or not same or \
                max(tok, tokens_per_micro_batch) / max(min(tok, tokens_per_micro_batch), 1) > SIMILAR_SHAPE:
            continue
        seen.append((abs(math.log(tok / max(tokens_per_micro_batch, 1))), r.flops_per_s, r.run_id))
    if not seen:
        return None
    seen.sort()
    near = seen[: 5]
    rate = statistics.median(r for _, r, _ in near)
    return Throughput(rate, "runs", f"{len(near)} finished run(s) of this model and precision here "
                                    f"({', '.join(str(i) for _, _, i in near[:3])}{', ...' if len(near) > 3 else ''})")


def probe(model, batches, shape: Shape, device: torch.device, autocast_dtype, loss_head: str) -> Throughput | None:
    """Forward and backward of the run's first two micro-batches (no optimizer step): the second is
    timed. The model, its gradients and every RNG stream are as they were before."""
    from .loss import batch_loss_sum
    from .train import MODEL_INPUTS, autocast_context

    it = batches.epoch(0)
    chunk = [b for _, b in zip(range(2), it)]
    if not chunk:
        return None
    rng = (torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
    was = model.training
    model.train()
    t0 = time.perf_counter()
    timed = 0.0
    flops = 0.0
    try:
        for i, b in enumerate(chunk):
            inputs = {k: b[k].to(device) for k in MODEL_INPUTS if k in b}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            with autocast_context(device, autocast_dtype):
                loss = batch_loss_sum(model, inputs, loss_head) / max(b["n_loss_tokens"], 1)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i == len(chunk) - 1:  # the first pays for warm-up (allocator, kernels, thread pools)
                timed = time.perf_counter() - t
                rows, length = b["input_ids"].shape
                flops = micro_batch_flops(shape, rows, length, b["n_loss_tokens"])
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was)
        torch.random.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    probe_s = time.perf_counter() - t0
    if timed <= 0:
        return None
    return Throughput(flops / timed, "probe", f"probe: {len(chunk)} micro-batches of this run, the last timed "
                                            f"({timed:.3f} s)", probe_s=probe_s)


def capped(tp: Throughput, device: torch.device) -> Throughput:
    if device.type != "cuda":
        return tp
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak and tp.flops_per_s > peak:
        return Throughput(peak, tp.source, tp.detail + f"; capped at {name}'s bf16 peak", tp.probe_s)
    return tp


# ---------------------------------------------------------------- the forecast

@dataclass
class Forecast:
    train_flops: float
    val_flops: float
    tokens_per_micro_batch: float
    key: dict
    shape: Shape
    throughput: Throughput | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def train_s(self) -> float | None:
        return self.train_flops / self.throughput.flops_per_s if self.throughput else None

    @property
    def eval_s(self) -> float | None:
        return self.val_flops / self.throughput.flops_per_s if self.throughput and self.val_flops else None

    def metrics(self) -> dict:
        m = {"plan/train_flops": self.train_flops}
        if self.throughput:
            m["plan/train_s"] = self.train_s
            m["plan/throughput_tflops"] = self.throughput.flops_per_s / 1e12
            if self.eval_s is not None:
                m["plan/eval_s"] = self.eval_s
            if self.throughput.probe_s:
                m["time/probe_s"] = self.throughput.probe_s
        return m

    def record(self) -> dict:
        """The record's ``forecast`` field: where the throughput came from, and its key."""
        return {"key": self.key, "tokens_per_micro_batch": self.tokens_per_micro_batch,
                "source": self.throughput.source if self.throughput else None,
                "detail": self.throughput.detail if self.throughput else "no throughput: no probe, no finished run"}


def forecast_run(cfg: RunConfig, skeleton, prepared, n_steps: int, device: torch.device) -> Forecast:
    """The FLOPs of this run's training and validation, and its machine key (no throughput yet)."""
    shape = model_shape(cfg, skeleton)
    micro = trained_micro_batches(prepared.train, cfg.train.grad_accum, n_steps)
    train_flops = sum(micro_batch_flops(shape, *mb) for mb in micro)
    val_flops = 0.0
    if prepared.val is not None:
        evals = (n_steps // cfg.train.eval_every if cfg.train.eval_every else 0)
        full = sum(micro_batch_flops(shape, *mb, backward=False) for mb in batch_shapes(prepared.val, 0))
        val_flops = full if cfg.eval.val_loss else 0.0  # the final validation (time/val_s) ...
        if evals:  # ... and the periodic points (time/val_curve_s), eval_examples of it each
            n_ex = len(prepared.val.examples)
            val_flops += evals * full * min(1.0, cfg.train.eval_examples / max(n_ex, 1))
    tokens = statistics.fmean(r * t for r, t, _ in micro) if micro else 0.0
    return Forecast(train_flops, val_flops, tokens, machine_key(cfg, device), shape)


def measure(fc: Forecast, cfg: RunConfig, rid: str, model, prepared, device: torch.device, autocast_dtype) -> Forecast:
    """Give the forecast its throughput: finished runs like this one, else a probe of this run."""
    tp = from_finished_runs(finished_runs(Path(cfg.results_dir)), fc.key, fc.tokens_per_micro_batch, exclude=rid)
    if tp is None:
        tp = probe(model, prepared.train, fc.shape, device, autocast_dtype, cfg.train.loss_head)
    fc.throughput = capped(tp, device) if tp is not None else None
    return fc


def plan_forecast(cfg: RunConfig, device_type: str | None = None, loose: bool = False,
                  finished: list[FinishedRun] | None = None) -> Forecast | None:
    """The forecast `lorasweep-plan` prints, before any weight loads: the run's FLOPs from its skeleton
    and its own batches (tokenizer only), at the throughput of finished runs like it (none: no time).
    ``finished``: the results folder's finished runs, when the caller has read them already."""
    from . import data as data_stage, model as model_stage, train as train_stage

    if cfg.model.task != "causal_lm":
        return None
    device = torch.device(device_type or model_stage.pick_device(cfg.train.device).type)
    before = torch.get_num_threads()
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)  # the run's thread count is part of the machine
    try:
        tok = model_stage.load_tokenizer(cfg.model)
        prepared = data_stage.prepare_data(cfg.data, tok, max_seq_len=cfg.train.max_seq_len,
                                           batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                           group_by_length=cfg.train.group_by_length, packing=cfg.train.packing)
        steps = train_stage.total_steps(cfg.train, len(prepared.train))
        fc = forecast_run(cfg, model_stage.build_skeleton(cfg.model), prepared, steps, device)
        runs = finished if finished is not None else finished_runs(Path(cfg.results_dir))
        fc.throughput = from_finished_runs(runs, fc.key, fc.tokens_per_micro_batch, loose=loose)
    finally:
        torch.set_num_threads(before)
    return fc


# SLURM: the limit asked for a run is its forecast times this margin, plus a fixed allowance for what
# the forecast leaves out (loading, lm-eval, saving). The forecast was within +-25% per run on the CPU
# grid (docs/memory-and-planning.md): 1.5x covers that with room; a run that still overruns is
# checkpointed on SLURM's USR2 and requeued (launcher.max_num_timeout), so a tight limit costs a
# requeue, not the run.
SLURM_MARGIN = 1.5
SLURM_ALLOWANCE_MIN = 10


def slurm_timeout_min(seconds: float) -> int:
    return int(math.ceil(seconds * SLURM_MARGIN / 60.0)) + SLURM_ALLOWANCE_MIN
