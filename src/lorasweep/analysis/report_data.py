"""A study folder as a DataFrame: run records and step logs loaded, the columns worth showing
(memory, scores) picked, and the baseline row found. The tables, plots and statistics read this frame.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ..claims import ReportError  # noqa: F401  (raised here, re-exported for the report)
from ..config import LoraConfig, lora_variant
from ..run.record import RECORD

# Config keys that never make two runs differ in what they compute.
IGNORED_KEYS = ("reference", "results_dir", "study", "rerun", "logger", "planner", "train.num_threads",
                "train.reuse_base", "train.device", "train.log_every", "train.save_adapter", "eval.log_samples",
                "pruner", "search", "train.eval_every", "train.eval_examples")
# Readable names for swept keys; first in this order when they vary.
SHORT = {"lora.r": "r", "lora.alpha": "alpha", "lora.targets": "targets", "lora.trainable": "trainable",
         "lora.dropout": "dropout", "train.epochs": "epochs", "seed": "seed", "train.max_steps": "steps"}
GROUP_LABELS = ("model", "data", "method", "variant", "precision", "optimizer")
NUMERIC_PARAMS = ("r", "alpha", "dropout", "epochs", "seed", "steps")
BASE_COLUMNS = ("run_id", "label", "status")




# ----------------------------------------------------------------------------- loading

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))  # hashable and readable: "q_proj,v_proj"
        else:
            out[key] = v
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _group_labels(cfg: dict) -> dict[str, str]:
    """One readable value per config group: what a reader calls the choice (nf4, adamw_cosine, ...)."""
    lo, op = cfg.get("lora", {}), cfg.get("optimizer", {})
    method = lo.get("method", "lora")
    if method == "lora":
        tg = lo.get("targets") or []
        m = f"lora r{lo.get('r')}/a{num(lo.get('alpha'))} {','.join(map(str, tg))}"
    elif method == "partial":
        m = f"partial {','.join(map(str, lo.get('trainable') or []))}"
    else:
        m = method
    sched = op.get("schedule", "constant")
    return {"model": cfg.get("model", {}).get("name"), "data": _data_label(cfg.get("data", {})), "method": m,
            "variant": _variant(lo),
            "precision": cfg.get("precision", {}).get("name"),
            "optimizer": f"{op.get('name')}" + (f"_{sched}" if sched and sched != "constant" else "")}


def _data_label(da: dict) -> str:
    """The data a run trained on: its file's stem when it names one (lima, alpaca_5000), else the
    data set's name; each data.mix source adds +<source><n> (alpaca_5000+arithmetic200)."""
    def one(d: dict) -> str:
        return Path(str(d["path"])).stem if d.get("path") else str(d.get("name"))

    return one(da) + "".join(f"+{one(m)}{m.get('n', '')}" for m in (da.get("mix") or []) if isinstance(m, dict))


def _variant(lo: dict) -> str:
    """lora, dora, rslora, pissa, loraplus_x16, ... (config.lora_variant; older records: plain lora)."""
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return lora_variant(LoraConfig(**{k: v for k, v in lo.items() if k in known}))


def _run_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / RECORD).is_file())


def _read_records(folder: Path) -> list[tuple[Path, dict]]:
    out = []
    for d in _run_folders(folder):
        try:
            out.append((d, json.loads((d / RECORD).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            print(f"lorasweep-report: skipping {d / RECORD}: unreadable ({e})", file=sys.stderr)
    return out


def _determined(df: pd.DataFrame, by: list[str], col: str) -> bool:
    """True when `col` has one value per combination of `by` (so it adds nothing to a label)."""
    vals = df[col].astype(str)
    if not by:
        return vals.nunique() <= 1
    return bool((vals.groupby([df[b].astype(str) for b in by]).nunique() <= 1).all())


def load_study(folder: str | Path) -> pd.DataFrame:
    """One row per run folder with a record.json (the .sweeps/ bookkeeping is ignored).

    Columns: run_id, label (the swept values, e.g. "r=16, alpha=32"), status, the swept parameters
    (readable names: r, alpha, precision, optimizer, method, ...), every varying config key
    (dotted), every metric (its own key, e.g. val/loss), error, run_dir.
    df.attrs: study, swept (the readable parameter columns), varying (dotted keys), reference.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"study folder {str(folder)!r}: no such folder; pass <results_dir>/<study>")
    recs = _read_records(folder)
    if not recs:
        raise ReportError(f"study folder {str(folder)!r}: no run records (<run>/record.json) in it; "
                          "pass the folder a sweep wrote, e.g. results/rank_alpha")
    recs.sort(key=lambda t: (t[1].get("started_at") or "", t[1].get("run_id") or t[0].name))

    rows, flat_cfgs, reference = [], [], None
    for d, rec in recs:
        cfg = rec.get("config") or {}
        if reference is None and cfg.get("reference"):
            reference = cfg["reference"]
        flat = {k: v for k, v in _flatten(cfg).items() if not _ignored(k)}
        flat_cfgs.append(flat)
        row = {"run_id": rec.get("run_id", d.name), "status": rec.get("status", "unknown"),
               **_group_labels(cfg), **(rec.get("metrics") or {}),
               "error": rec.get("error"), "run_dir": str(d)}
        rows.append(row)
    metric_cols = sorted({k for _, rec in recs for k in (rec.get("metrics") or {})})
    return _frame(pd.DataFrame(rows), pd.DataFrame(flat_cfgs), metric_cols,
                  study=recs[0][1].get("study") or folder.name, reference=reference or {}, folder=folder)


def _frame(df: pd.DataFrame, cfg_df: pd.DataFrame, metric_cols: list[str], *, study: str, reference: dict,
           folder: Path) -> pd.DataFrame:
    """The report's frame from one row per run (group labels, metrics, status) and its flat config."""
    varying = [c for c in cfg_df.columns if cfg_df[c].astype(str).nunique() > 1]
    for c in varying:
        df[c] = cfg_df[c].values

    # Readable swept columns: group labels first, then known keys, then the rest; each kept only
    # if the ones before do not already determine it (lr follows from the optimizer, train.seed from seed).
    swept: list[str] = []
    cands = [(g, g) for g in GROUP_LABELS] + [(SHORT[k], k) for k in SHORT if k in varying] + \
            [(k, k) for k in varying if k not in SHORT]
    for name, src in cands:
        if name in swept or src not in df.columns or df[src].astype(str).nunique() <= 1:
            continue
        if name == "method" and "lora.method" not in varying:
            continue  # LoRA throughout: r, alpha and targets get their own columns
        if src.startswith("lora.") and "method" in swept and src not in ("lora.dropout",):
            continue  # the method label already spells r, alpha and targets
        if not _determined(df, [df_col for df_col in swept], src):
            if name != src:
                df[name] = df[src]
            swept.append(name)
    for g in GROUP_LABELS:  # labels of groups that did not vary are noise in the table
        if g not in swept and g not in varying and g in df.columns:
            df = df.drop(columns=g)
    df["label"] = [", ".join(f"{c}={num(row[c])}" for c in swept) or row["run_id"] for _, row in df.iterrows()]

    # rows in the order of the swept values: numbers ascending, names in the order the sweep ran them
    keys = []
    for c in swept:
        numeric = pd.to_numeric(df[c], errors="coerce")
        if numeric.notna().all():
            keys.append(numeric)
        else:
            first = {v: i for i, v in reversed(list(enumerate(df[c].astype(str))))}
            keys.append(df[c].astype(str).map(first))
    if keys:
        order = pd.DataFrame({i: k for i, k in enumerate(keys)}).sort_values(list(range(len(keys))), kind="stable").index
        df = df.loc[order].reset_index(drop=True)

    lead = list(BASE_COLUMNS) + swept + [c for c in varying if c not in swept]
    if "run_dir" not in df.columns:
        df["run_dir"] = None
    df = df[lead + [c for c in metric_cols if c not in lead and c in df.columns] + ["error", "run_dir"]]
    constant = {k: v for k, v in (cfg_df.iloc[0].to_dict() if len(cfg_df) else {}).items() if k not in varying}
    df.attrs.update(study=study, swept=swept, varying=varying, reference=reference, folder=str(folder),
                    constant=constant)
    return df


def load_summary_csv(folder: str | Path, reference: dict) -> pd.DataFrame:
    """A study re-read from the summary.csv an earlier report wrote, when its run folders are gone
    (an archived reference): the same frame load_study gives, with the study file's current claims
    (``reference``), so the runs can be judged again with newer statistics. The csv holds the config
    keys that varied between the runs (dotted), the group labels and every metric."""
    folder = Path(folder)
    csv = folder / "summary.csv"
    if not csv.is_file():
        raise ReportError(f"study folder {str(folder)!r}: no run records and no summary.csv to re-read")
    raw = pd.read_csv(csv)
    cfg_cols = [c for c in raw.columns if ("." in c and "/" not in c) or c == "seed"]
    rows = raw.drop(columns=[c for c in cfg_cols + ["label"] if c in raw.columns])
    rows = rows.astype(object).where(rows.notna(), None)
    metric_cols = [c for c in raw.columns if "/" in c]
    df = _frame(rows, raw[cfg_cols].copy(), metric_cols, study=folder.name, reference=reference, folder=folder)
    df.attrs["archived"] = True
    return df


def has_records(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and bool(_run_folders(folder))


def load_steps(run_dir: str | Path) -> pd.DataFrame:
    """A run's steps.jsonl as a frame (step, train/loss, ...); empty if the run logged none."""
    p = Path(run_dir) / "steps.jsonl"
    if not p.is_file():
        return pd.DataFrame()
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-line leaves half a line
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- what to show

def memory_key(df: pd.DataFrame) -> str | None:
    """GPU peak allocated where measured, else the process's peak RSS."""
    for k in ("mem/peak_allocated_gb", "mem/peak_rss_gb"):
        if k in df.columns and df[k].notna().any():
            return k
    return None


def score_keys(df: pd.DataFrame) -> list[str]:
    """Benchmark scores (eval/<task>/<metric>, no stderr) in column order."""
    return [c for c in df.columns if c.startswith("eval/") and not c.endswith("_stderr") and df[c].notna().any()]


def primary_score(df: pd.DataFrame) -> tuple[str, bool] | None:
    """(metric, higher_is_better): a benchmark score if any, else val accuracy, else val loss."""
    scores = score_keys(df)
    for pref in ("exact_match", "acc", "acc_norm"):
        for c in scores:
            if c.rsplit("/", 1)[-1].startswith(pref):
                return c, True
    if scores:
        return scores[0], True
    for k, hi in (("val/accuracy", True), ("val/loss", False), ("train/loss", False)):
        if k in df.columns and df[k].notna().any():
            return k, hi
    return None


HEADERS = {"time/train_s": "train time", "mem/peak_allocated_gb": "peak alloc GB", "mem/peak_rss_gb": "peak RSS GB",
           "plan/peak_gb": "plan GB", "params/trainable": "trainable", "throughput/tokens_per_s": "tok/s",
           "train/loss": "train loss", "val/loss": "val loss", "val/perplexity": "val ppl",
           "val/accuracy": "val acc", "val/f1": "val F1"}


def find_baseline(df: pd.DataFrame, baseline: str | dict | None, strict: bool = True) -> int | None:
    """Index of the baseline row: a label ('precision=fp32'), a run id, or a {param: value} dict.
    Not strict (the study's own default): no match falls back to the first completed run."""
    if baseline is not None and not strict:
        try:
            return find_baseline(df, baseline)
        except ReportError:
            baseline = None
    if baseline is None:
        done = df.index[df["status"] == "completed"]
        return int(done[0]) if len(done) else None
    if isinstance(baseline, dict):
        want = {str(k): num(v) for k, v in baseline.items()}
    else:
        hit = df.index[(df["run_id"] == str(baseline)) | (df["label"] == str(baseline))]
        if len(hit):
            return int(hit[0])
        want = {}
        for part in str(baseline).split(","):
            if "=" in part:
                k, v = part.split("=", 1)
                want[k.strip()] = v.strip()
    cols = [k for k in want if k in df.columns]
    if want and len(cols) == len(want):
        m = pd.Series(True, index=df.index)
        for k in cols:
            m &= df[k].map(num) == want[k]
        if m.any():
            return int(df.index[m][0])
    raise ReportError(f"baseline={baseline!r}: matches no run; use one of: " + "; ".join(df["label"].astype(str)))


