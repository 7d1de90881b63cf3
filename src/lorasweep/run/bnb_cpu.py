"""Keep bitsandbytes' 4-bit layers on the one CPU path that training can share with evaluation.

On CPUs with AVX512-BF16 (AMD EPYC Zen 4+, Intel Sapphire Rapids+), bitsandbytes 0.48+ gives
``Linear4bit.forward`` a fused inference path: the first forward in eval mode without grad
*rewrites the weight in place* (``_convert_weight_packed_for_cpu``): the 4-bit codes are re-laid
out in 32-row tiles and the double-quantized absmax scales are dequantized and rounded to bf16.
From then on every forward of that layer, training ones included, goes through ``gemv_4bit``,
which computes with the rounded scales and gives the layer's input no gradient; peft's DoRA and
LoftQ dequantize the packed bytes as if they were the usual layout. So one validation pass (or a
base score taken before training) changed the training after it, and a layer whose output size
is not a multiple of 32 failed its assert (``N must be divisible by block_n``).

lorasweep trains and evaluates the same weights, so it switches the fused path off on every
4-bit layer (the module's own ``support_avx512bf16_for_cpu`` flag, read on each forward) and
unpacks any layer already packed: every CPU then computes what a CPU without AVX512-BF16 does.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _linear4bit_type():
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no 4-bit layers to keep
        return None
    return bnb.nn.Linear4bit


def keep_dequantize_path(model: torch.nn.Module) -> int:
    """Switch bitsandbytes' fused AVX512-BF16 inference path off on every 4-bit layer of ``model``
    (unpacking a layer it already packed); returns how many layers had it on."""
    cls = _linear4bit_type()
    if cls is None:
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    switched = 0
    for mod in model.modules():
        if not isinstance(mod, cls):
            continue
        w = mod.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
            mod.quant_state = w.quant_state
        if getattr(mod, "support_avx512bf16_for_cpu", False):
            switched += 1
        mod.support_avx512bf16_for_cpu = False
    if switched:
        log.debug("bitsandbytes' fused AVX512-BF16 4-bit path switched off on %d layers", switched)
    return switched


def packed_layers(model: torch.nn.Module) -> list[str]:
    """Names of 4-bit layers whose weight bitsandbytes has re-laid out for its fused CPU path."""
    cls = _linear4bit_type()
    if cls is None:
        return []
    return [n for n, m in model.named_modules()
            if isinstance(m, cls) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
