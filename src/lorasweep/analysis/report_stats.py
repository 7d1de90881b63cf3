"""Statistics over seeds: runs that differ only in `seed` form one arm; each arm's metrics get a
mean, standard deviation, n and a 95% t-interval, and each arm's difference from the baseline arm a
Welch interval.

Why t-intervals: studies here have 3-5 seeds per arm, where a bootstrap interval is too narrow (it
cannot see beyond the few values it resamples) and the normal interval too (z = 1.96 where t with
2 degrees of freedom is 4.30). Welch's interval does not assume the two arms spread alike (a 4-bit
arm's times scatter more than an fp32 arm's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import pandas as pd
from scipy import stats

from .report_data import find_baseline, num

CONFIDENCE = 0.95
INTERVAL_NAME = "95% t-interval"
# The columns the report summarises over seeds: scores, losses, time and memory.
STAT_PREFIXES = ("eval/", "eval_delta/", "val/", "test/", "train/loss", "train/first_loss", "time/", "mem/", "throughput/")


@dataclass(frozen=True)
class Estimate:
    """One metric of one arm over its seeds. low/high are NaN when n < 2 (no spread to go by)."""
    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its Welch interval; low/high are NaN when either arm has n < 2."""
    diff: float
    low: float
    high: float
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float

    @property
    def known(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def _clean(values: Iterable) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isnan(f):
            out.append(f)
    return out


def t_interval(values: Iterable, confidence: float = CONFIDENCE) -> Estimate:
    """mean ± t(n-1) * s / sqrt(n): the interval that covers the true mean in `confidence` of studies."""
    x = _clean(values)
    n = len(x)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(x) / n
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


def welch_interval(a: Iterable, b: Iterable, confidence: float = CONFIDENCE) -> Difference:
    """Interval for mean(a) - mean(b), Welch-Satterthwaite degrees of freedom (unequal spreads).
    Two arms that never vary (trainable parameters) give a zero-width interval at their difference."""
    ea, eb = t_interval(a), t_interval(b)
    diff = ea.mean - eb.mean
    if ea.n < 2 or eb.n < 2:
        return Difference(diff, math.nan, math.nan, ea.n, eb.n, ea.mean, eb.mean)
    va, vb = ea.std ** 2 / ea.n, eb.std ** 2 / eb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(diff, diff, diff, ea.n, eb.n, ea.mean, eb.mean)
    dof = (va + vb) ** 2 / ((va ** 2 / (ea.n - 1) if va else 0.0) + (vb ** 2 / (eb.n - 1) if vb else 0.0))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return Difference(diff, diff - half, diff + half, ea.n, eb.n, ea.mean, eb.mean)


def std_interval(values: Iterable, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval for the standard deviation itself (chi-square, normal values): how wide the seed
    spread could really be. NaN when n < 2."""
    x = _clean(values)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    s2 = t_interval(x).std ** 2
    lo = math.sqrt((n - 1) * s2 / float(stats.chi2.ppf(0.5 + confidence / 2, n - 1)))
    hi = math.sqrt((n - 1) * s2 / float(stats.chi2.ppf(0.5 - confidence / 2, n - 1)))
    return lo, hi


# ----------------------------------------------------------------------------- arms

def arm_columns(df: pd.DataFrame) -> list[str]:
    """The swept parameters that name an arm: all of them but the seed."""
    return [c for c in (df.attrs.get("swept") or []) if c != "seed"]


def arm_labels(df: pd.DataFrame) -> pd.Series:
    """Each row's arm ("precision=nf4"); every row is one arm when only the seed varied."""
    cols = arm_columns(df)
    if not cols:
        return pd.Series("all seeds" if "seed" in (df.attrs.get("swept") or []) else "all runs", index=df.index)
    return pd.Series([", ".join(f"{c}={num(r[c])}" for c in cols) for _, r in df.iterrows()], index=df.index)


def arms(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(arm label, its completed runs) in the report's row order."""
    done = df[df["status"] == "completed"]
    labels = arm_labels(done)
    order = list(dict.fromkeys(labels))
    return [(a, done[labels == a]) for a in order]


def stat_metrics(df: pd.DataFrame) -> list[str]:
    """Every score, loss, time and memory column with at least one number (stderr columns excluded)."""
    out = []
    for c in df.columns:
        if isinstance(c, str) and c.startswith(STAT_PREFIXES) and not c.endswith("_stderr"):
            if pd.to_numeric(df[c], errors="coerce").notna().any():
                out.append(c)
    return out


def baseline_arm(df: pd.DataFrame, baseline: str | dict | None = None) -> str | None:
    """The arm of the baseline row (the study's reference.baseline unless one is given)."""
    ref = df.attrs.get("reference") or {}
    done = df[df["status"] == "completed"]
    if done.empty:
        return None
    b = find_baseline(df, baseline) if baseline is not None else find_baseline(df, ref.get("baseline"), strict=False)
    if b is None or df.loc[b, "status"] != "completed":
        b = done.index[0]
    return str(arm_labels(df).loc[b])


def arm_stats(df: pd.DataFrame, baseline: str | dict | None = None) -> pd.DataFrame:
    """Long table, one row per arm x metric: arm, metric, n, mean, std, ci_low, ci_high, and the
    difference from the baseline arm with its Welch interval (diff, diff_low, diff_high)."""
    metrics = stat_metrics(df)
    groups = arms(df)
    base = baseline_arm(df, baseline)
    base_runs = dict(groups).get(base)
    rows = []
    for arm, g in groups:
        for m in metrics:
            e = t_interval(g[m])
            if e.n == 0:
                continue
            row = {"arm": arm, "metric": m, "n": e.n, "mean": e.mean, "std": e.std,
                   "ci_low": e.low, "ci_high": e.high, "baseline_arm": base}
            if base_runs is not None and arm != base:
                d = welch_interval(g[m], base_runs[m])
                row.update(diff=d.diff, diff_low=d.low, diff_high=d.high)
            rows.append(row)
    cols = ["arm", "metric", "n", "mean", "std", "ci_low", "ci_high", "baseline_arm", "diff", "diff_low", "diff_high"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- pairing and power

POWER = 0.80  # the chance a design detects an effect of its minimum detectable size (with CONFIDENCE)


def paired_seeds(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[list[float], list[float]] | None:
    """The two arms' values by shared seed, when they pair: the same seeds on both sides, each once
    (same data order and initialisation, so the per-seed difference removes the seed's own effect);
    None otherwise (Welch)."""
    if "seed" not in a.columns or "seed" not in b.columns:
        return None
    sa, sb = a["seed"].map(num), b["seed"].map(num)
    if sa.duplicated().any() or sb.duplicated().any() or set(sa) != set(sb) or len(sa) < 2:
        return None
    xa = dict(zip(sa, pd.to_numeric(a[metric], errors="coerce")))
    xb = dict(zip(sb, pd.to_numeric(b[metric], errors="coerce")))
    keys = [k for k in xa if not (math.isnan(xa[k]) or math.isnan(xb[k]))]
    return ([xa[k] for k in keys], [xb[k] for k in keys]) if len(keys) >= 2 else None


def paired_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Difference:
    """mean(a - b) over the shared seeds with its paired t-interval."""
    d = t_interval([x - y for x, y in zip(a, b)], confidence)
    ea, eb = t_interval(a), t_interval(b)
    return Difference(d.mean, d.low, d.high, ea.n, eb.n, ea.mean, eb.mean)


def mde(sd: float, n_a: int, n_b: int | None = None, paired: bool = False) -> float:
    """Minimum detectable effect: the smallest true difference this design finds with POWER at
    CONFIDENCE (two-sided), in the metric's units. ``sd``: the per-seed differences' spread (paired,
    or one arm against a number: n_b None) or the pooled spread of the two arms (unpaired)."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    alpha = 1 - CONFIDENCE
    if math.isnan(sd) or n_a < 2 or (n_b is not None and not paired and n_b < 2):
        return math.nan
    if sd == 0:
        return 0.0
    if paired or n_b is None:
        d = TTestPower().solve_power(effect_size=None, nobs=n_a, alpha=alpha, power=POWER)
    else:
        d = TTestIndPower().solve_power(effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=alpha, power=POWER)
    return float(d) * sd


def seeds_needed(effect: float, sd: float, paired: bool) -> int | None:
    """Seeds per arm to detect ``effect`` with POWER at CONFIDENCE; None when there is no effect to aim at."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    if not effect or math.isnan(sd) or sd == 0:
        return None
    alpha, es = 1 - CONFIDENCE, abs(effect) / sd
    n = (TTestPower().solve_power(effect_size=es, nobs=None, alpha=alpha, power=POWER) if paired
         else TTestIndPower().solve_power(effect_size=es, nobs1=None, ratio=1.0, alpha=alpha, power=POWER))
    return int(math.ceil(float(n)))


def pooled_sd(a: Iterable, b: Iterable) -> float:
    ea, eb = t_interval(a), t_interval(b)
    if ea.n < 2 or eb.n < 2:
        return math.nan
    return math.sqrt(((ea.n - 1) * ea.std ** 2 + (eb.n - 1) * eb.std ** 2) / (ea.n + eb.n - 2))
