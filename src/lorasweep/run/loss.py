"""The training objective as a SUM over a batch's loss items, so a step can divide by its own total.

An optimizer step's loss is the mean over all loss tokens of all its micro-batches, whatever the
split into micro-batches: each micro-batch contributes sum(CE) / (tokens in the whole step), the
step's total being counted on the host before its first forward (collate's ``n_loss_tokens``).
This is what transformers' Trainer does with ``num_items_in_batch`` and torchtune with
1/num_tokens; averaging per-micro-batch means instead (litgpt) weights short answers up.

Causal LM, ``head="labelled"`` (default): the decoder's hidden states, kept only where the shifted
label is not ignored (the masked prompt and the padding contribute nothing to the loss, so this is
exact), then the output head and cross-entropy over those positions, a chunk of positions at a
time, with each chunk's gradient taken at once: no logits outlive their chunk. On CUDA with the
optional ``liger-kernel`` installed, Liger's fused linear cross-entropy does the same in Triton.
``head="full"``: the model's own forward, logits at every position (the comparison path).
Sequence classification (one label per row): the model's mean loss times the rows.
"""
from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
HEAD_MODES = ("labelled", "full")
# The fp32 logits of one chunk of positions take at most this much: 682 positions of SmolLM2's
# 49,152-token vocabulary, 261 of Llama-3's 128,256. The planner sizes the loss by it.
CHUNK_BYTES = 2**27
# The labelled path computes lm_head(hidden) itself, so it is taken only for transformers' own
# classes whose forward is exactly ``logits = self.lm_head(hidden_states)`` (tests/test_loss_head.py
# reads each one's forward to keep this list true). Any other model (Falcon-H1's lm_head_multiplier,
# Gemma-2/3/3n softcapping, Granite's and Cohere's scaling, remote code) keeps its own forward.
BARE_HEAD = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM", "GemmaForCausalLM",
    "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "FalconForCausalLM", "StableLmForCausalLM",
    "Starcoder2ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM", "BloomForCausalLM",
    "GPTJForCausalLM", "MptForCausalLM"})
# Config fields that transform the logits after lm_head, with the value that leaves them alone:
# even on a listed class (an edited config), a set one sends the run down the model's own forward.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                     "lm_head_multiplier": 1.0}


def chunk_positions(vocab_size: int) -> int:
    """Positions per cross-entropy chunk for this vocabulary."""
    return max(1, CHUNK_BYTES // (4 * max(vocab_size, 1)))


def batch_loss_sum(model: torch.nn.Module, inputs: dict, head: str = "labelled") -> torch.Tensor:
    """Sum of the per-item losses of one batch (fp32). ``head``: labelled | full (see module doc)."""
    labels = inputs["labels"]
    if labels.dim() == 1:  # one label per sequence: classification
        out = model(**inputs)
        return out.loss.float() * labels.shape[0]
    parts = split_head(model) if head == "labelled" else None
    if parts is None:
        return _full_loss_sum(model, inputs)
    hidden = parts.backbone(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return head_loss_sum(parts.head, hidden[:, :-1][keep], targets[keep], parts.vocab_size)


def _full_loss_sum(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    logits = out.logits[:, :-1, :]
    targets = inputs["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# ---------------------------------------------------------------- the model's parts

@dataclass
class HeadParts:
    backbone: torch.nn.Module  # the decoder: ids -> last hidden states (normed)
    head: torch.nn.Module  # the output head as the model calls it (peft's wrapper or LoRA layer included)
    vocab_size: int


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model under peft's wrappers; None where peft's own forward matters."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and hasattr(model, "get_base_model"):  # PeftModel
        if peft_config.is_prompt_learning:  # virtual tokens are added in PeftModel.forward
            return None
        model = model.get_base_model()
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - peft is a dependency
        BaseTuner = ()
    if isinstance(model, BaseTuner):  # LoraModel
        model = model.model
    return model


def why_full(model: torch.nn.Module) -> str | None:
    """Why this model's loss must come from its own forward, or None where the labelled path
    computes exactly what the model's forward would."""
    from transformers import PreTrainedModel

    base = unwrap_peft(model)
    if base is None:
        return "a prompt-learning adapter adds virtual tokens in peft's own forward"
    if not isinstance(base, PreTrainedModel):
        return f"{type(base).__name__} is not a transformers model"
    cls = type(base)
    if cls.__name__ not in BARE_HEAD or not cls.__module__.startswith("transformers.models."):
        return (f"{cls.__name__} is not on the list of models whose logits are lm_head(hidden) "
                f"(lorasweep.run.loss.BARE_HEAD)")
    for cfg in (base.config, _text_config(base.config)):  # Gemma-3n keeps its softcap in text_config
        for name, identity in _LOGIT_TRANSFORMS.items():
            v = getattr(cfg, name, None)
            if v is not None and v != identity:
                return f"its config's {name}={v} transforms the logits after lm_head"
    if base.base_model is base or base.get_output_embeddings() is None:
        return "no separate decoder and output head"
    return None


def _text_config(cfg):
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def split_head(model: torch.nn.Module) -> HeadParts | None:
    """Backbone and output head of a causal LM whose forward is ``lm_head(backbone(...))``, under
    any peft wrapper; None for models whose forward does more (the caller takes the full path)."""
    if why_full(model) is not None:
        return None
    base = unwrap_peft(model)
    backbone, head = base.base_model, base.get_output_embeddings()
    vocab = getattr(base.config, "vocab_size", None) or getattr(head, "out_features", None)
    return HeadParts(backbone, head, int(vocab)) if vocab else None


# ---------------------------------------------------------------- head + cross-entropy

def head_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """sum CE(head(hidden), targets) over N selected positions (hidden [N, H], targets [N]), fp32."""
    if hidden.shape[0] == 0:
        return hidden.float().sum()  # 0, still part of the graph: backward gives zero gradients
    fused = _liger_loss() if hidden.is_cuda and type(head) is torch.nn.Linear else None
    if fused is not None:
        w, b, x = head.weight, head.bias, hidden
        # Liger multiplies in its inputs' dtype: give it what autocast would have given lm_head
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else w.dtype
        x, w = x.to(dt), w.to(dt)
        b = b.to(dt) if b is not None else None
        return fused(w, x.contiguous(), targets, b).float()
    chunk = chunk_positions(vocab_size)
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedHeadCrossEntropy.apply(hidden, targets, head, chunk, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        total += F.cross_entropy(head(hidden[s:s + chunk]).float(), targets[s:s + chunk], reduction="sum")
    return total


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Head + cross-entropy chunk by chunk, each chunk's gradient (wrt the hidden states and the
    head's trainable parameters) taken in the forward, so that only the [N, H] gradient is kept,
    never [N, V] logits. Backward scales the stored gradients by the incoming one (the step's
    1/tokens, a GradScaler's scale). Any head module works: nn.Linear, peft's ModulesToSaveWrapper
    or a LoRA-adapted lm_head; each chunk runs it once (dropout draws are not repeated)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk, *params):
        need_h = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[4:]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grads_p = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if n else None
                   for p, n in zip(params, need_p)]
        wrt = [p for p, n in zip(params, need_p) if n]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].detach().requires_grad_(need_h)
            with torch.enable_grad():
                loss = F.cross_entropy(head(h).float(), targets[s:s + chunk], reduction="sum")
            grads = list(torch.autograd.grad(loss, ([h] if need_h else []) + wrt))
            if need_h:
                grad_h[s:s + chunk] = grads.pop(0)
            for i, n in enumerate(need_p):
                if n:
                    grads_p[i] += grads.pop(0)
            total += loss.detach()
        ctx.dtypes = (hidden.dtype, [p.dtype for p in params])
        ctx.save_for_backward(grad_h, *grads_p)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, *grads_p = ctx.saved_tensors
        h_dtype, p_dtypes = ctx.dtypes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gp = [(g * grad_out).to(dt) if g is not None else None for g, dt in zip(grads_p, p_dtypes)]
        return (gh, None, None, None, *gp)


# ---------------------------------------------------------------- Liger (CUDA, optional)

@functools.lru_cache(maxsize=None)
def _liger_loss():
    """Liger's fused linear cross-entropy (sum over the given targets), or None when the
    ``liger-kernel`` extra is not installed or unusable here."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - missing, or its Triton does not import: the torch path serves
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")


def describe(model: torch.nn.Module, head: str, device: torch.device, task: str = "causal_lm") -> str:
    """What the training loss computes on this model and device, for the record's env."""
    if task != "causal_lm":
        return "the model's own loss (one label per sequence)"
    if head == "full":
        return "full: the model's own forward, logits at every position"
    parts = split_head(model)
    if parts is None:
        return f"full: {why_full(model) or 'no vocabulary size'}"
    if device.type == "cuda" and type(parts.head) is torch.nn.Linear and _liger_loss() is not None:
        return f"labelled: liger-kernel {importlib.metadata.version('liger-kernel')} fused linear cross-entropy"
    return f"labelled: torch, chunks of {chunk_positions(parts.vocab_size)} positions"
