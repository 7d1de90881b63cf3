"""The training objective as a SUM over a batch's loss items, so a step can divide by its own total.

An optimizer step's loss is the mean over all loss tokens of all its micro-batches, whatever the
split into micro-batches: each micro-batch contributes sum(CE) / (tokens in the whole step), the
step's total being counted on the host before its first forward (collate's ``n_loss_tokens``).
This is what transformers' Trainer does with ``num_items_in_batch`` and torchtune with
1/num_tokens; averaging per-micro-batch means instead (litgpt) weights short answers up.

Causal LM: cross-entropy summed over the shifted labels that are not ignored.
Sequence classification (one label per row): the model's mean loss times the rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def batch_loss_sum(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Sum of the per-item losses of one batch (fp32)."""
    labels = inputs["labels"]
    if labels.dim() == 1:  # one label per sequence: classification
        out = model(**inputs)
        return out.loss.float() * labels.shape[0]
    out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    logits = out.logits[:, :-1, :]
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
