"""Predict a run's peak memory before any weight loads: parameters x bytes, plus what trains
(gradients, optimizer states), plus activations, plus the runtime's own footprint.

A pure function of the run config and the model skeleton (meta device, no memory):
``plan(cfg, skeleton, device_type) -> Plan``. The CPU figure predicts the process's peak resident
set (what mem/peak_rss_gb records); the CUDA figure predicts torch's peak allocated memory
(mem/peak_allocated_gb). Coefficients below were calibrated with benchmarks/memory_calibration.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import RunConfig

GB = 1e9  # decimal GB, like the measured figures
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "nf4": 0.5, "fp4": 0.5}
BNB_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax constant per 64 weights
BNB_DQ_BLOCK = 256  # double quantization: absmax in 8 bits, one fp32 constant per 256 absmax
BNB_8BIT_MIN = 4096  # bitsandbytes 8-bit optimizers keep 32-bit states for smaller tensors
BNB_8BIT_BLOCK = 256  # 8-bit optimizer states: one fp32 absmax per 256 values
BNB_PAGED_MIN = 100_000  # paged optimizers page only tensors this large; smaller states are plain CUDA tensors
# CUDA: what the device holds beyond torch's peak allocated figure, for planner.budget_gb: the CUDA
# context (driver, cuBLAS/cuDNN handles and kernels; ~0.5 GB on an H100 with lazy module loading)
# and the caching allocator's rounding and fragmentation (peak reserved / peak allocated - 1).
# Estimates; benchmarks/gpu_check.py measures both on the machine it runs on.
CUDA_CONTEXT_GB = 0.6
CUDA_ALLOCATOR_SLACK = 0.10

# Process RSS of a `lorasweep` run whose model is negligible (tiny_llama): python, torch,
# transformers, peft, hydra, the data and the CPU kernels' own buffers. Calibrated here.
CPU_RUNTIME_GB = 0.50
# Saved activations per token and decoder layer, in elements (fp32 LoRA on Llama, measured with
# torch.autograd.graph.saved_tensors_hooks): norms, q/k/v, rope, attention, residuals ~ 7*h;
# the gated MLP (gate, act, up) 3*i; k and v 2*kv. A LoRA module adds its input copy and r.
ACT_H, ACT_I, ACT_KV = 7.0, 3.0, 2.0
# The loss: fp32 log-softmax kept for backward, plus the logits and their gradient at its peak.
LOGIT_COPIES = 3.0
# CPU: transients on top of the saved activations (logit gradients, oneDNN scratch, blocks glibc
# keeps); fitted on smollm2_135m fp32 LoRA, b1 x s128 (1.42 GB measured).
CPU_ACT_SLACK = 1.6
# 4-bit on CPU: bitsandbytes dequantizes every weight at every matmul (forward and backward) and
# glibc keeps the freed blocks, so the second step starts higher and grows further than in fp32
# (in-process, b4 x s256: start-to-peak 3.5 GB vs 2.65 GB). Fitted on smollm2_135m nf4: b4 x s256
# (4.28 GB measured) and b1 x s128 (1.17 GB); the fp32 logits it once hid are gone (loss.py).
CPU_ACT_SLACK_4BIT = 2.1


@dataclass
class Plan:
    device: str
    params_total: int  # base + adapter, counted like the real model (4-bit weights as weights)
    params_trainable: int
    params_quantized: int
    weights_gb: float  # base weights at their storage precision
    quant_constants_gb: float
    trainable_gb: float  # LoRA A/B (or the trained base weights, already in weights_gb for full/partial)
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    runtime_gb: float  # CPU: process baseline; CUDA: 0 (allocated memory excludes the context)
    peak_gb: float
    tokens: int
    notes: list[str] = field(default_factory=list)
    # transient working memory of the adapter's initialisation (PiSSA's SVD, OLoRA's QR), one module
    # at a time, before any activation exists; the peak is the larger of init and training
    init_gb: float = 0.0
    # mixed precision: the 16-bit copies autocast makes of fp32 linear weights and keeps for backward
    autocast_copies_gb: float = 0.0

    @property
    def device_gb(self) -> float:
        """What the device must hold, compared with planner.budget_gb: the peak itself on a CPU (RSS
        includes the process); on CUDA the peak allocated plus allocator slack and the CUDA context."""
        if self.device != "cuda":
            return self.peak_gb
        return self.peak_gb * (1 + CUDA_ALLOCATOR_SLACK) + CUDA_CONTEXT_GB

    def metrics(self) -> dict[str, float]:
        keys = ("weights_gb", "quant_constants_gb", "trainable_gb", "grads_gb", "optimizer_gb",
                "activations_gb", "runtime_gb", "peak_gb") + (("init_gb",) if self.init_gb else ())
        keys += ("autocast_copies_gb",) if self.autocast_copies_gb else ()
        out = {f"plan/{k}": round(getattr(self, k), 4) for k in keys}
        if self.device == "cuda":
            out["plan/device_gb"] = round(self.device_gb, 4)
        out["plan/params_trainable"] = self.params_trainable
        out["plan/params_total"] = self.params_total
        return out

    def table(self) -> str:
        rows = [("base weights", self.weights_gb), ("quantization constants", self.quant_constants_gb),
                ("trainable (adapter) weights", self.trainable_gb), ("gradients", self.grads_gb),
                ("optimizer states", self.optimizer_gb), (f"activations ({self.tokens} tokens/micro-batch)", self.activations_gb),
                ("runtime" + (" (process baseline)" if self.device == "cpu" else ""), self.runtime_gb)]
        if self.init_gb:
            rows.append(("adapter init working memory (transient)", self.init_gb))
        if self.autocast_copies_gb:
            rows.append(("autocast's 16-bit weight copies", self.autocast_copies_gb))
        what = "peak RSS" if self.device == "cpu" else "peak allocated"
        lines = [f"  {name:<40s} {gb:8.3f} GB" for name, gb in rows]
        lines.append(f"  {'predicted ' + what:<40s} {self.peak_gb:8.3f} GB")
        if self.device == "cuda":
            lines.append(f"  {'+ allocator slack and CUDA context':<40s} {self.device_gb:8.3f} GB  (vs planner.budget_gb)")
        pct = 100.0 * self.params_trainable / max(self.params_total, 1)
        lines.append(f"  params: total {self.params_total:,}, trainable {self.params_trainable:,} ({pct:.4f}%)"
                     + (f", 4-bit {self.params_quantized:,}" if self.params_quantized else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _linear_modules(skeleton: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    from .adapter import linear_module_names

    names = set(linear_module_names(skeleton))
    return {n: m for n, m in skeleton.named_modules() if n in names}


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _head_names(skeleton: torch.nn.Module, task: str) -> list[str]:
    from .adapter import HEAD_NAMES

    return [h for h in HEAD_NAMES if hasattr(skeleton, h)] if task == "sequence_classification" else []


def _optimizer_bytes(name: str, numels: list[int], param_bytes: int, device_type: str = "cpu") -> float:
    if name == "adamw":
        return sum(2 * n * param_bytes for n in numels)
    if name == "sgd":
        return sum(n * param_bytes for n in numels)  # momentum buffer (none when momentum=0)
    # 8-bit AdamW: two 1-byte states (+ one fp32 absmax per 256) for big tensors, fp32 for small ones.
    # Paged on CUDA: tensors of 100k+ elements live in unified memory, outside torch's allocated
    # figure; the smaller ones (LoRA A/B of r=8 on 4096 wide layers: 32k) are ordinary CUDA tensors.
    paged = name == "paged_adamw_8bit" and device_type == "cuda"
    return sum(0.0 if paged and n >= BNB_PAGED_MIN else
               2 * n * (1 + 4 / BNB_8BIT_BLOCK) if n >= BNB_8BIT_MIN else 2 * n * 4 for n in numels)


def plan(cfg: RunConfig, skeleton: torch.nn.Module, device_type: str = "cpu", seq_len: int | None = None,
         loss_tokens: int | None = None) -> Plan:
    """The memory plan of one run on this device type ('cpu' or 'cuda').
    seq_len: the longest batch the data will make (batches are padded to their longest example);
    None assumes every sequence fills train.max_seq_len. loss_tokens: the most loss tokens one
    example holds (the labelled positions the loss head sees); None assumes every position."""
    from .adapter import resolve_targets

    hf = skeleton.config
    pr, lo, tr = cfg.precision, cfg.lora, cfg.train
    quant = pr.quant != "none"
    notes: list[str] = []
    # The dtype the forward runs in, and the dtype non-quantized base parameters are stored in.
    if quant:
        cdt = pr.compute_dtype if pr.compute_dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
        # peft's prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32; the run
        # casts the frozen ones back (model.keep_compute_dtype): activations in the compute dtype
        other_dt = cdt
        act_dt = cdt
    else:
        other_dt = pr.weights_dtype
        act_dt = pr.autocast if pr.autocast != "none" else pr.weights_dtype
    e = BYTES[act_dt]

    linears = _linear_modules(skeleton)
    quantized = {n: m for n, m in linears.items()} if quant else {}
    n_quant = sum(m.weight.numel() for m in quantized.values())
    seen, n_total = set(), 0
    for p in skeleton.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            n_total += p.numel()
    n_other = n_total - n_quant
    weights = n_other * BYTES[other_dt] + n_quant * BYTES[pr.quant if quant else other_dt]
    # Mixed precision: autocast runs every linear in 16 bits. A LoRA run stores its frozen linears so
    # (model.load_kwargs; norms and embeddings, and a head tied to them, stay fp32); otherwise each
    # fp32 linear weight gets a 16-bit copy per forward, kept for backward.
    autocast_copies = 0.0
    if pr.autocast != "none" and not quant and pr.weights_dtype == "float32":
        non_linear = {id(q) for m in skeleton.modules() if not isinstance(m, torch.nn.Linear)
                      for q in m.parameters(recurse=False)}
        n_lin = sum(q.numel() for m in skeleton.modules() if isinstance(m, torch.nn.Linear)
                    for q in m.parameters(recurse=False) if id(q) not in non_linear)
        if lo.method == "lora" and lo.bias == "none" and cfg.model.task == "causal_lm":
            weights -= n_lin * (4 - BYTES[pr.autocast])
        else:
            autocast_copies = n_lin * BYTES[pr.autocast]
    qconst = 0.0
    if quant:
        blocks = n_quant / BNB_BLOCK
        qconst = blocks * 1 + (blocks / BNB_DQ_BLOCK) * 4 if pr.double_quant else blocks * 4

    heads = _head_names(skeleton, cfg.model.task)
    trainable_numels: list[int] = []
    adapter_params = 0
    lora_modules: dict[str, torch.nn.Linear] = {}
    ranks: dict[str, int] = {}
    init_bytes = 0.0
    if lo.method == "lora":
        from .adapter import lora_modules as adapted
        from ..config import lora_variant, rewrites_base

        targets = resolve_targets(lo.targets, skeleton)
        # peft's own matching: targets, layers_to_transform, exclude_modules, rank_pattern
        ranks = {n: r for n, (r, _) in adapted(lo, skeleton, heads).items()}
        lora_modules = {n: linears[n] for n in ranks}
        for n, m in lora_modules.items():
            trainable_numels += [ranks[n] * m.in_features, ranks[n] * m.out_features]
            if lo.use_dora:  # DoRA: one trained magnitude per output row
                trainable_numels.append(m.out_features)
        for h in heads:  # modules_to_save: a trainable copy of the classification head
            trainable_numels += [p.numel() for p in getattr(skeleton, h).parameters()]
        adapter_params = sum(trainable_numels)
        train_bytes_per = 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype)
        trainable_gb = adapter_params * 4 / GB
        if rewrites_base(lo):  # the adapter's start (A0, B0) is kept to save a plain LoRA at the end
            trainable_gb *= 2
        init_bytes = _init_working_bytes(lo, lora_modules, ranks, BYTES[other_dt])
        if rewrites_base(lo) and device_type == "cpu":
            # the residual W - s*B0*A0 is new memory, while the checkpoint's memory-mapped pages of W
            # stay resident (measured on SmolLM2, all linear: +0.49 GB RSS after PiSSA init)
            residual = sum(m.in_features * m.out_features for m in lora_modules.values()) * BYTES[other_dt]
            weights += residual
            notes.append(f"{lo.init}: the residual weights are a second copy beside the mapped checkpoint "
                         f"(+{residual / GB:.3f} GB)")
        rs = sorted(set(ranks.values())) or [lo.r]
        rtxt = f"r={rs[0]}" if len(rs) == 1 else f"r={rs[0]}..{rs[-1]}"
        notes.append(f"{lora_variant(lo)} {rtxt} on {len(lora_modules)} modules ({', '.join(targets)})")
    else:
        pats = None if lo.method == "full" else resolve_targets(lo.trainable, skeleton, field_name="lora.trainable")
        for n, p in skeleton.named_parameters():
            mod = n.rsplit(".", 1)[0]
            hit = pats is None or _matches(mod, pats) or any(mod == h or mod.startswith(h + ".") for h in heads)
            if hit:
                trainable_numels.append(p.numel())
        train_bytes_per = BYTES[pr.weights_dtype]
        trainable_gb = 0.0  # they are base weights, counted above
    n_trainable = sum(trainable_numels)
    grads = n_trainable * train_bytes_per
    optim = _optimizer_bytes(cfg.optimizer.name, trainable_numels, train_bytes_per, device_type)
    if cfg.optimizer.name == "sgd" and cfg.optimizer.momentum == 0:
        optim = 0.0
    if cfg.optimizer.name == "paged_adamw_8bit" and device_type == "cuda":
        notes.append(f"paged optimizer states of tensors >= {BNB_PAGED_MIN:,} elements live in CUDA unified "
                     "memory, outside torch's allocated figure")

    # Activations for one micro-batch at the full sequence length (the worst case).
    seq = min(seq_len, tr.max_seq_len) if seq_len else tr.max_seq_len
    tokens = tr.batch_size * seq
    h = hf.hidden_size
    layers = hf.num_hidden_layers
    inter = getattr(hf, "intermediate_size", 4 * h) or 4 * h
    heads_n = getattr(hf, "num_attention_heads", 1)
    kv = getattr(hf, "num_key_value_heads", heads_n) * (getattr(hf, "head_dim", None) or h // heads_n)
    per_layer = ACT_H * h + ACT_I * inter + ACT_KV * kv
    # LoRA keeps A's output (r) per module; with dropout > 0 also the dropped copy of the input and
    # its 1-byte mask (with dropout 0, lora_A reads the very tensor the base layer already keeps).
    x_bytes, r_bytes = _lora_saved_bytes(pr, lo.dropout, device_type)
    lora_in = sum(m.in_features for m in lora_modules.values()) * x_bytes / e  # in units of e bytes
    lora_per_layer = (lora_in + sum(ranks.values()) * r_bytes / e) / max(layers, 1)
    dora_transient = 0.0
    if lo.method == "lora" and lo.use_dora:
        # DoRA keeps the base output and the scaled LoRA output of every module for the magnitude's
        # gradient; with dropout it recomputes the base matmul on the dropped input, which keeps
        # the weight (a dequantized copy for 4-bit) alive for backward.
        lora_per_layer += 2 * sum(m.out_features for m in lora_modules.values()) / max(layers, 1)
        if lo.dropout > 0 and quant:
            dora_kept = sum(m.in_features * m.out_features for m in lora_modules.values()) * e
        else:
            dora_kept = 0.0
        # each forward builds ||W + s*B*A|| row norms: W + s*B*A, B*A through an identity (in x in),
        # and for 4-bit the dequantized W, all fp32, one module at a time
        dora_transient = dora_kept + max(((m.in_features ** 2 + (3 if quant else 2) * m.in_features * m.out_features) * 4
                                          for m in lora_modules.values()), default=0.0)
        notes.append("DoRA: magnitude vectors, 2 x out_features kept per token and module, weight-norm transients")
    if lo.method != "lora" and n_trainable:
        # trained base linears keep their inputs (~ one h and one i per layer beyond the frozen case)
        per_layer += h + inter
    vocab = getattr(hf, "vocab_size", 0) if cfg.model.task == "causal_lm" else 0
    if tr.grad_checkpointing:
        # only each layer's input is kept; one layer is recomputed at a time
        act = tokens * e * (layers * h + per_layer + lora_per_layer)
        notes.append("gradient checkpointing: one layer's activations at a time")
    else:
        act = tokens * e * layers * (per_layer + lora_per_layer)
    # The loss's fp32 logits: at every position (train.loss_head=full), or only at the labelled
    # positions, one chunk of them at a time (loss.py): the smaller of the two counts
    loss_rows = tokens
    if tr.loss_head == "labelled" and vocab:
        from .loss import chunk_positions

        labelled = min(tokens, tr.batch_size * loss_tokens) if loss_tokens else tokens
        loss_rows = min(labelled, chunk_positions(vocab))
        notes.append(f"loss: output head at labelled positions only, at most {loss_rows} rows of logits at a time")
    act += tokens * 3 * h * e + loss_rows * LOGIT_COPIES * 4 * vocab
    if device_type == "cpu":
        act *= CPU_ACT_SLACK_4BIT if quant else CPU_ACT_SLACK
    act += dora_transient
    if quant and device_type == "cuda":
        # bitsandbytes dequantizes one layer's weight to the compute dtype per matmul (forward and backward)
        act += max((m.in_features * m.out_features for m in quantized.values()), default=0) * e
    runtime = CPU_RUNTIME_GB * GB if device_type == "cpu" else 0.0
    world = tr.devices * tr.nodes  # a run on several processes: this plan is one rank's
    loaded_whole = weights + qconst + trainable_gb * GB
    if world > 1 and tr.strategy == "fsdp":
        # FSDP: each rank keeps 1/world of every weight, gradient and optimizer state, and gathers one
        # transformer block's weights at a time (an even share of the weights per block)
        gathered = weights / max(layers, 1)
        weights, grads, optim = weights / world + gathered, grads / world, optim / world
        trainable_gb /= world
        notes.append(f"fsdp over {world} ranks: weights, gradients and optimizer states / {world}, "
                     f"plus one block gathered ({gathered / GB:.3f} GB); the model loads whole before sharding")
    elif world > 1:
        notes.append(f"ddp over {world} ranks: every rank holds the whole model and its optimizer states")
    peak = weights + qconst + trainable_gb * GB + grads + optim + act + runtime + autocast_copies
    peak = max(peak, loaded_whole + runtime)  # each rank loads the whole model before it shards it
    # the init transient comes before gradients, optimizer states and activations exist
    peak = max(peak, weights + qconst + trainable_gb * GB + runtime + init_bytes)
    if init_bytes:
        notes.append(f"{lo.init} init: {init_bytes / GB:.3f} GB transient for the largest module's decomposition")
    if seq_len:
        notes.append(f"activations for the data's longest batch: {tr.batch_size} x {seq} tokens")
    elif tr.packing or tr.batch_size > 1:
        notes.append("activations assume every sequence fills train.max_seq_len (an upper bound)")
    return Plan(device=device_type, params_total=n_total + adapter_params, params_trainable=n_trainable,
                params_quantized=n_quant, weights_gb=weights / GB, quant_constants_gb=qconst / GB,
                trainable_gb=trainable_gb, grads_gb=grads / GB, optimizer_gb=optim / GB,
                activations_gb=act / GB, runtime_gb=runtime / GB, peak_gb=peak / GB, tokens=tokens, notes=notes,
                init_gb=init_bytes / GB, autocast_copies_gb=autocast_copies / GB)


def _lora_saved_bytes(pr, dropout: float, device_type: str) -> tuple[float, float]:
    """Bytes kept for backward per element of a LoRA module's input, and per element of lora_A's
    output (r per token), by what peft's forward does in each precision:
    - no autocast: x is cast to the adapter's fp32 (a new tensor when x is 16-bit, as in bf16_true:
      lora_A keeps it even with dropout 0); dropout keeps its output and a 1-byte mask;
    - autocast (mixed; 4-bit with a 16-bit compute dtype, where peft's bnb layer skips the cast on
      CUDA): lora_A keeps the 16-bit cast of its input; dropout adds its mask."""
    autocast = pr.autocast if pr.autocast != "none" else None
    if pr.quant != "none":
        cdt = pr.compute_dtype if pr.compute_dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
        autocast = cdt if cdt != "float32" and device_type == "cuda" else None
        x_dt = cdt
    else:
        x_dt = pr.weights_dtype
    drop = dropout > 0
    if autocast is not None:
        a = BYTES[autocast]
        # a 16-bit x is itself what lora_A keeps (the base layer keeps nothing of a frozen linear's input
        # beyond what the layer count already holds); an fp32 x (mixed) is cast, a new 16-bit tensor
        x = (a + 1 if drop else (a if BYTES[x_dt] == 4 else 0.0))
        return x, a
    if drop:
        return 4 + 1, 4
    return (4.0 if BYTES[x_dt] < 4 else 0.0), 4


def _init_working_bytes(lo, modules: dict, ranks: dict, weight_bytes: float) -> float:
    """Transient bytes of the largest module's PiSSA/OLoRA initialisation (peft's pissa_init /
    olora_init, fp32): the decomposition's factors, B*A and the new residual weight, plus an fp32
    copy of W when it is stored narrower. Default/gaussian init allocates nothing beyond A and B."""
    worst = 0.0
    for n, m in modules.items():
        o, i, r = m.out_features, m.in_features, ranks[n]
        k = min(o, i)
        copy = o * i * 4 if weight_bytes < 4 else 0
        if lo.init == "pissa" or lo.init == "olora":  # full SVD: U (o x k), S, Vh (k x i); QR: Q, R
            b = (o * k + k * i + k) * 4 + 2 * o * i * 4 + copy
        elif lo.init.startswith("pissa_niter_"):  # randomized SVD: thin (o x r), (i x r) factors
            b = 3 * (o + i) * r * 4 + 2 * o * i * 4 + copy
        else:
            continue
        worst = max(worst, b)
    return worst


def data_seq_len(cfg: RunConfig) -> int | None:
    """The longest example of the run's own data (tokenized without weights), or None if unknown."""
    from . import data as data_stage, model as model_stage

    if cfg.model.task != "causal_lm" or cfg.train.packing:
        return None  # packed batches fill max_seq_len; classifiers size by their own data
    return data_stage.longest_example(cfg.data, model_stage.load_tokenizer(cfg.model), cfg.train.max_seq_len)


def data_loss_tokens(cfg: RunConfig) -> int | None:
    """The most loss tokens one example of the run's own data holds, or None if unknown."""
    from . import data as data_stage, model as model_stage

    if cfg.model.task != "causal_lm" or cfg.train.packing:
        return None  # a packed row may be labelled throughout
    return data_stage.most_loss_tokens(cfg.data, model_stage.load_tokenizer(cfg.model), cfg.train.max_seq_len)


def plan_run(cfg: RunConfig, device_type: str | None = None, skeleton=None, seq_len: int | None | str = "data") -> Plan:
    """Build the skeleton (meta device) and plan; the device is the one the run would pick."""
    from . import model as model_stage

    if device_type is None:
        device_type = model_stage.pick_device(cfg.train.device).type
    if skeleton is None:
        skeleton = model_stage.build_skeleton(cfg.model)
    loss_tokens = None
    if seq_len == "data":
        seq_len = data_seq_len(cfg)
        loss_tokens = data_loss_tokens(cfg) if seq_len else None
    return plan(cfg, skeleton, device_type, seq_len=seq_len, loss_tokens=loss_tokens)
