"""Decide what trains: a peft LoRA adapter, every weight (full) or chosen modules (partial).

Target presets are resolved against the model's own module names, so ``qv`` means
q_proj/v_proj on Llama and query/value on BERT.
"""
from __future__ import annotations

import copy
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LoraConfig, lora_scaling, lora_variant, rewrites_base

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


# ---------------------------------------------------------------- the peft config and what it adapts

def peft_init(lc: LoraConfig):
    """peft's init_lora_weights for lora.init (LoftQ starts from the default and is fitted after)."""
    return True if lc.init in ("default", "loftq") else lc.init


def peft_config(lc: LoraConfig, targets: list[str], task: str = "causal_lm", heads: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, bias=lc.bias,
        task_type="SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM", modules_to_save=heads or None,
        use_dora=lc.use_dora, use_rslora=lc.use_rslora, init_lora_weights=peft_init(lc),
        rank_pattern=dict(lc.rank_pattern or {}), alpha_pattern=dict(lc.alpha_pattern or {}),
        layers_to_transform=list(lc.layers_to_transform) if lc.layers_to_transform is not None else None,
        exclude_modules=list(lc.exclude_modules) or None)


def _pattern_hits(key: str, name: str) -> bool:
    # peft's own rule (peft.utils.other.get_pattern_key): the regex matches the end of the name
    return re.match(rf"(.*\.)?({key})$", name) is not None


def lora_modules(lc: LoraConfig, model: torch.nn.Module, heads: list[str] | None = None,
                 exclude: bool = True) -> dict[str, tuple[int, float]]:
    """{module name: (r, alpha)} of every layer peft will wrap, decided by peft's own matching
    (targets, layers_to_transform, exclude_modules, rank/alpha patterns). Works on a meta skeleton."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    pc = peft_config(lc, resolve_targets(lc.targets, model), heads=heads)
    if not exclude:
        pc.exclude_modules = None
    out = {}
    for name in linear_module_names(model):
        if bool(check_target_module_exists(pc, name)):
            r = pc.rank_pattern.get(get_pattern_key(pc.rank_pattern.keys(), name), pc.r)
            alpha = pc.alpha_pattern.get(get_pattern_key(pc.alpha_pattern.keys(), name), pc.lora_alpha)
            out[name] = (int(r), float(alpha))
    return out


def pattern_problems(lc: LoraConfig, model: torch.nn.Module) -> list[str]:
    """One line per variant field that names nothing in this model (checked on the meta skeleton,
    before weights load): peft would silently ignore a rank_pattern key that matches no module."""
    if lc.method != "lora":
        return []
    adapted = lora_modules(lc, model)
    targeted = lora_modules(lc, model, exclude=False)
    example = next(iter(targeted), "model.layers.0.self_attn.q_proj")
    p = []
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if lc.layers_to_transform is not None and n_layers is not None:
        out = [i for i in lc.layers_to_transform if i >= n_layers]
        if out:
            p.append(f"lora.layers_to_transform={list(lc.layers_to_transform)}: layer(s) {out} do not exist; "
                     f"this model has layers 0..{n_layers - 1}")
    for key in lc.exclude_modules or []:
        if not any(n == key or n.endswith("." + key) for n in targeted):
            p.append(f"lora.exclude_modules: {key!r} names no targeted module; give a module name or its ending, "
                     f"e.g. {example!r}")
    for fname, pat in (("rank_pattern", lc.rank_pattern), ("alpha_pattern", lc.alpha_pattern)):
        for key in pat or {}:
            if not any(_pattern_hits(key, n) for n in adapted):
                p.append(f"lora.{fname}: key {key!r} matches no adapted module (keys are regexes matched against the "
                         f"end of a module name, e.g. {example!r})")
    if targeted and not adapted:
        p.append("lora.exclude_modules / lora.layers_to_transform: no module is left to adapt; exclude fewer")
    return p


# ---------------------------------------------------------------- what a run records about its adapter

@dataclass
class AdapterInfo:
    method: str
    target_modules: list[str]
    trainable: int
    total: int
    table: list[tuple[str, bool, int]] = field(default_factory=list)
    variant: str = ""
    scalings: dict[str, float] = field(default_factory=dict)  # per adapted module, read from the built model
    default_scaling: float | None = None
    magnitude_params: int = 0  # DoRA's magnitude vectors
    loraplus_b_tensors: int = 0
    # PiSSA/OLoRA: the adapter as initialised (A0, B0), to save the trained one as a plain LoRA
    initial_state: dict[str, torch.Tensor] | None = None

    @property
    def summary_line(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"total {self.total:,}, trainable {self.trainable:,} ({pct:.4f}%)"

    def metrics(self) -> dict:
        """lora/* entries of the record: the variant and its effective scaling."""
        if self.method != "lora":
            return {}
        out = {"lora/variant": self.variant, "lora/modules": len(self.scalings)}
        if self.default_scaling is not None:
            out["lora/scaling"] = self.default_scaling
        if self.scalings and min(self.scalings.values()) != max(self.scalings.values()):
            out["lora/scaling_min"] = min(self.scalings.values())
            out["lora/scaling_max"] = max(self.scalings.values())
        if self.magnitude_params:
            out["lora/dora_magnitude_params"] = self.magnitude_params
        if self.loraplus_b_tensors:
            out["lora/loraplus_b_tensors"] = self.loraplus_b_tensors
        return out


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte: count the weights, not the storage.
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def count_parameters(model: torch.nn.Module) -> tuple[int, int, list[tuple[str, bool, int]]]:
    table = [(n, bool(p.requires_grad), _numel(p)) for n, p in model.named_parameters()]
    return sum(c for _, t, c in table if t), sum(c for _, _, c in table), table


def apply_adapter(model: torch.nn.Module, lc: LoraConfig, *, task: str, quantized: bool,
                  grad_checkpointing: bool = False, source: str | None = None) -> tuple[torch.nn.Module, AdapterInfo]:
    """source: the full-precision checkpoint folder (LoftQ reads W from it)."""
    heads = [h for h in HEAD_NAMES if hasattr(model, h)] if task == "sequence_classification" else []
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: list[str] = []
    extra: dict = {}
    if lc.method == "lora":
        from peft import get_peft_model

        targets = resolve_targets(lc.targets, model)
        model = get_peft_model(model, peft_config(lc, targets, task, heads))
        if lc.init == "loftq":
            _fit_loftq(model, source)
        extra = _variant_info(model, lc)
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
    return model, AdapterInfo(lc.method, targets, trainable, total, table, **extra)


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.scaling]


def _variant_info(model: torch.nn.Module, lc: LoraConfig) -> dict:
    """What the built model really does (scalings, DoRA magnitudes), LoRA+ tags, PiSSA's start."""
    from peft import get_peft_model_state_dict

    layers = _lora_layers(model)
    info = {"variant": lora_variant(lc), "scalings": {n: float(m.scaling["default"]) for n, m in layers},
            "default_scaling": lora_scaling(lc),
            "magnitude_params": sum(p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n)}
    if lc.loraplus_lr_ratio:
        # LoRA+ (Hayou et al. 2024; peft.optimizers.create_loraplus_optimizer): B learns ratio x faster
        # than A. train.param_groups gives every parameter tagged with lr_scale its own lr.
        tagged = 0
        for n, p in model.named_parameters():
            if p.requires_grad and (".lora_B." in n or ".lora_embedding_B." in n):
                p.lr_scale = float(lc.loraplus_lr_ratio)
                tagged += 1
        info["loraplus_b_tensors"] = tagged
    if rewrites_base(lc):
        info["initial_state"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return info


def _fit_loftq(model: torch.nn.Module, source: str | None) -> None:
    """LoftQ on a 4-bit base: A, B fitted to W - Q(W) from the full-precision checkpoint (peft's
    replace_lora_weights_loftq; CUDA only, config.validate refuses it elsewhere)."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    if source and not Path(source).is_dir():  # a hub id: its full-precision files in the hub cache
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, local_files_only=True)
    replace_lora_weights_loftq(model, model_path=source)
    # peft fits B @ A to the residual, but the layer adds scaling * B @ A: undo the scaling
    with torch.no_grad():
        for _, m in _lora_layers(model):
            m.lora_B["default"].weight.div_(m.scaling["default"])


def save_adapter(model: torch.nn.Module, info: AdapterInfo, out_dir: str | Path) -> None:
    """Save the adapter so it loads on the UNMODIFIED base. PiSSA/OLoRA moved their start out of the
    base weights; peft's conversion (path_initial_model_for_weight_conversion) saves instead the
    plain LoRA [A | A0], [B | -B0] of rank 2r (W_res + s*B*A = W + s*(B*A - B0*A0))."""
    out_dir = Path(out_dir)
    if info.initial_state is None:
        model.save_pretrained(out_dir)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    # peft reads the start from a folder of its own, loaded as an adapter named after it (no dots)
    init_dir = out_dir.parent / f"{out_dir.name}_start"
    shutil.rmtree(init_dir, ignore_errors=True)
    init_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in info.initial_state.items()}, init_dir / "adapter_model.safetensors")
    start_cfg = copy.deepcopy(model.peft_config["default"])
    start_cfg.init_lora_weights = True  # loading the start must not decompose the base again
    start_cfg.save_pretrained(str(init_dir))
    try:
        with warnings.catch_warnings():  # peft warns that the start it loads for the conversion is PiSSA
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
            model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(init_dir))
    finally:
        shutil.rmtree(init_dir, ignore_errors=True)
    # peft's conversion keeps only lora_A/lora_B: put back what else trained (a classifier head)
    saved_file = out_dir / "adapter_model.safetensors"
    saved = load_file(saved_file)
    rest = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
            if k not in saved and ".lora_" not in k}
    if rest:
        save_file({**saved, **rest}, saved_file, metadata={"format": "pt"})
