"""The report's plots, each chosen by what the study swept; files only (no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .report_data import HEADERS, NUMERIC_PARAMS, _num, load_steps, memory_key, primary_score, score_keys


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
