"""Extra instruction data named inside a run's config: examples mixed into training (``data.mix``)
and further validation sets scored beside the run's own (``eval.val_sets``).

A source is a small mapping: ``{name: arithmetic | alpaca | jsonl, path: <file>, n: <examples>}``
plus any other ``data.*`` field (seed, val_fraction). It is split into train / val exactly as
``data=<name>`` would split it, so a mixed-in source's validation rows never reach training and
a validation set drawn from the run's own file is the run's own validation split.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..config import DataConfig

SOURCE_NAMES = ("arithmetic", "alpaca", "jsonl")
_DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)} - {"mix", "name"}


def source_problems(spec: Any, field: str, *, needs_n: bool) -> list[str]:
    """Every problem with one source, each naming ``field`` and the fix (checked before weights load)."""
    if not isinstance(spec, dict):
        return [f"{field}={spec!r}: must be a mapping like {{name: arithmetic, n: 200}} or {{name: jsonl, path: FILE, n: 500}}"]
    out = []
    name = spec.get("name")
    if name not in SOURCE_NAMES:
        out.append(f"{field}.name={name!r}: must be one of {', '.join(SOURCE_NAMES)}")
    unknown = sorted(set(spec) - _DATA_FIELDS - {"name", "n"})
    if unknown:
        out.append(f"{field}: unknown key(s) {', '.join(unknown)}; use name, path, n or a data.* field")
    n = spec.get("n")
    if (needs_n or n is not None) and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        out.append(f"{field}.n={n!r}: must be a positive number of examples")
    path = spec.get("path")
    if name in ("alpaca", "jsonl") and not path:
        out.append(f"{field}.path=None: {name} needs a local file (path: /path/to/file.json)")
    elif path and not os.path.exists(os.path.expanduser(str(path))):
        out.append(f"{field}.path={path!r}: no such file; give an existing path")
    return out


def source_config(spec: dict) -> tuple[DataConfig, int | None]:
    """The DataConfig a source stands for, and how many of its examples to take (None = all)."""
    fields = {k: v for k, v in spec.items() if k != "n"}
    if fields.get("name") == "alpaca" and "hub_id" not in fields:
        fields["hub_id"] = None  # local files only: a mixed source never reaches for the hub
    return DataConfig(**fields), spec.get("n")


def mixed_train_rows(specs: list[dict]) -> list[dict]:
    """The training rows every ``data.mix`` source adds: the first n of its train split."""
    from .data import load_raw

    rows: list[dict] = []
    for spec in specs:
        dc, n = source_config(spec)
        rows.extend(load_raw(dc)["train"][:n])
    return rows


def val_rows(spec: dict, default_n: int | None) -> list[dict]:
    """A validation set's rows: the first n (or data.max_val_examples) of its val split."""
    from .data import load_raw

    dc, n = source_config(spec)
    n = n or default_n
    rows = load_raw(dc)["val"]
    return rows[:n] if n else rows
