"""Claims and verdicts: a study file's `reference.claims` say what the article found, in a form the
report can check against the measured arms.

    reference:
      claims:
        - {metric: memory, compare: "precision=nf4 < precision=fp32", article: "14.18 vs 21.33 GB"}
        - {metric: val/loss, best: "alpha/r=2", per: r, article: "alpha = 2r usually best"}
        - {metric: val/loss, compare: "optimizer=adamw_cosine ~ optimizer=adamw", margin: 2%, per: precision}
        - {metric: val/loss, max_std: 2%, article: "single runs"}

Forms: `compare: "A < B"` / `"A > B"` (A's mean below / above B's), `compare: "A ~ B"` (equal within
`margin`), `compare: "A < 0"` (A against a number: a one-sample interval, e.g. on an eval_delta/ metric), `best: A` (A beats every other arm, lower is better for losses, time and memory, higher
for the rest unless `higher_is_better` says otherwise), `max_std: m` (the spread over seeds stays
under m). A and B name arms like a baseline does (`precision=nf4`, `optimizer=sgd, precision=nf4`);
a key `x/y` is the ratio of two swept values (`alpha/r=2`); `precision=fp32|bf16_true` takes
either value (the CPU and the GPU baseline). `per: r` makes the comparison within
each value of r. `metric: memory` is the GPU peak allocated where measured, else the peak RSS.
`margin` (metric units, or `5%` of B's mean) is the smallest difference that counts; default 0.

Verdicts, from the 95% interval of mean(A) - mean(B) (paired t on the per-seed differences where
the arms share their seeds, else Welch), for "A < B" with margin m: reproduced (interval below -m),
opposite (above 0), not reproduced (the claimed effect of more than m is ruled out: interval above
-m), underpowered (the interval spans -m and the design's minimum detectable effect, 80% power, is
larger than m, or with m = 0 than the difference seen), inconclusive (it spans -m though the design
was powered, or an arm has a single run). Every line states the mde and the test. "A ~ B": reproduced when the interval lies inside
(-m, m), not reproduced when it lies outside. A claim made of several comparisons (`best`, `per`)
is reproduced when every comparison is, opposite when any is, not reproduced when any is,
inconclusive otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..claims import Claim, ReportError, margin_value, parse_claims  # noqa: F401  (parse_claims: re-exported)
from .report_data import memory_key, num
from .report_stats import (INTERVAL_NAME, arm_labels, mde, paired_interval, paired_seeds, pooled_sd, seeds_needed,
                           std_interval, t_interval, welch_interval)

VERDICTS = ("reproduced", "not reproduced", "opposite", "underpowered", "inconclusive")


@dataclass
class Verdict:
    claim: Claim
    verdict: str
    summary: str                   # the numbers behind the verdict
    details: list = field(default_factory=list)  # one line per comparison when there are several

    def line(self) -> str:
        art = f" | article: {self.claim.article}" if self.claim.article else ""
        return f"{self.verdict}: {self.claim.metric}: {self.claim.text} -- {self.summary}{art}"


# ----------------------------------------------------------------------------- evaluation

def _column(df: pd.DataFrame, key: str) -> pd.Series | None:
    """A swept column, or the ratio of two (`alpha/r`)."""
    if key in df.columns:
        return df[key]
    if "/" in key:
        x, y = key.split("/", 1)
        if x in df.columns and y in df.columns:
            return pd.to_numeric(df[x], errors="coerce") / pd.to_numeric(df[y], errors="coerce")
    return None


def _match(col: pd.Series, value: str) -> pd.Series:
    """Rows whose value is `value` (numbers compared as numbers); 'fp32|bf16_true' matches either."""
    if "|" in value:
        hit = pd.Series(False, index=col.index)
        for v in value.split("|"):
            hit |= _match(col, v.strip())
        return hit
    numeric = pd.to_numeric(col, errors="coerce")
    try:
        v = float(value)
    except ValueError:
        v = None
    if v is not None and numeric.notna().all():
        return (numeric - v).abs() <= 1e-9 * max(1.0, abs(v))
    return col.map(num).astype(str) == str(value)


def _select(df: pd.DataFrame, sel: dict) -> tuple[pd.DataFrame, str | None]:
    """The runs of the one arm `sel` names, or (empty, why not)."""
    mask = pd.Series(True, index=df.index)
    for k, v in sel.items():
        col = _column(df, k)
        if col is None:
            return df.iloc[0:0], f"no swept parameter {k!r}"
        mask &= _match(col, v)
    hit = df[mask]
    text = ", ".join(f"{k}={v}" for k, v in sel.items())
    if hit.empty:
        return hit, f"no completed run has {text}"
    names = list(dict.fromkeys(hit["_arm"]))
    if len(names) > 1:
        return hit.iloc[0:0], f"{text} matches {len(names)} arms ({'; '.join(names)}): name the other parameters or add per:"
    return hit, None


def _fmt(v: float, digits: int = 4) -> str:
    if v is None or math.isnan(v):
        return "-"
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _abs_margin(m: Any, ref_mean: float) -> float:
    if isinstance(m, str) and m.strip().endswith("%"):
        return float(m.strip()[:-1]) / 100 * abs(ref_mean)
    return float(m or 0)


def _directional(lo: float, hi: float, want_below: bool, m: float) -> str:
    """Verdict for 'diff < 0' (want_below) or 'diff > 0' with margin m, from the diff's interval."""
    if not want_below:
        lo, hi = -hi, -lo
    if hi < -m:
        return "reproduced"
    if lo > 0:
        return "opposite"
    if lo >= -m:
        return "not reproduced"
    return "inconclusive"


def _equivalent(lo: float, hi: float, m: float) -> str:
    if -m < lo and hi < m:
        return "reproduced"
    if lo >= m or hi <= -m:
        return "not reproduced"
    return "inconclusive"


def combine(verdicts: list[str]) -> str:
    """Several comparisons: reproduced if all are, opposite if any is, not reproduced if any is."""
    if not verdicts:
        return "inconclusive"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    for v in ("opposite", "not reproduced"):
        if v in verdicts:
            return v
    if "underpowered" in verdicts and all(v in ("reproduced", "underpowered") for v in verdicts):
        return "underpowered"
    return "inconclusive"


def _lower_is_better(claim: Claim, metric: str) -> bool:
    if claim.higher_is_better is not None:
        return not claim.higher_is_better
    return any(s in metric for s in ("loss", "perplexity")) or metric.startswith(("time/", "mem/", "plan/"))


def _compare(a: pd.DataFrame, b: pd.DataFrame | float, metric: str, claim: Claim, op: str, label_a: str,
             label_b: str):
    constant = not isinstance(b, pd.DataFrame)
    pairs = None if constant else paired_seeds(a, b, metric)
    if pairs is not None:  # arms that share seeds: the per-seed differences (paired t)
        d, test = paired_interval(*pairs), "paired t"
        spread = t_interval([x - y for x, y in zip(*pairs)]).std
        power = mde(spread, len(pairs[0]), paired=True)
    elif constant:  # against a number: a one-sample t-interval (Welch with a zero-spread B has A's n - 1 dof)
        d, test = welch_interval(a[metric], [float(b)] * 2), "one-sample t"
        spread = t_interval(a[metric]).std
        power = mde(spread, d.n_a)
    else:
        d, test = welch_interval(a[metric], b[metric]), "Welch"
        spread = pooled_sd(a[metric], b[metric])
        power = mde(spread, d.n_a, d.n_b)
    ea = t_interval(a[metric])
    m = _abs_margin(claim.margin, d.mean_b)
    ratio = f", {d.mean_a / d.mean_b:.2f}x" if d.mean_b not in (0,) and not math.isnan(d.mean_b) else ""
    if constant:
        other = f"{_fmt(float(b))}"
    else:
        eb = t_interval(b[metric])
        other = f"{label_b} {_fmt(eb.mean)} ± {_fmt(eb.half_width, 2)} (n={eb.n})"
    nums = (f"{label_a} {_fmt(ea.mean)} ± {_fmt(ea.half_width, 2)} (n={ea.n}) vs {other}: "
            f"diff {_fmt(d.diff)} [{_fmt(d.low)}, {_fmt(d.high)}]{ratio}")
    if m:
        nums += f", margin {_fmt(m)}"
    nums += f", mde {_fmt(power)} ({test})"
    if not d.known:
        return "inconclusive", nums + " (an arm has one run: no interval; run more seeds)"
    v = _equivalent(d.low, d.high, m) if op == "~" else _directional(d.low, d.high, op == "<", m)
    # Inconclusive because the design could not have told: the smallest effect it detects (80% power)
    # is larger than the one the claim needs (its margin, else the difference seen).
    aim = m if m else abs(d.diff)
    if v == "inconclusive" and not math.isnan(power) and power > aim:
        need = seeds_needed(aim, spread, test == "paired t")
        v = "underpowered"
        nums += f" (detecting {_fmt(aim)} needs ~{need} seeds per arm)" if need else ""
    return v, nums


def _groups(df: pd.DataFrame, per: tuple) -> tuple[list[tuple[str, pd.DataFrame]], str | None]:
    if not per:
        return [("", df)], None
    cols = {}
    for p in per:
        col = _column(df, p)
        if col is None:
            return [], f"per: no swept parameter {p!r}"
        cols[p] = col.map(num).astype(str)
    key = pd.Series([", ".join(f"{p}={cols[p][i]}" for p in per) for i in df.index], index=df.index)
    return [(k, df[key == k]) for k in dict.fromkeys(key)], None


def evaluate_claim(df: pd.DataFrame, claim: Claim) -> Verdict:
    """One claim's verdict on the completed runs of a loaded study."""
    metric = memory_key(df) if claim.metric == "memory" else claim.metric
    done = df[df["status"] == "completed"].copy()
    if not metric or metric not in done.columns or pd.to_numeric(done[metric], errors="coerce").notna().sum() == 0:
        return Verdict(claim, "inconclusive", f"{claim.metric} was not measured in this study")
    done[metric] = pd.to_numeric(done[metric], errors="coerce")
    done["_arm"] = arm_labels(done)
    groups, why = _groups(done, claim.per)
    if why:
        return Verdict(claim, "inconclusive", why)
    shown = metric if metric != claim.metric else ""
    results: list[tuple[str, str]] = []  # (verdict, numbers) per comparison
    for gname, g in groups:
        prefix = f"{gname}: " if gname else ""
        if claim.kind == "compare":
            a, wa = _select(g, claim.a)
            b, wb = (claim.b_value, None) if claim.b_value is not None else _select(g, claim.b)
            if wa or wb:
                results.append(("inconclusive", prefix + (wa or wb)))
                continue
            v, nums = _compare(a, b, metric, claim, claim.op, _sel_text(claim.a), _sel_text(claim.b))
            results.append((v, prefix + nums))
        elif claim.kind == "best":
            a, wa = _select(g, claim.a)
            if wa:
                results.append(("inconclusive", prefix + wa))
                continue
            lower = _lower_is_better(claim, metric)
            rivals = [r for r in dict.fromkeys(g["_arm"]) if r != a["_arm"].iloc[0]]
            for rival in rivals:
                v, nums = _compare(a, g[g["_arm"] == rival], metric, claim, "<" if lower else ">",
                                   a["_arm"].iloc[0], rival)
                results.append((v, prefix + nums))
            if not rivals:
                results.append(("inconclusive", prefix + "no other arm to beat"))
        else:  # spread
            for arm in dict.fromkeys(g["_arm"]):
                x = g.loc[g["_arm"] == arm, metric]
                e = t_interval(x)
                lo, hi = std_interval(x)
                m = _abs_margin(claim.margin, e.mean)
                nums = (f"{prefix}{arm}: std {_fmt(e.std)} [{_fmt(lo)}, {_fmt(hi)}] (chi-square 95%, n={e.n}) "
                        f"around {_fmt(e.mean)}, limit {_fmt(m)}")
                if e.n < 2:
                    results.append(("inconclusive", nums + " (one run: no spread)"))
                else:
                    results.append(("reproduced" if hi < m else "not reproduced" if lo > m else "inconclusive", nums))
    verdict = combine([v for v, _ in results])
    metric_note = f" [{shown}]" if shown else ""
    if len(results) == 1:
        return Verdict(claim, verdict, results[0][1] + metric_note)
    counts = ", ".join(f"{sum(v == s for v, _ in results)} {s}" for s in VERDICTS if any(v == s for v, _ in results))
    return Verdict(claim, verdict, f"{len(results)} comparisons: {counts}{metric_note}",
                   [f"{v}: {nums}" for v, nums in results])


def _sel_text(sel: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sel.items())


def evaluate_claims(df: pd.DataFrame) -> list[Verdict]:
    """Every claim of the study's reference block, judged on its completed runs."""
    return [evaluate_claim(df, c) for c in parse_claims(df.attrs.get("reference"))]


def verdicts_markdown(verdicts: list[Verdict]) -> str:
    """The summary.md section: one line per claim, the comparisons below it when there are several."""
    lines = [f"_Each claim from the study file, judged on the arms' means over seeds. `mean ± h (n=k)`: an arm's "
             f"mean over k seeds and the half-width of its {INTERVAL_NAME}; `diff [lo, hi]`: the Welch 95% "
             "interval of the difference of means (docs/studies.md)._", ""]
    for v in verdicts:
        art = f" Article: {v.claim.article}." if v.claim.article else ""
        lines.append(f"- **{v.verdict}** `{v.claim.metric}`: {v.claim.text} -- {v.summary}.{art}")
        lines += [f"  - {d}" for d in v.details]
    return "\n".join(lines)
