"""The training loop: plain torch, readable top to bottom.

Accumulation, clipping, warmup + schedule, autocast / grad scaling; per-step loss, lr,
tokens/s and memory. The host reads loss values only on logging steps, so a GPU never
waits on a per-step sync.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .config import OptimizerConfig, TrainConfig
from .data import Batches


# Packed batches carry position_ids instead of an attention mask (see packing.py).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class DivergedError(RuntimeError):
    pass


def build_optimizer(params: list[torch.nn.Parameter], oc: OptimizerConfig) -> torch.optim.Optimizer:
    if oc.name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, weight_decay=oc.weight_decay, betas=tuple(oc.betas))
    if oc.name == "sgd":
        return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    import bitsandbytes as bnb

    if oc.name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=oc.lr, weight_decay=oc.weight_decay, betas=tuple(oc.betas))
    if oc.name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=oc.lr, weight_decay=oc.weight_decay, betas=tuple(oc.betas))
    raise ValueError(f"optimizer.name={oc.name!r}: unknown")


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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s > 0 else 0.0


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _micro_batches(train: Batches):
    """Batches forever, epoch after epoch, with the epoch number."""
    epoch = 0
    while True:
        for b in train.epoch(epoch):
            yield epoch, b
        epoch += 1


def train(model: torch.nn.Module, train: Batches, oc: OptimizerConfig, tc: TrainConfig, *,
          device: torch.device, autocast_dtype: torch.dtype | None,
          log: Callable[[int, dict], None], memory=None, show_progress: bool = True) -> TrainResult:
    n_steps = total_steps(tc, len(train))
    params = [p for p in model.parameters() if p.requires_grad]
    if n_steps == 0:
        return TrainResult(0, None, None, 0.0, 0, 0, 0.0)
    if not params:
        raise RuntimeError("no trainable parameters: check lora.method / lora.targets")
    opt = build_optimizer(params, oc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(oc, n_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    model.train()
    # No KV cache while training: it costs time and memory, and with a cache transformers ignores
    # the position ids that keep packed examples apart. Restored after training (generation wants it).
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    batches = _micro_batches(train)
    window: list[torch.Tensor] = []  # detached per-step losses since the last log
    tokens = loss_tokens = 0
    first_loss = last_loss = None
    epoch = 0
    bar = tqdm(total=n_steps, desc="train", unit="step", disable=not show_progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    t_log, tok_log = t0, 0
    for step in range(1, n_steps + 1):
        step_loss = torch.zeros((), device=device)
        for _ in range(tc.grad_accum):
            epoch, b = next(batches)
            inputs = {k: b[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in b}
            with _autocast(device, autocast_dtype):
                out = model(**inputs)
            loss = out.loss / tc.grad_accum
            scaler.scale(loss).backward()
            step_loss += loss.detach().float()
            tokens += b["n_tokens"]
            loss_tokens += b["n_loss_tokens"]
        if oc.max_grad_norm is not None:
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, oc.max_grad_norm)
        else:
            grad_norm = None
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        window.append(step_loss)
        bar.update(1)

        if step % tc.log_every == 0 or step == n_steps or step == 1:
            losses = torch.stack(window).cpu()  # the one host sync, on logging steps only
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                bad_step = step - len(window) + 1 + int((~finite).nonzero()[0])
                raise DivergedError(f"diverged at step {bad_step} (loss {float(losses[~finite][0])})")
            loss_val = float(losses.mean())
            first_loss = float(losses[0]) if first_loss is None else first_loss
            last_loss = loss_val
            now = time.perf_counter()
            rec = {"train/loss": loss_val, "train/lr": sched.get_last_lr()[0], "train/epoch": epoch,
                   "throughput/tokens_per_s": (tokens - tok_log) / max(now - t_log, 1e-9),
                   "train/tokens": tokens}
            if grad_norm is not None:
                rec["train/grad_norm"] = float(grad_norm)
            if memory is not None:
                rec.update({f"mem/{k}": v for k, v in memory.current().items()})
            log(step, rec)
            bar.set_postfix(loss=f"{loss_val:.4f}")
            window.clear()
            t_log, tok_log = now, tokens
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    bar.close()
    if use_cache:
        config.use_cache = use_cache
    opt.zero_grad(set_to_none=True)
    del opt  # optimizer states are the run's, not the next phase's
    return TrainResult(n_steps, last_loss, first_loss, train_s, tokens, loss_tokens,
                       epochs_done=n_steps * tc.grad_accum / max(len(train), 1))
