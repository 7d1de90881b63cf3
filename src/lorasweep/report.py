"""A study folder (<results_dir>/<study>/) -> summary.csv, summary.md and plots.

    load_study(folder)                 one row per run: swept parameters, status, every metric
    write_report(folder, baseline=..)  writes summary.csv, summary.md and the study's plots
    lorasweep-report <folder> [--baseline 'precision=fp32']

Which parameters were swept is read from the records themselves (the config values that differ
between runs), so the report needs no study file and works for any `-m` grid. A study file's
`reference:` block (kept in every record's config) adds the question, the article's finding and
its figures, printed beside the measured ones.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from .record import RECORD

# Config keys that never make two runs differ in what they compute.
IGNORED_KEYS = ("reference", "results_dir", "study", "rerun", "logger", "planner", "train.num_threads",
                "train.reuse_base", "train.device", "train.log_every", "train.save_adapter", "eval.log_samples")
# Readable names for swept keys; first in this order when they vary.
SHORT = {"lora.r": "r", "lora.alpha": "alpha", "lora.targets": "targets", "lora.trainable": "trainable",
         "lora.dropout": "dropout", "train.epochs": "epochs", "seed": "seed", "train.max_steps": "steps"}
GROUP_LABELS = ("model", "data", "method", "precision", "optimizer")
NUMERIC_PARAMS = ("r", "alpha", "dropout", "epochs", "seed", "steps")
BASE_COLUMNS = ("run_id", "label", "status")


class ReportError(ValueError):
    """A folder or baseline the report cannot use; the message says what to pass instead."""


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


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _group_labels(cfg: dict) -> dict[str, str]:
    """One readable value per config group: what a reader calls the choice (nf4, adamw_cosine, ...)."""
    lo, op = cfg.get("lora", {}), cfg.get("optimizer", {})
    method = lo.get("method", "lora")
    if method == "lora":
        tg = lo.get("targets") or []
        m = f"lora r{lo.get('r')}/a{_num(lo.get('alpha'))} {','.join(map(str, tg))}"
    elif method == "partial":
        m = f"partial {','.join(map(str, lo.get('trainable') or []))}"
    else:
        m = method
    sched = op.get("schedule", "constant")
    return {"model": cfg.get("model", {}).get("name"), "data": cfg.get("data", {}).get("name"), "method": m,
            "precision": cfg.get("precision", {}).get("name"),
            "optimizer": f"{op.get('name')}" + (f"_{sched}" if sched and sched != "constant" else "")}


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
    cfg_df = pd.DataFrame(flat_cfgs)
    varying = [c for c in cfg_df.columns if cfg_df[c].astype(str).nunique() > 1]
    df = pd.DataFrame(rows)
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
        if g not in swept and g not in varying:
            df = df.drop(columns=g)
    df["label"] = [", ".join(f"{c}={_num(row[c])}" for c in swept) or row["run_id"] for _, row in df.iterrows()]

    # rows in the order of the swept values: numbers ascending, names in the order the sweep ran them
    keys = []
    for c in swept:
        num = pd.to_numeric(df[c], errors="coerce")
        if num.notna().all():
            keys.append(num)
        else:
            first = {v: i for i, v in reversed(list(enumerate(df[c].astype(str))))}
            keys.append(df[c].astype(str).map(first))
    if keys:
        order = pd.DataFrame({i: k for i, k in enumerate(keys)}).sort_values(list(range(len(keys))), kind="stable").index
        df = df.loc[order].reset_index(drop=True)

    metric_cols = sorted({k for _, rec in recs for k in (rec.get("metrics") or {})})
    lead = list(BASE_COLUMNS) + swept + [c for c in varying if c not in swept]
    df = df[lead + [c for c in metric_cols if c not in lead] + ["error", "run_dir"]]
    df.attrs.update(study=recs[0][1].get("study") or folder.name, swept=swept, varying=varying,
                    reference=reference or {}, folder=str(folder))
    return df


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


def _human_time(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key.startswith("time/"):
        return _human_time(float(v))
    if key.startswith("params/") and not key.endswith("pct"):
        return f"{int(v):,}"
    if key.startswith(("mem/", "plan/")):
        return f"{float(v):.2f}"
    if key.startswith("throughput/"):
        return f"{float(v):,.0f}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


HEADERS = {"time/train_s": "train time", "mem/peak_allocated_gb": "peak alloc GB", "mem/peak_rss_gb": "peak RSS GB",
           "plan/peak_gb": "plan GB", "params/trainable": "trainable", "throughput/tokens_per_s": "tok/s",
           "train/loss": "train loss", "val/loss": "val loss", "val/perplexity": "val ppl",
           "val/accuracy": "val acc", "val/f1": "val F1"}


def _article_key(key: str, mem: str | None) -> str:
    """The measured column an article figure sits beside (GPU allocated vs our RSS on a CPU)."""
    return mem if key.startswith("mem/peak") and mem else key


def _find_baseline(df: pd.DataFrame, baseline: str | dict | None, strict: bool = True) -> int | None:
    """Index of the baseline row: a label ('precision=fp32'), a run id, or a {param: value} dict.
    Not strict (the study's own default): no match falls back to the first completed run."""
    if baseline is not None and not strict:
        try:
            return _find_baseline(df, baseline)
        except ReportError:
            baseline = None
    if baseline is None:
        done = df.index[df["status"] == "completed"]
        return int(done[0]) if len(done) else None
    if isinstance(baseline, dict):
        want = {str(k): _num(v) for k, v in baseline.items()}
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
            m &= df[k].map(_num) == want[k]
        if m.any():
            return int(df.index[m][0])
    raise ReportError(f"baseline={baseline!r}: matches no run; use one of: " + "; ".join(df["label"].astype(str)))


# ----------------------------------------------------------------------------- summary.md

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _ratio(v, b) -> str:
    try:
        v, b = float(v), float(b)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(v) or math.isnan(b) or b == 0:
        return "-"
    return f"{v / b:.2f}x"


def summary_table(df: pd.DataFrame, baseline: str | dict | None = None) -> str:
    """The article-shaped table: swept values | status | cost with x-baseline | scores, article beside."""
    ref = df.attrs.get("reference") or {}
    swept = df.attrs.get("swept") or []
    b = _find_baseline(df, baseline) if baseline is not None else _find_baseline(df, ref.get("baseline"), strict=False)
    mem = memory_key(df)
    article: dict = ref.get("article") or {}
    art_base = article.get(ref.get("article_baseline"), {}) if ref.get("article_baseline") else {}

    # measured metric columns, cost first
    cols: list[str] = []
    for k in ("time/train_s", mem, "plan/peak_gb", "params/trainable", "throughput/tokens_per_s",
              "train/loss", "val/loss", "val/perplexity", "val/accuracy", "val/f1"):
        if k and k in df.columns and df[k].notna().any():
            cols.append(k)
    cols += score_keys(df)
    art_cols = {_article_key(k, mem) for row in article.values() for k in (row or {})}
    cols += [k for k in sorted(art_cols) if k not in cols]  # an article figure we did not measure
    ratio_cols = {"time/train_s", mem}

    header = swept[:] if swept else ["run"]
    header += ["status"]
    for k in cols:
        header.append(HEADERS.get(k, k))
        if k in ratio_cols and b is not None:
            header.append("x base")
        if k in art_cols:
            header.append(f"article {HEADERS.get(k, k)}" + (" (GPU alloc)" if k == "mem/peak_rss_gb" else ""))
            if k in ratio_cols and art_base:
                header.append("article x base")
    rows = []
    order = ([b] if b is not None else []) + [i for i in df.index if i != b]  # the baseline first
    for i in order:
        r = df.loc[i]
        lab = r["label"]
        arow = {_article_key(k, mem): v for k, v in (article.get(lab) or {}).items()}
        borrowed = ""
        if i == b and not arow and art_base:  # the measured baseline stands where the article's did
            arow = {_article_key(k, mem): v for k, v in art_base.items()}
            borrowed = f" ({str(ref.get('article_baseline')).split('=', 1)[-1]})"
        out = [_num(r[c]) for c in swept] if swept else [r["run_id"]]
        out[0] = out[0] + (" (baseline)" if i == b else "")
        out.append(str(r["status"]))
        for k in cols:
            v = r.get(k)
            cell = _fmt(k, v)
            base_v = r.get(k.replace("eval/", "eval_base/", 1)) if k.startswith("eval/") else None
            if base_v is not None and not pd.isna(base_v) and not pd.isna(v):
                cell += f" ({float(v) - float(base_v):+.4f} vs base model)"
            out.append(cell)
            if k in ratio_cols and b is not None:
                out.append(_ratio(v, df.loc[b, k]) if r["status"] == "completed" else "-")
            if k in art_cols:
                out.append(_fmt(k, arow.get(k)) + (borrowed if k in arow else ""))
                if k in ratio_cols and art_base:
                    base_art = {_article_key(kk, mem): vv for kk, vv in art_base.items()}
                    out.append(_ratio(arow.get(k), base_art.get(k)) if k in arow else "-")
        rows.append(out)
    return _md_table(header, rows)


def seed_table(df: pd.DataFrame) -> str | None:
    """mean ± std (n) of every numeric metric over seeds, per combination of the other swept values."""
    swept = df.attrs.get("swept") or []
    if "seed" not in swept:
        return None
    done = df[df["status"] == "completed"]
    if done.empty:
        return None
    keys = [k for k in ("time/train_s", memory_key(df), "params/trainable", "train/loss", "val/loss",
                        "val/perplexity", "val/accuracy") if k and k in done.columns] + score_keys(done)
    by = [c for c in swept if c != "seed"]
    groups = done.groupby([done[c].astype(str) for c in by]) if by else [("all seeds", done)]
    header = (by or ["runs"]) + ["n"] + [HEADERS.get(k, k) for k in keys]
    rows = []
    for name, g in groups:
        name = name if isinstance(name, tuple) else (name,)
        cells = [str(x) for x in name] + [str(len(g))]
        for k in keys:
            x = pd.to_numeric(g[k], errors="coerce").dropna()
            cells.append("-" if x.empty else f"{x.mean():.4g} ± {x.std(ddof=1) if len(x) > 1 else 0:.2g}")
        rows.append(cells)
    return _md_table(header, rows)


def summary_markdown(df: pd.DataFrame, baseline: str | dict | None = None, plots: list[str] = ()) -> str:
    ref = df.attrs.get("reference") or {}
    n = df["status"].value_counts().to_dict()
    lines = [f"# Study: {df.attrs.get('study')}", ""]
    if ref.get("question"):
        lines += [f"**Question.** {ref['question']}", ""]
    if ref.get("finding"):
        src = f" ({ref['source']})" if ref.get("source") else ""
        lines += [f"**The article's finding{src}:** {ref['finding']}", ""]
    lines += [f"{len(df)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(n.items())) + ".", ""]
    lines += [summary_table(df, baseline), ""]
    mem = memory_key(df)
    notes = []
    if mem == "mem/peak_rss_gb":
        notes.append("Memory is the process's peak resident set (CPU run)" +
                     ("; the article's figures are GPU peak allocated." if ref.get("article") else "."))
    notes.append("`x base` columns divide by the baseline row; scores are on this run's own data and scale.")
    lines += ["_" + " ".join(notes) + "_", ""]
    st = seed_table(df)
    if st:
        lines += ["## Across seeds (mean ± std)", "", st, ""]
    failed = df[df["status"] != "completed"]
    if len(failed):
        lines += ["## Runs that did not complete", ""]
        lines += [f"- `{r['run_id']}` ({r['status']}): {r['error'] or 'no error recorded'}" for _, r in failed.iterrows()]
        lines += [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _subplots(*args, **kw):
    """A figure outside pyplot: files only, no backend switch (a notebook's inline plots keep working)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kw.pop("figsize", None))
    return fig, fig.subplots(*args, **kw)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_loss_curves(df: pd.DataFrame, path: Path) -> Path | None:
    fig, ax = _subplots(figsize=(7, 4.5))
    drawn = 0
    for _, r in df.iterrows():
        s = load_steps(r["run_dir"])
        if s.empty or "train/loss" not in s:
            continue
        ax.plot(s["step"], s["train/loss"], marker="." if len(s) < 30 else None, label=r["label"],
                linestyle="--" if r["status"] != "completed" else "-")
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{df.attrs.get('study')}: training loss")
    ax.legend(fontsize=7, ncol=2 if drawn > 6 else 1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_heatmap(df: pd.DataFrame, path: Path) -> Path | None:
    """r x alpha of the primary score; alpha as a multiple of r when alpha was set relative to r."""
    ps = primary_score(df)
    done = df[df["status"] == "completed"]
    if ps is None or done.empty:
        return None
    key, hi = ps
    d = done.assign(r=pd.to_numeric(done["r"]), alpha=pd.to_numeric(done["alpha"]))
    pv = d.pivot_table(index="r", columns="alpha", values=key, aggfunc="mean")
    col_name = "alpha"
    if pv.notna().to_numpy().mean() < 0.6:  # a diagonal grid (alpha = r/2, r, 2r): use alpha / r
        d = d.assign(ratio=d["alpha"] / d["r"])
        pv = d.pivot_table(index="r", columns="ratio", values=key, aggfunc="mean")
        col_name = "alpha / r"
    fig, ax = _subplots(figsize=(1.4 * len(pv.columns) + 2.5, 0.7 * len(pv.index) + 2))
    im = ax.imshow(pv.to_numpy(dtype=float), cmap="viridis" if hi else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(pv.columns)), [_num(float(c)) for c in pv.columns])
    ax.set_yticks(range(len(pv.index)), [_num(float(i)) for i in pv.index])
    ax.set_xlabel(col_name)
    ax.set_ylabel("r")
    vals = pv.to_numpy(dtype=float)
    best = (pd.Series(vals.ravel()).idxmax() if hi else pd.Series(vals.ravel()).idxmin())
    for (i, j), v in pd.DataFrame(vals).stack().items():
        bold = i * vals.shape[1] + j == best
        lo, top = pd.Series(vals.ravel()).min(), pd.Series(vals.ravel()).max()
        t = (v - lo) / (top - lo) if top > lo else 0.5
        bright = t > 0.5 if hi else t < 0.5  # viridis is light at its top end
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="k" if bright else "w", fontsize=9,
                fontweight="bold" if bold else None)
    fig.colorbar(im, ax=ax, label=key + (" (higher is better)" if hi else " (lower is better)"))
    ax.set_title(f"{df.attrs.get('study')}: {key} by r and {col_name}")
    return _save(fig, path)


def plot_mem_vs_time(df: pd.DataFrame, path: Path) -> Path | None:
    mem = memory_key(df)
    done = df[df["status"] == "completed"]
    if mem is None or "time/train_s" not in df.columns or done.empty:
        return None
    fig, ax = _subplots(figsize=(6.5, 4.5))
    ax.scatter(done["time/train_s"], done[mem], s=40)
    for _, r in done.iterrows():
        ax.annotate(str(r["label"]), (r["time/train_s"], r[mem]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("train time (s)")
    ax.set_ylabel(HEADERS.get(mem, mem))
    ax.set_title(f"{df.attrs.get('study')}: memory vs time")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    return _save(fig, path)


def plot_score_by_run(df: pd.DataFrame, path: Path) -> Path | None:
    ps = primary_score(df)
    done = df[df["status"] == "completed"]
    if ps is None or done.empty:
        return None
    key, hi = ps
    fig, ax = _subplots(figsize=(6.5, 0.45 * len(done) + 1.6))
    ax.barh(done["label"].astype(str), done[key])
    ax.invert_yaxis()
    ax.set_xlabel(key + (" (higher is better)" if hi else " (lower is better)"))
    ax.set_title(f"{df.attrs.get('study')}: {key}")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_score_vs_param(df: pd.DataFrame, param: str, path: Path) -> Path | None:
    ps = primary_score(df)
    done = df[df["status"] == "completed"]
    if ps is None or done.empty:
        return None
    key, hi = ps
    d = done.assign(_x=pd.to_numeric(done[param])).sort_values("_x")
    fig, ax = _subplots(figsize=(6.5, 4.2))
    ax.plot(d["_x"], d[key], marker="o", label=key)
    if "train/loss" in d and key != "train/loss":
        ax.plot(d["_x"], d["train/loss"], marker="s", linestyle="--", label="train/loss")
    if param in ("alpha", "r") and d["_x"].min() > 0 and d["_x"].max() / d["_x"].min() >= 16:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(d["_x"]), [_num(float(x)) for x in d["_x"]])
    ax.set_xlabel(param)
    ax.set_ylabel("loss" if not hi else key)
    ax.set_title(f"{df.attrs.get('study')}: {key} vs {param}")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_seed_spread(df: pd.DataFrame, path: Path) -> Path | None:
    """Each metric's per-seed values with the mean ± std, one small panel per metric."""
    done = df[df["status"] == "completed"]
    keys = [k for k in ("train/loss", "val/loss", "val/accuracy", "time/train_s", memory_key(df))
            if k and k in done.columns and done[k].notna().any()] + score_keys(done)[:2]
    if done.empty or not keys:
        return None
    by = [c for c in (df.attrs.get("swept") or []) if c != "seed"]
    groups = list(done.groupby([done[c].astype(str) for c in by])) if by else [("all", done)]
    fig, axes = _subplots(1, len(keys), figsize=(2.6 * len(keys) + 1, 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for gi, (name, g) in enumerate(groups):
            x = pd.to_numeric(g[k], errors="coerce").dropna()
            ax.scatter([gi] * len(x), x, s=14, alpha=0.6)
            ax.errorbar([gi + 0.15], [x.mean()], yerr=[x.std(ddof=1) if len(x) > 1 else 0], fmt="o", color="k", capsize=4)
        ax.set_xticks(range(len(groups)), [str(n if not isinstance(n, tuple) else ",".join(n)) for n, _ in groups],
                      fontsize=7)
        ax.set_title(HEADERS.get(k, k), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{df.attrs.get('study')}: spread over seeds (mean ± std)")
    return _save(fig, path)


def make_plots(df: pd.DataFrame, folder: Path) -> list[Path]:
    """The plots that answer this study's question, chosen from what was swept."""
    swept = df.attrs.get("swept") or []
    out: list[Path | None] = []
    if "r" in swept and "alpha" in swept:
        out.append(plot_heatmap(df, folder / "heatmap_r_alpha.png"))
    if set(swept) & {"precision", "optimizer", "method", "targets", "model", "trainable"}:
        out.append(plot_mem_vs_time(df, folder / "memory_vs_time.png"))
        out.append(plot_score_by_run(df, folder / "score_by_run.png"))
    numeric = [c for c in swept if c in NUMERIC_PARAMS and c != "seed"]
    if len(swept) == 1 and numeric:
        out.append(plot_score_vs_param(df, numeric[0], folder / f"score_vs_{numeric[0]}.png"))
    if "seed" in swept:
        out.append(plot_seed_spread(df, folder / "seed_spread.png"))
    out.append(plot_loss_curves(df, folder / "loss_curves.png"))
    return [p for p in out if p is not None]


# ----------------------------------------------------------------------------- entry points

def write_report(folder: str | Path, baseline: str | dict | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md and the plots into the study folder; return their paths.

    baseline: the row the `x base` columns divide by, as a label ('precision=fp32'), a run id or a
    {param: value} dict; default the study's reference.baseline, else the first completed run.
    """
    folder = Path(folder)
    df = load_study(folder)
    if baseline is not None:
        _find_baseline(df, baseline)  # a wrong --baseline fails before any file is written
    csv = folder / "summary.csv"
    df.drop(columns=["run_dir"]).to_csv(csv, index=False)
    plots = make_plots(df, folder)
    md = folder / "summary.md"
    md.write_text(summary_markdown(df, baseline, [str(p) for p in plots]))
    return {"csv": csv, "md": md, **{p.stem: p for p in plots}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lorasweep-report",
                                 description="Turn a study folder (<results_dir>/<study>) into summary.csv, summary.md and plots.")
    ap.add_argument("folder", help="the study folder, e.g. results/rank_alpha")
    ap.add_argument("--baseline", default=None,
                    help="row the ratio columns divide by, e.g. 'precision=fp32' or 'r=16, alpha=32' (default: the study's)")
    a = ap.parse_args(argv)
    try:
        paths = write_report(a.folder, a.baseline)
    except ReportError as e:
        print(f"lorasweep-report: {e}", file=sys.stderr)
        sys.exit(2)
    print(Path(paths["md"]).read_text().split("\n## Plots")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
