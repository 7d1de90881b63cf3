"""Shared bits of the benchmark scripts: model building, timing, printing."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorasweep.run import model as model_stage  # noqa: E402
from lorasweep.config import ModelConfig, PrecisionConfig  # noqa: E402

PRECISIONS = {
    "fp32": PrecisionConfig(name="fp32"),
    "bf16_true": PrecisionConfig(name="bf16_true", weights_dtype="bfloat16"),
    "nf4": PrecisionConfig(name="nf4", quant="nf4"),
}
BUILTIN = {"tiny_llama": "builtin:tiny_llama", "smollm2_135m": "builtin:smollm2_135m"}
# Llama-2-7B's architecture (config.json of meta-llama/Llama-2-7b-hf); weights are random.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# Dense bf16 tensor-core peaks (no sparsity), for MFU.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_FLOPS.items():  # longest names first in the dict where they overlap
        if k in name:
            return v
    return None


def _quantize_linears(model: torch.nn.Module, pc: PrecisionConfig, device: torch.device) -> None:
    """Swap every decoder nn.Linear for a bitsandbytes 4-bit one, quantized from its random weights."""
    import bitsandbytes as bnb

    cdtype = model_stage.compute_dtype(pc, device)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=cdtype, quant_type=pc.quant,
                                      compress_statistics=pc.double_quant, device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu" if device.type == "cpu" else device),
                                             requires_grad=False, quant_type=pc.quant,
                                             compress_statistics=pc.double_quant).to(device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, cname, q)
                del child
    model.is_loaded_in_4bit = True  # what peft looks for to wrap Linear4bit layers
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(model: str, precision: str, device: torch.device, layers: int | None = None,
          hidden: int | None = None):
    """(model, tokenizer or None, n_layers, hidden). Shape models are random-init from a config."""
    pc = PRECISIONS[precision]
    if model in BUILTIN:
        lm = model_stage.build_model(ModelConfig(name=model, name_or_path=BUILTIN[model]), pc, device)
        cfg = lm.model.config
        return lm.model, lm.tokenizer, cfg.num_hidden_layers, cfg.hidden_size
    if model != "llama2_7b_shape":
        raise SystemExit(f"--model={model!r}: use tiny_llama, smollm2_135m or llama2_7b_shape")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA2_7B)
    if layers:
        shape["num_hidden_layers"] = layers
    if hidden:  # smoke tests on a CPU: shrink the width, keep the layout
        shape.update(hidden_size=hidden, intermediate_size=int(hidden * 11008 / 4096), num_attention_heads=hidden // 128,
                     num_key_value_heads=hidden // 128)
    cfg = LlamaConfig(**shape)
    wdtype = torch.bfloat16 if precision in ("bf16_true", "nf4") and device.type == "cuda" else torch.float32
    if precision == "bf16_true":
        wdtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(wdtype)
    if pc.quant != "none":
        _quantize_linears(m, pc, device)
    return m, None, cfg.num_hidden_layers, cfg.hidden_size


def train_flops_per_token(model: torch.nn.Module, n_layers: int, hidden: int, seq: int) -> tuple[float, float]:
    """(6N + 12·L·d·s, the usual MFU convention; 4N + 12·L·d·s, what LoRA really computes:
    no weight gradients for the frozen base). N excludes the input embedding table."""
    n = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lora_" in name:
            continue
        n += p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)
    attn = 12 * n_layers * hidden * seq
    return 6 * n + attn, 4 * n + attn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall s, process CPU s). On a shared CPU box the CPU time of a one-thread run is the fair
    clock: it does not count the time other processes held the core."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in cells)
