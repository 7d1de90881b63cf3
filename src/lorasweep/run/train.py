"""The training loop: plain torch, readable top to bottom.

Accumulation, clipping, warmup + schedule, autocast / grad scaling; per-step loss, lr,
tokens/s and memory. The host reads loss values only on logging steps, so a GPU never
waits on a per-step sync.

One optimizer step, one objective: the step's loss is the mean over ALL its loss tokens (see
loss.py), so batch 8 x accum 1 and 2 x 4 train identically. An epoch's last step takes only that
epoch's leftover micro-batches, so ``epochs=1`` is exactly one pass. ``train/lr`` is the rate the
optimizer used in the logged step: lr x (step + 1) / warmup_steps during warmup (step counted
from 0), then the schedule over the remaining steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import OptimizerConfig, TrainConfig
from .data import Batches
from . import contention, preempt
from .checkpoint import Checkpointer, Progress, set_rng_state
from .loss import batch_loss_sum


# Packed batches carry position_ids instead of an attention mask (see packing.py).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class DivergedError(RuntimeError):
    pass


def decay_groups(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(decayed, not decayed) trainable parameters. Biases and normalisation weights never decay
    (transformers' ``get_decay_parameter_names`` convention): decaying a norm's gain towards 0 is
    not regularisation, it shrinks the layer."""
    norm_params = set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(p) in norm_params else decay).append((name, p))
    return decay, no_decay


def build_optimizer(groups: list[dict], oc: OptimizerConfig) -> torch.optim.Optimizer:
    """``groups``: torch param groups, each with its own ``weight_decay``. AdamW on CUDA is torch's
    fused kernel (one launch for all tensors instead of several per tensor); same update rule."""
    lr = oc.lr * oc.lr_factor
    if oc.name == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(oc.betas), fused=True if on_cuda else None)
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=oc.momentum)
    import bitsandbytes as bnb

    if oc.name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(groups, lr=lr, betas=tuple(oc.betas))
    if oc.name == "adamw_8bit":
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(oc.betas))
    raise ValueError(f"optimizer.name={oc.name!r}: unknown")


def param_groups(model: torch.nn.Module, oc: OptimizerConfig) -> tuple[list[dict], dict]:
    """Torch param groups (decayed / not) and what the record says about them. A parameter the
    adapter tagged with ``lr_scale`` (LoRA+'s B matrices) gets a group at optimizer.lr x lr_scale;
    the first group always runs at optimizer.lr (the logged train/lr)."""
    decay, no_decay = decay_groups(model)
    groups = [{"params": [p for _, p in decay if not hasattr(p, "lr_scale")], "weight_decay": oc.weight_decay}]
    if any(not hasattr(p, "lr_scale") for _, p in no_decay):
        groups.append({"params": [p for _, p in no_decay if not hasattr(p, "lr_scale")], "weight_decay": 0.0})
    scales = sorted({p.lr_scale for _, p in decay + no_decay if hasattr(p, "lr_scale")})
    for scale in scales:
        for params, wd in ((decay, oc.weight_decay), (no_decay, 0.0)):
            ps = [p for _, p in params if getattr(p, "lr_scale", None) == scale]
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": oc.lr * oc.lr_factor * scale})
    info = {"optimizer/lr": oc.lr * oc.lr_factor, "optimizer/decay_tensors": len(decay), "optimizer/no_decay_tensors": len(no_decay),
            "optimizer/decay_params": sum(p.numel() for _, p in decay),
            "optimizer/no_decay_params": sum(p.numel() for _, p in no_decay)}
    if scales:
        info["optimizer/scaled_lr_tensors"] = sum(hasattr(p, "lr_scale") for _, p in decay + no_decay)
    return groups, info


def lr_lambda(oc: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    warm = oc.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if oc.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        if oc.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return f


def total_steps(tc: TrainConfig, batches_per_epoch: int) -> int:
    if tc.max_steps is not None:
        return tc.max_steps
    return tc.epochs * math.ceil(batches_per_epoch / tc.grad_accum)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    first_loss: float | None
    train_s: float
    tokens: int
    loss_tokens: int
    epochs_done: float
    optimizer_info: dict | None = None
    earlier_mem: dict | None = None  # peak memory of the segments before a resume
    resumed_from_step: int | None = None
    hook_s: float = 0.0  # time in after_step (the validation curve): apart from train_s
    contention: dict | None = None  # what other work took of the machine while this segment trained

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s > 0 else 0.0

    def metrics(self) -> dict:
        """The record's training figures (one place for a one-process run and rank 0 of several)."""
        m = {"time/train_s": self.train_s, "throughput/tokens_per_s": self.tokens_per_s,
             "train/steps": self.steps, "train/tokens": self.tokens, "train/loss_tokens": self.loss_tokens,
             "train/epochs": self.epochs_done, **(self.optimizer_info or {})}
        if self.hook_s:
            m["time/val_curve_s"] = self.hook_s
        m.update(self.contention or {})
        if self.final_loss is not None:
            m["train/loss"] = self.final_loss
            m["train/first_loss"] = self.first_loss
        return m


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _optimizer_steps(train: Batches, grad_accum: int, epoch: int = 0, skip: int = 0):
    """(epoch, micro-batches done in that epoch, micro-batches) per optimizer step, epoch after
    epoch, from micro-batch ``skip`` of ``epoch`` on (a resumed run). An epoch's last step takes
    only its leftover micro-batches (as transformers' Trainer does)."""
    while True:
        chunk = []
        i = 0
        for i, b in enumerate(train.epoch(epoch), 1):
            if i <= skip:
                continue  # the order is seeded per epoch: skipping lands where the run stopped
            chunk.append(b)
            if len(chunk) == grad_accum:
                yield epoch, i, chunk
                chunk = []
        if chunk:
            yield epoch, i, chunk
        epoch, skip = epoch + 1, 0


def train(model: torch.nn.Module, train: Batches, oc: OptimizerConfig, tc: TrainConfig, *,
          device: torch.device, autocast_dtype: torch.dtype | None,
          log: Callable[[int, dict], None], memory=None, show_progress: bool = True,
          after_step: Callable[[int], None] | None = None,
          checkpointer: Checkpointer | None = None, resume: tuple[dict, dict] | None = None,
          shard=None) -> TrainResult:
    """``after_step(step)`` runs after every optimizer step (and its log line); it may raise to end
    the run there (e.g. a pruner that stops a losing run). ``checkpointer`` saves every
    ``train.checkpoint_every`` steps and when a stop signal arrives (preempt.py; then Interrupted is
    raised); ``resume`` = (trainable weights, state) of a checkpoint to continue from.
    ``shard`` (shard.Shard): this process is one rank of several; it trains on its rows of each
    global micro-batch through DDP, and the logged loss and stop requests are agreed over the ranks."""
    n_steps = total_steps(tc, len(train))
    if n_steps == 0:
        return TrainResult(0, None, None, 0.0, 0, 0, 0.0)
    groups, opt_info = param_groups(model, oc)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise RuntimeError("no trainable parameters: check lora.method / lora.targets")
    opt = build_optimizer(groups, oc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(oc, n_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    prog = Progress()
    if resume is not None:
        prog = _restore(model, opt, sched, scaler, *resume, shard=shard)

    model.train()
    # No KV cache while training: it costs time and memory, and with a cache transformers ignores
    # the position ids that keep packed examples apart. Restored after training (generation wants it).
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    steps = _optimizer_steps(train, tc.grad_accum, prog.epoch, prog.batches_in_epoch)
    # (token-mean loss, loss tokens) per step since the last log: the logged loss is token-weighted
    # A checkpoint holds the window summed over the ranks that wrote it: rank 0 (or the one process)
    # takes it back whole, the other ranks start from 0, so the logged sum counts each step once.
    own = shard is None or shard.rank == 0
    window: list[tuple[torch.Tensor, int]] = [(torch.tensor(l if own else 0.0, dtype=torch.float64, device=device), n)
                                              for l, n in prog.window]
    bar = tqdm(total=n_steps, initial=prog.step, desc="train", unit="step", disable=not show_progress,
               leave=False, dynamic_ncols=True)
    watch = contention.Watch(device)
    t0 = time.perf_counter()
    t_log, tok_log = t0, prog.tokens
    # Time in after_step (periodic validation) is kept out of train_s and tokens/s, so both mean the
    # same with and without train.eval_every (which the run id ignores); it is reported apart.
    hook_s = hook_since_log = 0.0
    for step in range(prog.step + 1, n_steps + 1):
        epoch, done_in_epoch, chunk = next(steps)
        step_items = sum(b["n_loss_tokens"] for b in chunk)  # known on the host before any forward
        step_loss = torch.zeros((), device=device)
        for i, b in enumerate(chunk):
            rows = b if shard is None else shard.rows(b)  # every rank holds the global micro-batch
            # pinned host memory: the copy to a GPU is a real async DMA (from pageable memory it syncs)
            inputs = {k: (rows[k].pin_memory() if device.type == "cuda" else rows[k]).to(device, non_blocking=True)
                      for k in MODEL_INPUTS if k in rows}
            if shard is None:
                with autocast_context(device, autocast_dtype):
                    loss = batch_loss_sum(model, inputs, tc.loss_head) / max(step_items, 1)
                scaler.scale(loss).backward()
            else:  # gradients all-reduced (averaged) on the step's last micro-batch only
                with shard.sync(last=i == len(chunk) - 1):
                    with autocast_context(device, autocast_dtype):
                        loss = shard.loss_sum(inputs, rows, tc.loss_head) / max(step_items, 1)
                    scaler.scale(loss * shard.world).backward()  # DDP's mean over ranks undoes the x world
            step_loss += loss.detach().float()  # this rank's part of the step's token mean
            prog.tokens += b["n_tokens"]
        prog.loss_tokens += step_items
        prog.micro_batches += len(chunk)
        if oc.max_grad_norm is not None:
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, oc.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm is a replicated DTensor
                grad_norm = grad_norm.full_tensor()
        else:
            grad_norm = None
        lr_used = opt.param_groups[0]["lr"]  # this step's rate; sched.step() below sets the next one
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        window.append((step_loss, step_items))
        bar.update(1)
        prog.step = step
        prog.epoch, prog.batches_in_epoch = (epoch + 1, 0) if done_in_epoch >= len(train) else (epoch, done_in_epoch)

        if step % tc.log_every == 0 or step == n_steps or step == 1:
            losses = torch.stack([l.double() for l, _ in window]).cpu()  # the one host sync, on logging steps only
            if shard is not None:
                losses = shard.sum_over_ranks(losses)  # the ranks' parts add up to the global token mean
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                bad_step = step - len(window) + 1 + int((~finite).nonzero()[0])
                raise DivergedError(f"diverged at step {bad_step} (loss {float(losses[~finite][0])})")
            weights = torch.tensor([n for _, n in window], dtype=torch.float64)
            loss_val = float((losses.double() * weights).sum() / weights.sum().clamp(min=1))
            prog.first_loss = float(losses[0]) if prog.first_loss is None else prog.first_loss
            prog.last_loss = loss_val
            now = time.perf_counter()
            rec = {"train/loss": loss_val, "train/lr": lr_used,
                   "train/epoch": epoch + done_in_epoch / max(len(train), 1),
                   "throughput/tokens_per_s": (prog.tokens - tok_log) / max(now - t_log - hook_since_log, 1e-9),
                   "train/tokens": prog.tokens}
            if grad_norm is not None:
                rec["train/grad_norm"] = float(grad_norm)
            if memory is not None:
                rec.update({f"mem/{k}": v for k, v in memory.current().items()})
            log(step, rec)
            bar.set_postfix(loss=f"{loss_val:.4f}")
            window.clear()
            t_log, tok_log, hook_since_log = now, prog.tokens, 0.0
        if after_step is not None:
            t_hook = time.perf_counter()
            try:
                after_step(step)
            except Exception as e:
                if isinstance(getattr(e, "metrics", None), dict):  # a hook ending the run (a pruner's verdict)
                    hook_s += time.perf_counter() - t_hook
                    train_s = prog.train_s + time.perf_counter() - t0 - hook_s
                    e.metrics.update({"time/train_s": train_s, "time/val_curve_s": prog.hook_s + hook_s,
                                      "train/tokens": prog.tokens, "throughput/tokens_per_s": prog.tokens / max(train_s, 1e-9),
                                      **watch.read()})
                    e.earlier_mem = prog.mem  # the peaks of the segments before a resume
                raise
            spent = time.perf_counter() - t_hook
            hook_s += spent
            hook_since_log += spent
        stop = preempt.requested() if shard is None else shard.agree_stop(preempt.requested())
        if checkpointer is not None and (checkpointer.due(step) or stop is not None) and step < n_steps:
            prog.window = _window_to_save(window, shard)
            seg_s = time.perf_counter() - t0 - hook_s
            checkpointer.save(model, opt, sched, scaler,
                              dataclasses.replace(prog, train_s=prog.train_s + seg_s, hook_s=prog.hook_s + hook_s,
                                                  mem=_max_mem(prog.mem, memory.snapshot() if memory else {})))
        if stop is not None and step < n_steps:
            raise preempt.Interrupted(stop, step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = prog.train_s + time.perf_counter() - t0 - hook_s  # all segments of a resumed run
    bar.close()
    if use_cache:
        config.use_cache = use_cache
    opt.zero_grad(set_to_none=True)
    del opt  # optimizer states are the run's, not the next phase's
    return TrainResult(n_steps, prog.last_loss, prog.first_loss, train_s, prog.tokens, prog.loss_tokens,
                       epochs_done=prog.micro_batches / max(len(train), 1), optimizer_info=opt_info,
                       earlier_mem=prog.mem, resumed_from_step=resume[1]["progress"]["step"] if resume else None,
                       hook_s=prog.hook_s + hook_s, contention=watch.read())


def _window_to_save(window: list, shard) -> list[tuple[float, int]]:
    """The unlogged steps' (loss, loss tokens), each loss the sum of every rank's part (a collective:
    every rank saves at the same step), so a relaunch on any number of processes logs it right."""
    if not window:
        return []
    losses = torch.stack([l.double() for l, _ in window]).cpu()
    if shard is not None:
        losses = shard.sum_over_ranks(losses)
    return [(float(v), n) for v, (_, n) in zip(losses, window)]


def _restore(model, opt, sched, scaler, weights: dict | None, state: dict, shard=None) -> Progress:
    """Put a checkpoint back: trainable weights, optimizer/scheduler/scaler states, RNG streams."""
    sharded_run = shard is not None and shard.fsdp
    if "sharded" in state:  # written by an fsdp run: its ranks' shards, read back by the ranks together
        if not sharded_run:
            raise RuntimeError(f"checkpoint {state['sharded']} was written by a train.strategy=fsdp run; resume "
                               "it with train.strategy=fsdp, or delete its checkpoints/ folder to start over")
        shard.load_sharded(opt, state["sharded"])
    else:
        if sharded_run:
            raise RuntimeError("this run's checkpoint was written without fsdp; resume it with the strategy "
                               "that wrote it (train.strategy=ddp or one process), or delete its checkpoints/ folder")
        own = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != own:
            raise RuntimeError(f"checkpoint does not fit this model: {len(set(weights) ^ own)} trainable tensors differ")
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint has tensors this model lacks: {result.unexpected_keys[:3]}")
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def _max_mem(a: dict, b: dict) -> dict:
    return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}
