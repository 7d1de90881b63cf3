"""The report's plots, each chosen by what the study swept; files only (no pyplot state). Runs that
differ only in seed are drawn as one arm: its mean with a 95% t-interval (error bars, bands).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .report_data import HEADERS, NUMERIC_PARAMS, num, load_steps, memory_key, primary_score, score_keys
from .report_stats import arm_columns, arm_labels, arms, t_interval


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


def _half_width(values) -> float:
    """95% t-interval half-width, 0 for a single run (no bar rather than a made-up one)."""
    e = t_interval(values)
    return 0.0 if e.n < 2 else e.half_width


def _arm_means(done: pd.DataFrame, key: str) -> pd.DataFrame:
    """One row per arm: arm, n, mean, hw (t-interval half-width), and the arm's first run's columns."""
    rows = []
    for arm, g in arms(done):
        x = pd.to_numeric(g[key], errors="coerce").dropna()
        if x.empty:
            continue
        rows.append({**g.iloc[0].to_dict(), "arm": arm, "n": len(x), "mean": x.mean(), "hw": _half_width(x)})
    return pd.DataFrame(rows)


def _seed_note(df: pd.DataFrame) -> str:
    done = df[df["status"] == "completed"]
    ns = sorted({len(g) for _, g in arms(done)})
    if not ns or ns[-1] < 2:
        return ""
    return f" (mean, 95% CI over {'-'.join(map(str, [ns[0], ns[-1]] if ns[0] != ns[-1] else [ns[0]]))} seeds)"


def plot_loss_curves(df: pd.DataFrame, path: Path) -> Path | None:
    """Training loss per arm: the mean over its seeds with a 95% band; single runs as plain lines."""
    fig, ax = _subplots(figsize=(7, 4.5))
    labels = arm_labels(df)
    drawn = 0
    for arm in dict.fromkeys(labels):
        runs = df[labels == arm]
        curves, failed = [], []
        for _, r in runs.iterrows():
            s = load_steps(r["run_dir"])
            if s.empty or "train/loss" not in s:
                continue
            (curves if r["status"] == "completed" else failed).append((r, s))
        for r, s in failed:  # a failed run shows where it stopped
            ax.plot(s["step"], s["train/loss"], linestyle="--", marker=".", label=f"{r['label']} ({r['status']})")
            drawn += 1
        if len(curves) == 1:
            r, s = curves[0]
            ax.plot(s["step"], s["train/loss"], marker="." if len(s) < 30 else None, label=r["label"])
            drawn += 1
        elif curves:
            wide = pd.concat([s.drop_duplicates("step").set_index("step")["train/loss"].rename(i)
                              for i, (_, s) in enumerate(curves)], axis=1).sort_index()
            steps = wide.index.to_numpy()
            mean = wide.mean(axis=1)
            hw = wide.apply(_half_width, axis=1)
            line, = ax.plot(steps, mean, marker="." if len(steps) < 30 else None, label=f"{arm} (n={len(curves)})")
            ax.fill_between(steps, mean - hw, mean + hw, color=line.get_color(), alpha=0.2, linewidth=0)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{df.attrs.get('study')}: training loss" + _seed_note(df))
    ax.legend(fontsize=7, ncol=2 if drawn > 6 else 1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_heatmap(df: pd.DataFrame, path: Path) -> Path | None:
    """r x alpha of the primary score (mean over seeds, ± the 95% CI half-width when repeated);
    alpha as a multiple of r when alpha was set relative to r."""
    ps = primary_score(df)
    done = df[df["status"] == "completed"]
    if ps is None or done.empty:
        return None
    key, hi = ps
    d = done.assign(r=pd.to_numeric(done["r"]), alpha=pd.to_numeric(done["alpha"]))
    col = "alpha"
    pv = d.pivot_table(index="r", columns="alpha", values=key, aggfunc="mean")
    col_name = "alpha"
    if pv.notna().to_numpy().mean() < 0.6:  # a diagonal grid (alpha = r/2, r, 2r): use alpha / r
        d = d.assign(ratio=d["alpha"] / d["r"])
        col = "ratio"
        pv = d.pivot_table(index="r", columns="ratio", values=key, aggfunc="mean")
        col_name = "alpha / r"
    hw = d.pivot_table(index="r", columns=col, values=key, aggfunc=_half_width).reindex_like(pv)
    fig, ax = _subplots(figsize=(1.5 * len(pv.columns) + 2.5, 0.8 * len(pv.index) + 2))
    im = ax.imshow(pv.to_numpy(dtype=float), cmap="viridis" if hi else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(pv.columns)), [num(float(c)) for c in pv.columns])
    ax.set_yticks(range(len(pv.index)), [num(float(i)) for i in pv.index])
    ax.set_xlabel(col_name)
    ax.set_ylabel("r")
    vals = pv.to_numpy(dtype=float)
    hws = hw.to_numpy(dtype=float)
    best = (pd.Series(vals.ravel()).idxmax() if hi else pd.Series(vals.ravel()).idxmin())
    for (i, j), v in pd.DataFrame(vals).stack().items():
        bold = i * vals.shape[1] + j == best
        lo, top = pd.Series(vals.ravel()).min(), pd.Series(vals.ravel()).max()
        t = (v - lo) / (top - lo) if top > lo else 0.5
        bright = t > 0.5 if hi else t < 0.5  # viridis is light at its top end
        text = f"{v:.3f}" + (f"\n± {hws[i, j]:.3f}" if hws[i, j] > 0 else "")
        ax.text(j, i, text, ha="center", va="center", color="k" if bright else "w", fontsize=9,
                fontweight="bold" if bold else None)
    fig.colorbar(im, ax=ax, label=key + (" (higher is better)" if hi else " (lower is better)"))
    ax.set_title(f"{df.attrs.get('study')}: {key} by r and {col_name}" + _seed_note(df), fontsize=10)
    return _save(fig, path)


def plot_mem_vs_time(df: pd.DataFrame, path: Path) -> Path | None:
    """Each arm's mean memory and train time with 95% CI error bars; its runs as faint dots."""
    mem = memory_key(df)
    done = df[df["status"] == "completed"]
    if mem is None or "time/train_s" not in df.columns or done.empty:
        return None
    t, m = _arm_means(done, "time/train_s"), _arm_means(done, mem)
    if t.empty or m.empty:
        return None
    both = t[["arm", "mean", "hw"]].merge(m[["arm", "mean", "hw"]], on="arm", suffixes=("_t", "_m"))
    fig, ax = _subplots(figsize=(6.5, 4.5))
    ax.scatter(done["time/train_s"], done[mem], s=12, alpha=0.3, color="grey")
    ax.errorbar(both["mean_t"], both["mean_m"], xerr=both["hw_t"], yerr=both["hw_m"], fmt="o", capsize=4)
    for _, r in both.iterrows():
        ax.annotate(str(r["arm"]), (r["mean_t"], r["mean_m"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("train time (s)")
    ax.set_ylabel(HEADERS.get(mem, mem))
    ax.set_title(f"{df.attrs.get('study')}: memory vs time" + _seed_note(df), fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    return _save(fig, path)


def plot_score_by_run(df: pd.DataFrame, path: Path) -> Path | None:
    """The primary score per arm: mean bar, 95% CI error bar, each seed as a dot."""
    ps = primary_score(df)
    done = df[df["status"] == "completed"]
    if ps is None or done.empty:
        return None
    key, hi = ps
    a = _arm_means(done, key)
    if a.empty:
        return None
    fig, ax = _subplots(figsize=(6.5, 0.45 * len(a) + 1.6))
    ax.barh(a["arm"].astype(str), a["mean"], xerr=a["hw"], capsize=4, alpha=0.8)
    labels = arm_labels(done)
    for i, arm in enumerate(a["arm"]):
        x = pd.to_numeric(done.loc[labels == arm, key], errors="coerce").dropna()
        if len(x) > 1:
            ax.scatter(x, [i] * len(x), s=10, color="k", zorder=3)
    ax.invert_yaxis()
    ax.set_xlabel(key + (" (higher is better)" if hi else " (lower is better)"))
    ax.set_title(f"{df.attrs.get('study')}: {key}" + _seed_note(df), fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_score_vs_param(df: pd.DataFrame, param: str, path: Path) -> Path | None:
    """The primary score (and train loss) against one numeric parameter: mean line, 95% band over seeds."""
    ps = primary_score(df)
    done = df[df["status"] == "completed"]
    if ps is None or done.empty:
        return None
    key, hi = ps
    fig, ax = _subplots(figsize=(6.5, 4.2))
    xs = []
    for k, style in ((key, dict(marker="o")), ("train/loss", dict(marker="s", linestyle="--"))):
        if k not in done or (k == "train/loss" and key == "train/loss"):
            continue
        a = _arm_means(done, k)
        if a.empty:
            continue
        a = a.assign(_x=pd.to_numeric(a[param])).sort_values("_x")
        line, = ax.plot(a["_x"], a["mean"], label=k, **style)
        if (a["hw"] > 0).any():
            ax.fill_between(a["_x"], a["mean"] - a["hw"], a["mean"] + a["hw"], color=line.get_color(), alpha=0.2,
                            linewidth=0)
        xs = list(a["_x"])
    if not xs:
        return None
    if param in ("alpha", "r") and min(xs) > 0 and max(xs) / min(xs) >= 16:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [num(float(x)) for x in xs])
    ax.set_xlabel(param)
    ax.set_ylabel("loss" if not hi else key)
    ax.set_title(f"{df.attrs.get('study')}: {key} vs {param}" + _seed_note(df), fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_seed_spread(df: pd.DataFrame, path: Path) -> Path | None:
    """Each metric's per-seed values with the mean and its 95% t-interval, one small panel per metric."""
    done = df[df["status"] == "completed"]
    keys = [k for k in ("train/loss", "val/loss", "val/accuracy", "time/train_s", memory_key(df))
            if k and k in done.columns and done[k].notna().any()] + score_keys(done)[:2]
    if done.empty or not keys:
        return None
    groups = arms(done)
    fig, axes = _subplots(1, len(keys), figsize=(2.6 * len(keys) + 1, 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for gi, (name, g) in enumerate(groups):
            x = pd.to_numeric(g[k], errors="coerce").dropna()
            ax.scatter([gi] * len(x), x, s=14, alpha=0.6)
            ax.errorbar([gi + 0.15], [x.mean()], yerr=[_half_width(x)], fmt="o", color="k", capsize=4)
        ax.set_xticks(range(len(groups)), [name for name, _ in groups], fontsize=7)
        ax.set_title(HEADERS.get(k, k), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{df.attrs.get('study')}: spread over seeds (mean, 95% t-interval)")
    return _save(fig, path)


def make_plots(df: pd.DataFrame, folder: Path) -> list[Path]:
    """The plots that answer this study's question, chosen from what was swept."""
    swept = df.attrs.get("swept") or []
    out: list[Path | None] = []
    if "r" in swept and "alpha" in swept:
        out.append(plot_heatmap(df, folder / "heatmap_r_alpha.png"))
    if set(swept) & {"precision", "optimizer", "method", "variant", "targets", "model", "trainable"}:
        out.append(plot_mem_vs_time(df, folder / "memory_vs_time.png"))
        out.append(plot_score_by_run(df, folder / "score_by_run.png"))
    numeric = [c for c in swept if c in NUMERIC_PARAMS and c != "seed"]
    if len(arm_columns(df)) == 1 and numeric:  # one numeric parameter, maybe repeated over seeds
        out.append(plot_score_vs_param(df, numeric[0], folder / f"score_vs_{numeric[0]}.png"))
    if "seed" in swept:
        out.append(plot_seed_spread(df, folder / "seed_spread.png"))
    out.append(plot_loss_curves(df, folder / "loss_curves.png"))
    return [p for p in out if p is not None]
