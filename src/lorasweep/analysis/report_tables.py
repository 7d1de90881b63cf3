"""summary.md: the article-shaped table (x-baseline ratios, the article's figures beside the measured
ones), the verdicts on the study's claims, the across-seeds tables (mean, interval, sd, n per arm;
differences from the baseline arm) and the page that holds them."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .report_claims import evaluate_claims, selection_lines, verdicts_markdown
from .report_data import HEADERS, find_baseline, num, memory_key, score_keys
from .report_stats import INTERVAL_NAME, arms, baseline_arm, t_interval, welch_interval


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


def _article_key(key: str, mem: str | None) -> str:
    """The measured column an article figure sits beside (GPU allocated vs our RSS on a CPU)."""
    return mem if key.startswith("mem/peak") and mem else key


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
    b = find_baseline(df, baseline) if baseline is not None else find_baseline(df, ref.get("baseline"), strict=False)
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
        out = [num(r[c]) for c in swept] if swept else [r["run_id"]]
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


def _arm_keys(df: pd.DataFrame) -> list[str]:
    """The columns the across-seeds tables show (every column's numbers are in arms.csv)."""
    done = df[df["status"] == "completed"]
    return [k for k in ("time/train_s", memory_key(df), "params/trainable", "train/loss", "val/loss",
                        "val/perplexity", "val/accuracy") if k and k in done.columns and done[k].notna().any()] \
        + score_keys(done)


def _repeated(df: pd.DataFrame) -> bool:
    return any(len(g) > 1 for _, g in arms(df))


def seed_table(df: pd.DataFrame) -> str | None:
    """Per arm (runs that differ only in seed): n, and mean ± 95% t-interval half-width (sd) of each
    metric. None when no arm has more than one run."""
    if not _repeated(df):
        return None
    keys = _arm_keys(df)
    header = ["arm", "n"] + [HEADERS.get(k, k) for k in keys]
    rows = []
    for arm, g in arms(df):
        cells = [arm, str(len(g))]
        for k in keys:
            e = t_interval(g[k])
            if e.n == 0:
                cells.append("-")
            elif e.n == 1:
                cells.append(_fmt(k, e.mean))
            else:
                cells.append(f"{_fmt(k, e.mean)} ± {_fmt(k, e.half_width)} (sd {_fmt(k, e.std)})")
        rows.append(cells)
    return _md_table(header, rows)


def diff_table(df: pd.DataFrame, baseline: str | dict | None = None) -> str | None:
    """Each arm minus the baseline arm: difference of means [Welch 95% interval]. None without
    repeated arms or with a single arm."""
    groups = arms(df)
    if len(groups) < 2 or not _repeated(df):
        return None
    base = baseline_arm(df, baseline)
    base_runs = dict(groups)[base]
    keys = _arm_keys(df)
    rows = []
    for arm, g in groups:
        if arm == base:
            continue
        cells = [arm]
        for k in keys:
            d = welch_interval(g[k], base_runs[k])
            if math.isnan(d.diff):
                cells.append("-")
            elif not d.known:
                cells.append(f"{_fmt(k, d.diff)} (n=1)")
            else:
                mark = " *" if d.low > 0 or d.high < 0 else ""
                cells.append(f"{_fmt(k, d.diff)} [{_fmt(k, d.low)}, {_fmt(k, d.high)}]{mark}")
        rows.append(cells)
    return f"Baseline arm: {base}.\n\n" + _md_table(["arm"] + [HEADERS.get(k, k) for k in keys], rows)


def forecast_table(df: pd.DataFrame) -> str | None:
    """Each completed run's training-time forecast (plan/train_s, made before it trained) against its
    measured time/train_s, and the sweep's total, or None where no run has a forecast."""
    if "plan/train_s" not in df.columns or "time/train_s" not in df.columns:
        return None
    done = df[(df["status"] == "completed") & df["plan/train_s"].notna() & df["time/train_s"].notna()]
    if done.empty:
        return None
    rows = []
    for _, r in done.iterrows():
        f, m = float(r["plan/train_s"]), float(r["time/train_s"])
        rows.append([str(r["label"]), f"{f:.1f}", f"{m:.1f}", f"{100 * (f - m) / m:+.0f}%"])
    tf, tm = float(done["plan/train_s"].sum()), float(done["time/train_s"].sum())
    rows.append(["**all runs**", f"{tf:.1f}", f"{tm:.1f}", f"{100 * (tf - tm) / tm:+.0f}%"])
    return _md_table(["run", "forecast s", "measured s", "error"], rows)


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
    if df.attrs.get("archived"):
        lines += ["_Judged again from this folder's summary.csv (the run folders were not kept), with the study "
                  "file's current claims and statistics; the runs and their design are the earlier ones._", ""]
    verdicts = evaluate_claims(df)
    if verdicts:
        lines += ["## Verdicts", ""] + selection_lines(df) + [verdicts_markdown(verdicts), ""]
    st = seed_table(df)  # repeated arms: their means and intervals come before the single runs
    if st:
        lines += [f"## Across seeds (mean ± half-width of the {INTERVAL_NAME}; sd; n)", "", st, ""]
    dt = diff_table(df, baseline)
    if dt:
        lines += ["## Differences from the baseline arm (Welch 95% interval; * = excludes 0)", "", dt, ""]
    if st:
        lines += ["## Every run", ""]
    lines += [summary_table(df, baseline), ""]
    ft = forecast_table(df)
    if ft:
        lines += ["## Training time: forecast (before the run) vs measured", "", ft, ""]
    mem = memory_key(df)
    notes = []
    if mem == "mem/peak_rss_gb":
        notes.append("Memory is the process's peak resident set (CPU run)" +
                     ("; the article's figures are GPU peak allocated." if ref.get("article") else "."))
    notes.append("`x base` columns divide by the baseline row; scores are on this run's own data and scale.")
    lines += ["_" + " ".join(notes) + "_", ""]
    failed = df[df["status"] != "completed"]
    if len(failed):
        lines += ["## Runs that did not complete", ""]
        lines += [f"- `{r['run_id']}` ({r['status']}): {r['error'] or 'no error recorded'}" for _, r in failed.iterrows()]
        lines += [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)
