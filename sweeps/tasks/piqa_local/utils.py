"""PIQA's validation split from local files (no hub): $LORASWEEP_DATA/piqa/valid.jsonl and
valid-labels.lst (the format of the original release, ybisk/ybisk.github.io)."""
import json
import os
from pathlib import Path


def load(**kwargs):
    import datasets

    root = Path(os.environ.get("LORASWEEP_DATA", "../shared/data")) / "piqa"
    docs = [json.loads(line) for line in (root / "valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (root / "valid-labels.lst").read_text().split()]
    if len(docs) != len(labels):
        raise ValueError(f"{root}: {len(docs)} questions but {len(labels)} labels")
    for d, label in zip(docs, labels):
        d["label"] = label
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})
