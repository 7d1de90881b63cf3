"""Instruction data: load or generate examples, render prompts, tokenize once, batch.

Every example becomes ``{"prompt": str, "response": str}``; the prompt is rendered with an
alpaca template or the tokenizer's chat template, and the loss is masked on the prompt
unless ``data.train_on_prompt``.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config import DataConfig

IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


class DataError(ValueError):
    pass


# ---------------------------------------------------------------- raw examples

def arithmetic_splits(dc: DataConfig) -> dict[str, list[dict]]:
    """Two-digit addition/subtraction questions; splits are disjoint and fixed by data.seed."""
    problems = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    random.Random(dc.seed).shuffle(problems)
    need = dc.n_train + dc.n_val + dc.n_test
    if need > len(problems):
        raise DataError(f"data.n_train+n_val+n_test={need}: at most {len(problems)} distinct problems exist")

    def rec(p):
        a, op, b = p
        return {"instruction": f"What is {a} {op} {b}? Answer with the number only.", "input": "",
                "output": str(a + b if op == "+" else a - b)}

    it = iter(problems)
    return {split: [rec(next(it)) for _ in range(n)]
            for split, n in (("train", dc.n_train), ("val", dc.n_val), ("test", dc.n_test))}


def read_records(path: str, field_name: str = "data.path") -> list[dict]:
    """JSON array or JSONL; a malformed line is named by its number."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise DataError(f"{field_name}={path!r}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{field_name}={path!r}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{field_name}={path!r}: not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{field_name}={path!r}: line {i} is not valid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{field_name}={path!r}: no records in the file")
    return rows


def instruction_records(rows: list[dict], source: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise DataError(f"{source}: record {i} needs 'instruction' and 'output' fields (got {sorted(r) if isinstance(r, dict) else type(r).__name__})")
        out.append({"instruction": str(r["instruction"]), "input": str(r.get("input") or ""), "output": str(r["output"])})
    return out


def split_train_val(rows: list[dict], frac: float, seed: int, test_frac: float = 0.0) -> dict[str, list[dict]]:
    """val first, then (test_frac > 0) test, then train, from one shuffle: with no test split the
    train and val rows are what they always were."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = max(1, int(round(len(rows) * frac)))
    n_test = max(1, int(round(len(rows) * test_frac))) if test_frac else 0
    if len(rows) - n_val - n_test < 1:
        raise DataError(f"only {len(rows)} records: too few for a train and a validation split")
    if not n_test:
        return {"train": rows[n_val:], "val": rows[:n_val], "test": []}
    return {"train": rows[n_val + n_test:], "val": rows[:n_val], "test": rows[n_val:n_val + n_test]}


def load_raw(dc: DataConfig) -> dict[str, list[dict]]:
    if dc.name == "arithmetic":
        return arithmetic_splits(dc)
    if dc.name in ("alpaca", "jsonl"):
        if dc.path:
            rows = instruction_records(read_records(dc.path), f"data.path={dc.path!r}")
        elif dc.name == "alpaca" and dc.hub_id:
            import datasets

            ds = datasets.load_dataset(dc.hub_id, split="train")
            rows = instruction_records(list(ds), f"hub dataset {dc.hub_id}")
        else:
            raise DataError(f"data={dc.name} needs data.path=<local file>")
        return split_train_val(rows, dc.val_fraction, dc.seed, dc.test_fraction)
    raise DataError(f"data.name={dc.name!r}: unknown; use arithmetic, alpaca or jsonl")


# ---------------------------------------------------------------- prompts and tokens

def use_chat(dc: DataConfig, tokenizer) -> bool:
    return dc.template == "chat" or (dc.template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def render_prompt(rec: dict, tokenizer, chat: bool) -> str:
    if chat:
        content = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    tmpl = ALPACA_WITH_INPUT if rec["input"] else ALPACA_NO_INPUT
    return tmpl.format(**rec)


def eval_records(rows: list[dict], tokenizer, dc: DataConfig) -> list[dict]:
    """{'prompt', 'target'} pairs rendered exactly as in training, for benchmark tasks."""
    chat = use_chat(dc, tokenizer)
    return [{"prompt": render_prompt(r, tokenizer, chat), "target": r["output"]} for r in rows]


def adds_special_tokens(tokenizer, text: str) -> bool:
    """lm-eval's rule (HFLM.tok_encode), used in training too so BOS handling is one rule everywhere:
    the tokenizer's own special tokens, unless the text already starts with its BOS (or, without
    one, EOS) text, as chat templates that write ``<s>`` / ``<|begin_of_text|>`` do."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix_id is None:
        return True
    return not text.startswith(tokenizer.decode(prefix_id))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize(rows: list[dict], tokenizer, dc: DataConfig, max_len: int) -> list[dict]:
    """Prompt + answer tokenized as ONE text, the way lm-eval encodes context + continuation, so
    the model learns exactly the ids it is scored on. Encoding the answer on its own would give a
    SentencePiece tokenizer (Llama-2, Mistral) an extra leading "▁" at the boundary. The loss mask
    covers the tokens the prompt alone encodes to (the common prefix of the two encodings)."""
    chat = use_chat(dc, tokenizer)
    prompts = [render_prompt(r, tokenizer, chat) for r in rows]
    fulls = [p + r["output"] for p, r in zip(prompts, rows)]
    p_ids: list = [None] * len(rows)
    f_ids: list = [None] * len(rows)
    flags = [adds_special_tokens(tokenizer, p) for p in prompts]
    for flag in set(flags):  # one batched call per BOS choice (one in practice: a shared template)
        idx = [i for i, f in enumerate(flags) if f == flag]
        enc_p = tokenizer([prompts[i] for i in idx], add_special_tokens=flag)["input_ids"]
        enc_f = tokenizer([fulls[i] for i in idx], add_special_tokens=flag)["input_ids"]
        for i, a, b in zip(idx, enc_p, enc_f):
            p_ids[i], f_ids[i] = list(a), list(b)
    eos = tokenizer.eos_token_id
    out = []
    for p, f in zip(p_ids, f_ids):
        n_prompt = _common_prefix(p, f)
        resp = f[n_prompt:] + ([eos] if eos is not None else [])
        ids = (f[:n_prompt] + resp)[:max_len]
        labels = (f[:n_prompt] if dc.train_on_prompt else [IGNORE] * n_prompt) + resp
        labels = labels[:max_len]
        if all(l == IGNORE for l in labels[1:]):
            continue  # the prompt alone fills max_seq_len: nothing to learn from this example
        out.append({"input_ids": ids, "labels": labels})
    return out


# ---------------------------------------------------------------- batching

@dataclass
class Batches:
    """Re-iterable batches over tokenized examples (shuffled per epoch by a seeded generator)."""
    examples: list[dict]
    batch_size: int
    pad_id: int
    shuffle: bool
    seed: int
    group_by_length: bool = False

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The examples' order in ``epoch`` (its own seeded generator: no global RNG drawn)."""
        idx = list(range(len(self.examples)))
        if not self.shuffle:
            return idx
        rng = random.Random(self.seed + epoch)
        rng.shuffle(idx)
        if self.group_by_length:
            # Sort within chunks of 50 batches, then shuffle the batches: little padding, still random.
            chunk = self.batch_size * 50
            idx = [i for s in range(0, len(idx), chunk)
                   for i in sorted(idx[s:s + chunk], key=lambda j: len(self.examples[j]["input_ids"]))]
            groups = [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
            rng.shuffle(groups)
            idx = [i for g in groups for i in g]
        return idx

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        order = self.order(epoch)
        for s in range(0, len(order), self.batch_size):
            yield collate([self.examples[i] for i in order[s:s + self.batch_size]], self.pad_id)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example; count real tokens on the host (no device sync later).

    One tensor per field from padded lists: per-row slice copies cost more than the step on small models.
    """
    if "position_ids" in examples[0]:
        return collate_packed(examples, pad_id)
    lens = [len(e["input_ids"]) for e in examples]
    n = max(lens)
    ids = torch.tensor([e["input_ids"] + [pad_id] * (n - k) for e, k in zip(examples, lens)], dtype=torch.long)
    labels = torch.tensor([e["labels"] + [IGNORE] * (n - k) for e, k in zip(examples, lens)], dtype=torch.long)
    mask = torch.tensor([[1] * k + [0] * (n - k) for k in lens], dtype=torch.long)
    n_loss = sum(k - 1 - e["labels"][1:].count(IGNORE) for e, k in zip(examples, lens))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "n_tokens": sum(lens), "n_loss_tokens": n_loss}


def collate_packed(examples: list[dict], pad_id: int) -> dict:
    """Packed rows: position ids instead of an attention mask (transformers then keeps pieces apart).

    The pad tail gets its own positions from 0, so it is a separate piece that no real token sees.
    """
    lens = [len(e["input_ids"]) for e in examples]
    n = max(lens)
    ids = torch.tensor([e["input_ids"] + [pad_id] * (n - k) for e, k in zip(examples, lens)], dtype=torch.long)
    labels = torch.tensor([e["labels"] + [IGNORE] * (n - k) for e, k in zip(examples, lens)], dtype=torch.long)
    pos = torch.tensor([list(e["position_ids"]) + list(range(n - k)) for e, k in zip(examples, lens)], dtype=torch.long)
    n_loss = sum(k - e["labels"].count(IGNORE) for e, k in zip(examples, lens))
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": sum(lens), "n_loss_tokens": n_loss}


@dataclass
class PreparedData:
    train: Batches
    val: Batches | None
    test_rows: list[dict]
    chat_template: bool
    n_train_examples: int


def cached_tokenize(rows: list[dict], tokenizer, dc: DataConfig, max_len: int) -> list[dict]:
    """tokenize(), done once per (rows, tokenizer, settings) and reused from the cache dir afterwards."""
    from .cache import cached_examples

    settings = {"template": dc.template, "train_on_prompt": dc.train_on_prompt, "max_len": max_len,
                "chat": use_chat(dc, tokenizer)}
    return cached_examples(rows, tokenizer, settings, lambda: tokenize(rows, tokenizer, dc, max_len))[0]


def training_rows(dc: DataConfig, raw: dict | None = None) -> list[dict]:
    """The run's training rows: its own (capped by max_train_examples), then data.mix's sources."""
    own = (raw or load_raw(dc))["train"]
    rows = own[: dc.max_train_examples] if dc.max_train_examples else list(own)
    if dc.mix:
        rows = rows + mixed_train_rows(list(dc.mix))  # Batches shuffles them together by the seed
    return rows


def prepare_data(dc: DataConfig, tokenizer, *, max_seq_len: int, batch_size: int, seed: int,
                 group_by_length: bool = False, packing: bool = False) -> PreparedData:
    raw = load_raw(dc)
    train_rows = training_rows(dc, raw)
    val_rows = raw["val"][: dc.max_val_examples] if dc.max_val_examples else raw["val"]
    train = cached_tokenize(train_rows, tokenizer, dc, max_seq_len)
    if not train:
        raise DataError(f"data={dc.name}: no training example fits train.max_seq_len={max_seq_len}; raise it")
    val = cached_tokenize(val_rows, tokenizer, dc, max_seq_len) if val_rows else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_examples = len(train)
    if packing:
        from .packing import pack_examples

        train = pack_examples(train, max_seq_len, seed)  # rows of whole examples; val stays unpacked
    return PreparedData(
        train=Batches(train, batch_size, pad, shuffle=True, seed=seed, group_by_length=group_by_length),
        val=Batches(val, batch_size, pad, shuffle=False, seed=seed) if val else None,
        test_rows=raw.get("test", []),
        chat_template=use_chat(dc, tokenizer),
        n_train_examples=n_examples,
    )


def test_batches(dc: DataConfig, test_rows: list[dict], tokenizer, *, max_seq_len: int, batch_size: int,
                 seed: int) -> Batches:
    """The held-out test split (eval.test_loss), rendered and tokenized like the validation split."""
    rows = test_rows[: dc.max_val_examples] if dc.max_val_examples else test_rows
    examples = cached_tokenize(rows, tokenizer, dc, max_seq_len)
    if not examples:
        raise DataError(f"eval.test_loss: no test example fits train.max_seq_len={max_seq_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Batches(examples, batch_size, pad, shuffle=False, seed=seed)


def val_set_batches(dc: DataConfig, specs: dict, tokenizer, *, max_seq_len: int, batch_size: int,
                    seed: int) -> dict[str, Batches]:
    """eval.val_sets as batches, rendered and tokenized like the run's own validation split."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for name, spec in specs.items():
        examples = cached_tokenize(val_rows(spec, dc.max_val_examples), tokenizer, dc, max_seq_len)
        if not examples:
            raise DataError(f"eval.val_sets.{name}: no validation example fits train.max_seq_len={max_seq_len}")
        out[name] = Batches(examples, batch_size, pad, shuffle=False, seed=seed)
    return out


def longest_example(dc: DataConfig, tokenizer, max_seq_len: int) -> int | None:
    """Tokens in the longest training example (capped): what the memory plan sizes activations by."""
    if dc.name not in ("arithmetic", "alpaca", "jsonl") or (dc.name == "alpaca" and not dc.path):
        return None
    rows = training_rows(dc)
    return max((len(e["input_ids"]) for e in cached_tokenize(rows, tokenizer, dc, max_seq_len)), default=None)


def most_loss_tokens(dc: DataConfig, tokenizer, max_seq_len: int) -> int | None:
    """Loss tokens (shifted labels not ignored) in the training example with the most: the
    positions the loss head sees, which the memory plan sizes the logits by."""
    if dc.name not in ("arithmetic", "alpaca", "jsonl") or (dc.name == "alpaca" and not dc.path):
        return None
    rows = training_rows(dc)
    return max((sum(l != IGNORE for l in e["labels"][1:]) for e in cached_tokenize(rows, tokenizer, dc, max_seq_len)),
               default=None)


# ----------------------------------------------------------------------------- sources inside a config
# Extra instruction data named inside a run's config: examples mixed into training (data.mix) and
# further validation sets scored beside the run's own (eval.val_sets); each entry (checked by
# config.source_problems) is split into train / val exactly as data=<name> would split it, so a
# mixed-in source's validation rows never reach training.

def source_config(spec: dict) -> tuple[DataConfig, int | None]:
    """The DataConfig a source stands for, and how many of its examples to take (None = all)."""
    fields = {k: v for k, v in spec.items() if k != "n"}
    if fields.get("name") == "alpaca" and "hub_id" not in fields:
        fields["hub_id"] = None  # local files only: a mixed source never reaches for the hub
    return DataConfig(**fields), spec.get("n")


def mixed_train_rows(specs: list[dict]) -> list[dict]:
    """The training rows every ``data.mix`` source adds: the first n of its train split."""
    rows: list[dict] = []
    for spec in specs:
        dc, n = source_config(spec)
        rows.extend(load_raw(dc)["train"][:n])
    return rows


def val_rows(spec: dict, default_n: int | None) -> list[dict]:
    """A validation set's rows: the first n (or data.max_val_examples) of its val split."""
    dc, n = source_config(spec)
    n = n or default_n
    rows = load_raw(dc)["val"]
    return rows[:n] if n else rows
