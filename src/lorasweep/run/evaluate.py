"""Validation loss and perplexity on the in-memory model (token-weighted over the whole split)."""
from __future__ import annotations

import contextlib
import math
import time

import torch

from .data import Batches
from .loss import batch_loss_sum


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: Batches, *, device: torch.device,
                    autocast_dtype: torch.dtype | None, loss_head: str = "labelled",
                    loss_sum=None) -> dict[str, float]:
    """``loss_sum(inputs)``: the batch's loss sum, when not ``batch_loss_sum(model, ...)`` (a run on
    several processes passes its sharded loss module, whose forward every rank must call)."""
    if loss_sum is None:
        loss_sum = lambda inputs: batch_loss_sum(model, inputs, loss_head)  # noqa: E731
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    ctx = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for b in val.epoch(0):
        with ctx:  # the training objective's sum, so val/loss and train/loss are on one basis
            total += loss_sum({k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}).double()
        count += b["n_loss_tokens"]
    model.train(was_training)
    loss = float(total) / max(count, 1)
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)), "val/tokens": count,
            "time/val_s": time.perf_counter() - t0}


def named_validation_losses(model: torch.nn.Module, sets: dict[str, Batches], **kw) -> dict[str, float]:
    """val/<name>/loss and val/<name>/perplexity for each further validation set (eval.val_sets)."""
    out: dict[str, float] = {}
    for name, batches in sets.items():
        m = validation_loss(model, batches, **kw)
        out.update({f"val/{name}/loss": m["val/loss"], f"val/{name}/perplexity": m["val/perplexity"],
                    f"val/{name}/tokens": m["val/tokens"]})
        out["time/val_s"] = out.get("time/val_s", 0.0) + m["time/val_s"]
    return out
