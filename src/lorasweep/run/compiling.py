"""train.compile: torch.compile of the decoder for the training loop, its compile timed apart.

torch.compile is lazy: the first forward and backward trace the model and build its kernels. A
warm-up step on the first training batch pays for that before the clock of ``time/train_s``
starts, and ``time/compile_s`` records it. The warm-up trains nothing: its gradients are dropped
and the RNG streams put back, so training starts from the state it would have had without it
(compiled dropout still draws its masks with inductor's own generator, not eager's). A sequence
length the warm-up did not see recompiles inside training (then as dynamic shapes).

The decoder backbone is compiled in place (``nn.Module.compile``: parameter names unchanged, so
checkpoints and adapters save as usual); the output head and the chunked or fused loss stay as
they are. After training the backbone is eager again: validation and generation (lm-eval, with a
KV cache and a new length every token) would only recompile.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..config import TrainConfig
from .loss import unwrap_peft, batch_loss_sum, split_head

INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


def compiled_part(model: torch.nn.Module) -> torch.nn.Module:
    """What train.compile compiles: the decoder backbone (both loss paths call it), or the whole
    transformers model where the head cannot be split off."""
    parts = split_head(model)
    return parts.backbone if parts is not None else (unwrap_peft(model) or model)


def compile_for_training(model: torch.nn.Module, train, tc: TrainConfig, *, device: torch.device,
                         autocast_dtype: torch.dtype | None, backend: str | None = None) -> dict[str, float]:
    """Compile (when ``train.compile``) and warm up on the first batch; the metrics to record.
    ``backend``: torch.compile's (default inductor)."""
    if not tc.compile or tc.max_steps == 0:  # nothing to train: nothing to compile
        return {}
    t0 = time.perf_counter()
    compiled_part(model).compile(**({"backend": backend} if backend else {}))
    batch = next(iter(train.epoch(0)), None)
    if batch is not None:
        _warm_up(model, batch, tc.loss_head, device, autocast_dtype)
    return {"time/compile_s": time.perf_counter() - t0}


def uncompile(model: torch.nn.Module) -> None:
    """Every module of ``model`` back to its eager forward (a no-op where none was compiled)."""
    for m in model.modules():
        if m._compiled_call_impl is not None:
            m._compiled_call_impl = None


def _warm_up(model: torch.nn.Module, batch: dict, loss_head: str, device: torch.device,
             autocast_dtype: torch.dtype | None) -> None:
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.train()
    if use_cache:
        config.use_cache = False  # as in the train loop: the same graph is compiled
    ctx = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        inputs = {k: batch[k].to(device) for k in INPUTS if k in batch}
        with ctx:
            loss = batch_loss_sum(model, inputs, loss_head)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache
