"""Decide what trains: a peft LoRA adapter, every weight (full) or chosen modules (partial).

Target presets are resolved against the model's own module names, so ``qv`` means
q_proj/v_proj on Llama and query/value on BERT.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import LoraConfig

# Leaf-name aliases across architectures (Llama/Mistral/Qwen, BERT/RoBERTa, DistilBERT, GPT-NeoX).
QUERY = ("q_proj", "query", "q_lin")
KEY = ("k_proj", "key", "k_lin")
VALUE = ("v_proj", "value", "v_lin")
ATTN_OUT = ("o_proj", "out_proj", "out_lin", "attention.output.dense", "dense")
HEAD_NAMES = ("lm_head", "classifier", "score", "pre_classifier")


class TargetError(ValueError):
    pass


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers an adapter may target (4-bit ones included, heads excluded)."""
    names = []
    for name, mod in model.named_modules():
        is_linear = isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt")
        # A head (lm_head, classifier.dense/out_proj on RoBERTa) is trained whole via modules_to_save,
        # never wrapped by LoRA, so nothing under it is a target.
        in_head = any(part in HEAD_NAMES for part in name.split("."))
        if is_linear and not in_head:
            names.append(name)
    return names


def _present(aliases: tuple[str, ...], names: list[str]) -> list[str]:
    out = []
    for a in aliases:
        if a == "dense":  # BERT's attention output is attention.output.dense, already matched above
            continue
        if any(n == a or n.endswith("." + a) for n in names):
            out.append(a)
    return out


def resolve_targets(targets: list[str], model: torch.nn.Module, field_name: str = "lora.targets") -> list[str]:
    """Expand presets and check every name against the model; raise naming what exists."""
    names = linear_module_names(model)
    leaves = sorted({n.split(".")[-1] for n in names})
    out: list[str] = []
    unknown: list[str] = []
    for t in targets:
        if t == "qv":
            found = _present(QUERY, names) + _present(VALUE, names)
        elif t == "attention":
            found = _present(QUERY + KEY + VALUE + ATTN_OUT, names)
        elif t == "all_linear":
            found = leaves
        else:
            found = [t] if any(n == t or n.endswith("." + t) for n in names) else []
            if not found:
                unknown.append(t)
                continue
        if not found:
            unknown.append(t)
        out.extend(f for f in found if f not in out)
    # peft matches a target by suffix: a leaf that also names a head module (RoBERTa's
    # classifier.dense) is spelled out in full so only the body's layers get LoRA.
    head_leaves = {n.split(".")[-1] for n, _ in model.named_modules()
                   if any(part in HEAD_NAMES for part in n.split(".")[:-1])}
    out = [t for leaf in out for t in ([n for n in names if n.endswith("." + leaf) or n == leaf]
                                        if leaf in head_leaves else [leaf])]
    if unknown:
        raise TargetError(
            f"{field_name}: unknown module(s) {', '.join(unknown)} for this model; "
            f"linear modules are: {', '.join(leaves)} (or a preset: qv, attention, all_linear)")
    return out


@dataclass
class AdapterInfo:
    method: str
    target_modules: list[str]
    trainable: int
    total: int
    table: list[tuple[str, bool, int]] = field(default_factory=list)

    @property
    def summary_line(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"total {self.total:,}, trainable {self.trainable:,} ({pct:.4f}%)"


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte: count the weights, not the storage.
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int, list[tuple[str, bool, int]]]:
    table = [(n, bool(p.requires_grad), _numel(p)) for n, p in model.named_parameters()]
    return sum(c for _, t, c in table if t), sum(c for _, _, c in table), table


def apply_adapter(model: torch.nn.Module, lc: LoraConfig, *, task: str, quantized: bool,
                  grad_checkpointing: bool = False) -> tuple[torch.nn.Module, AdapterInfo]:
    heads = [h for h in HEAD_NAMES if hasattr(model, h)] if task == "sequence_classification" else []
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: list[str] = []
    if lc.method == "lora":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        targets = resolve_targets(lc.targets, model)
        pcfg = PeftLoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                              bias=lc.bias, task_type="SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM",
                              modules_to_save=heads or None)
        model = get_peft_model(model, pcfg)
    elif lc.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # partial: only the named modules (plus a classification head) train
        targets = resolve_targets(lc.trainable, model, field_name="lora.trainable")
        for n, p in model.named_parameters():
            mod = n.rsplit(".", 1)[0]
            hit = any(mod == t or mod.endswith("." + t) for t in targets)
            hit = hit or any(mod == h or mod.startswith(h + ".") for h in heads)
            p.requires_grad_(hit)
    if grad_checkpointing and not quantized and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings + checkpointing still need grads to flow
    trainable, total, table = count_parameters(model)
    return model, AdapterInfo(lc.method, targets, trainable, total, table)
