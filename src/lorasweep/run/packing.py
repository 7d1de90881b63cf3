"""Sequence packing: several tokenized examples share one row, with correct boundaries.

Each piece keeps its own position ids (restarting at 0), which is how transformers (5.x) finds
packed sequences when no 2D attention mask is passed: sdpa/eager get a block-diagonal causal mask,
flash-attention gets per-piece cu_seqlens. The first label of every piece is masked, so no token is
ever predicted from the previous example. Validation batches stay unpacked.
"""
from __future__ import annotations

import random

IGNORE = -100


def pack_examples(examples: list[dict], max_len: int, seed: int, open_bins: int = 16) -> list[dict]:
    """First-fit into rows of at most ``max_len`` tokens, over a seeded shuffle of the examples.

    At most ``open_bins`` rows stay open (the fullest is closed when one more is needed), so the
    cost is linear and rows still mix examples from across the data set.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []  # closed rows, as example indices
    bins: list[tuple[int, list[int]]] = []  # (tokens used, indices), open rows
    for i in order:
        n = len(examples[i]["input_ids"])
        for b, (used, idx) in enumerate(bins):
            if used + n <= max_len:
                idx.append(i)
                bins[b] = (used + n, idx)
                break
        else:
            if len(bins) >= open_bins:
                fullest = max(range(len(bins)), key=lambda b: bins[b][0])
                rows.append(bins.pop(fullest)[1])
            bins.append((n, [i]))
    rows.extend(idx for _, idx in bins)
    return [join(examples[i] for i in idx) for idx in rows]


def join(pieces) -> dict:
    """One packed example: concatenated ids, labels (first label of each piece masked), position ids."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    n_pieces = 0
    for e in pieces:
        k = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE] + list(e["labels"][1:k])
        pos += range(k)
        n_pieces += 1
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_pieces": n_pieces}


def fill_rate(packed: list[dict], max_len: int) -> float:
    """Share of the row capacity that holds real tokens (1.0 = no padding at all)."""
    return sum(len(p["input_ids"]) for p in packed) / max(1, len(packed) * max_len)
