"""Sequence-classification data: read text/label tables, check them, tokenize, batch, score.

``data=sst2`` reads a GLUE-layout folder (train.tsv, dev.tsv, optionally a labelled test.tsv)
or, with no path, the hub copy; ``data=text_classification`` reads any local CSV/TSV/JSONL
file (split by ``data.val_fraction``) or a folder of them. Batches carry the same keys the
train loop reads for causal LMs; one example is one loss "token".
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterator

import torch

from ..config import DataConfig
from .data import Batches, DataError, PreparedData, read_records

log = logging.getLogger("lorasweep")

EXTS = (".tsv", ".csv", ".jsonl", ".json")
# names a split's file may carry in a folder (GLUE writes dev, the hub writes validation)
SPLIT_FILES = {"train": ("train",), "dev": ("dev", "validation", "val"), "test": ("test",)}
VAL_SPLITS = ("dev", "test")


# ---------------------------------------------------------------- reading

def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    """Header + rows of a TSV/CSV/JSONL/JSON file. TSV is read unquoted: SST-2 has bare quotes."""
    if path.suffix in (".jsonl", ".json"):
        rows = read_records(str(path))
        rows = [r for r in rows if isinstance(r, dict)]
        cols = sorted({k for r in rows for k in r})
        return cols, rows
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix == ".tsv":
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _as_label(v):
    """int for 0/1/"2"/True; the stripped string otherwise (a class name)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    s = str(v).strip() if v is not None else ""
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)
            return int(f) if f.is_integer() else s
        except ValueError:
            return s


def read_split(path: Path, dc: DataConfig) -> list[dict]:
    """{"text", "label"} rows of one file; a missing column or an empty text column is an error."""
    src = f"data.path={str(path)!r}"
    if not path.is_file():
        raise DataError(f"{src}: no such file")
    cols, rows = _read_table(path)
    if not rows:
        raise DataError(f"{src}: no rows in the file")
    for what, col in (("text", dc.text_column), ("label", dc.label_column)):
        if col not in cols:
            raise DataError(f"{src}: {what} column {col!r} not found (columns: {', '.join(cols) or 'none'}); "
                            f"set data.{what}_column=<name>")
    out, empty = [], []
    for i, r in enumerate(rows, 1):
        text = r.get(dc.text_column)
        text = "" if text is None else str(text).strip()
        if not text:
            empty.append(i)
            continue
        lab = r.get(dc.label_column)
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise DataError(f"{src}: column {dc.label_column!r} is empty in row {i}; every row needs a label")
        out.append({"text": text, "label": _as_label(lab), "row": i})
    if not out:
        raise DataError(f"{src}: text column {dc.text_column!r} holds only empty strings ({len(rows)} rows); "
                        f"point data.text_column at the column with the text")
    if empty:
        log.warning("%s: skipped %d rows with an empty %r (first: row %d)", src, len(empty), dc.text_column, empty[0])
    return out


def _find_split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_FILES[split]:
        for ext in EXTS:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _hub_splits(dc: DataConfig) -> dict[str, list[dict]]:
    import datasets

    ds = datasets.load_dataset(dc.hub_id)
    out = {}
    for split, names in SPLIT_FILES.items():
        name = next((n for n in names if n in ds), None)
        if name is None:
            continue
        d = ds[name]
        for col in (dc.text_column, dc.label_column):
            if col not in d.column_names:
                raise DataError(f"hub dataset {dc.hub_id} split {name}: column {col!r} not found "
                                f"(columns: {', '.join(d.column_names)})")
        out[split] = [{"text": str(t).strip(), "label": _as_label(l), "row": i + 1, "file": f"{dc.hub_id}:{name}"}
                      for i, (t, l) in enumerate(zip(d[dc.text_column], d[dc.label_column]))]
    return out


def _check_labels(splits: dict[str, list[dict]], num_labels: int, dc: DataConfig, files: dict[str, str]) -> dict:
    """Map labels to class ids 0..num_labels-1: integers as they are, class names in sorted order."""
    names = sorted({r["label"] for rows in splits.values() for r in rows if isinstance(r["label"], str)})
    mapping = {n: i for i, n in enumerate(names)}
    if names:
        if any(isinstance(r["label"], int) for rows in splits.values() for r in rows):
            raise DataError(f"{files.get('train', 'data')}: column {dc.label_column!r} mixes numbers and class names")
        if len(names) > num_labels:
            raise DataError(f"{files.get('train', 'data')}: column {dc.label_column!r} has {len(names)} classes "
                            f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}) but model.num_labels={num_labels}; "
                            f"set model.num_labels={len(names)}")
        log.info("labels: %s", ", ".join(f"{n}={i}" for n, i in mapping.items()))
    for split, rows in splits.items():
        for r in rows:
            lab = mapping[r["label"]] if isinstance(r["label"], str) else r["label"]
            if not 0 <= lab < num_labels:
                raise DataError(f"data.path={files.get(split, split)!r}: column {dc.label_column!r} has label {lab} in row "
                                f"{r['row']}, outside 0..{num_labels - 1} for model.num_labels={num_labels}; "
                                f"set model.num_labels or fix the labels")
            r["label"] = lab
    return mapping


def load_raw(dc: DataConfig, num_labels: int) -> dict[str, list[dict]]:
    """train / val (/ test) rows of {"text", "label"}, labels checked against num_labels."""
    if dc.val_split not in VAL_SPLITS:
        raise DataError(f"data.val_split={dc.val_split!r}: must be dev or test (the split scored as val/*)")
    files: dict[str, str] = {}
    if dc.path:
        p = Path(os.path.expanduser(dc.path))
        if p.is_dir():
            splits = {}
            for split in SPLIT_FILES:
                f = _find_split_file(p, split)
                if f is not None:
                    files[split] = str(f)
                    splits[split] = read_split(f, dc)
            if "train" not in splits:
                raise DataError(f"data.path={dc.path!r}: no train file (train.tsv/.csv/.jsonl) in the folder")
        else:
            files["train"] = str(p)
            splits = {"train": read_split(p, dc)}
    elif dc.hub_id:
        splits = _hub_splits(dc)
        files = {s: f"{dc.hub_id}:{s}" for s in splits}
        if "train" not in splits:
            raise DataError(f"hub dataset {dc.hub_id}: no train split")
    else:
        raise DataError(f"data={dc.name} needs data.path=<file or folder> (or data.hub_id=<dataset> when online)")
    _check_labels(splits, num_labels, dc, files)
    if dc.val_split in splits:
        val = splits[dc.val_split]
    elif dc.val_split == "dev" and len(splits) == 1:
        # one file: hold out a seeded fraction as the validation split
        rows = list(splits["train"])
        random.Random(dc.seed).shuffle(rows)
        n_val = max(1, int(round(len(rows) * dc.val_fraction)))
        if len(rows) - n_val < 1:
            raise DataError(f"data.path={dc.path!r}: only {len(rows)} rows; too few for a train and a validation split")
        splits["train"], val = rows[n_val:], rows[:n_val]
    else:
        raise DataError(f"data.val_split={dc.val_split!r}: no {dc.val_split} split in {dc.path or dc.hub_id} "
                        f"(found: {', '.join(sorted(splits))})")
    return {"train": splits["train"], "val": val, "test": splits.get("test", []) if dc.val_split != "test" else []}


# ---------------------------------------------------------------- tokens and batches

def tokenize(rows: list[dict], tokenizer, max_len: int) -> list[dict]:
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_len)["input_ids"]
    return [{"input_ids": list(ids), "label": r["label"]} for ids, r in zip(enc, rows)]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example; labels are one class id per sequence."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        mask[i, :k] = 1
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "n_tokens": int(mask.sum()), "n_loss_tokens": len(examples)}


class ClassBatches(Batches):
    """Batches with the classification collator (same order, shuffling and length grouping)."""

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        order = self.order(epoch)
        for s in range(0, len(order), self.batch_size):
            yield collate([self.examples[i] for i in order[s:s + self.batch_size]], self.pad_id)


def prepare_data(dc: DataConfig, tokenizer, *, num_labels: int, max_seq_len: int, batch_size: int, seed: int,
                 group_by_length: bool = False, eval_batch_size: int | None = None) -> PreparedData:
    raw = load_raw(dc, num_labels)
    train_rows = raw["train"][: dc.max_train_examples] if dc.max_train_examples else raw["train"]
    val_rows = raw["val"][: dc.max_val_examples] if dc.max_val_examples else raw["val"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = tokenize(train_rows, tokenizer, max_seq_len)
    val = tokenize(val_rows, tokenizer, max_seq_len)
    return PreparedData(
        train=ClassBatches(train, batch_size, pad, shuffle=True, seed=seed, group_by_length=group_by_length),
        val=ClassBatches(val, eval_batch_size or batch_size, pad, shuffle=False, seed=seed) if val else None,
        test_rows=raw.get("test", []),
        chat_template=False,
        n_train_examples=len(train),
    )


# ---------------------------------------------------------------- scoring

def f1_score(preds: list[int], labels: list[int], num_labels: int) -> float:
    """Binary: F1 of class 1 (as GLUE reports it). More classes: macro F1."""
    def f1(c: int) -> float:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    if num_labels == 2:
        return f1(1)
    return sum(f1(c) for c in range(num_labels)) / num_labels


@torch.no_grad()
def predict(model: torch.nn.Module, val: Batches, *, device: torch.device,
            autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All validation logits (float32, on the host) and labels, in split order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for b in val.epoch(0):
        ctx = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        logits.append(out.logits.float().cpu())
        labels.append(b["labels"])
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: torch.nn.Module, val: Batches, *, device: torch.device,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    t0 = time.perf_counter()
    logits, labels = predict(model, val, device=device, autocast_dtype=autocast_dtype)
    loss = float(torch.nn.functional.cross_entropy(logits.double(), labels))
    preds = logits.argmax(-1)
    n_cls = logits.shape[-1]
    return {"val/loss": loss, "val/accuracy": float((preds == labels).double().mean()),
            "val/f1": f1_score(preds.tolist(), labels.tolist(), n_cls), "val/examples": int(labels.numel()),
            "time/val_s": time.perf_counter() - t0}


def preflight_problems(cfg) -> list[str]:
    """Task/data pairing and the data itself, before any weights load."""
    cls_data = cfg.data.name in ("sst2", "text_classification")
    if cfg.model.task == "sequence_classification":
        if not cls_data:
            return [f"data={cfg.data.name}: model.task=sequence_classification needs labelled text "
                    f"(data=sst2 or data=text_classification)"]
        if cfg.model.num_labels < 2:
            return [f"model.num_labels={cfg.model.num_labels}: needs at least 2 classes"]
        try:
            load_raw(cfg.data, cfg.model.num_labels)
        except DataError as e:
            return [str(e)]
        except Exception as e:  # noqa: BLE001 - e.g. no hub access; still one line before weights load
            return [f"data={cfg.data.name}: cannot load {cfg.data.path or cfg.data.hub_id} ({type(e).__name__}: {e}); "
                    f"give data.path=<local folder or file>"]
        return []
    if cls_data:
        return [f"data={cfg.data.name} is labelled text for a classifier; use a model with "
                f"model.task=sequence_classification (e.g. model=minilm_l6)"]
    return []


def label_counts(rows: list[dict]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in rows:
        out[r["label"]] = out.get(r["label"], 0) + 1
    return dict(sorted(out.items()))


