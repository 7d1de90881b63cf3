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
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..claims import Claim, ReportError, Selection, margin_value, parse_claims, parse_selection  # noqa: F401  (re-exported)
from ..run.contention import QUIET_SHARE
from .report_data import memory_key, num
from .report_stats import (INTERVAL_NAME, arm_labels, mde, paired_interval, paired_seeds, pooled_sd, seeds_needed,
                           std_interval, t_interval, welch_interval)

VERDICTS = ("reproduced", "not reproduced", "opposite", "underpowered", "inconclusive", "shared cores")
TIME_PREFIXES = ("time/", "throughput/")  # claims on these are judged on runs that trained alone only


@dataclass
class Verdict:
    claim: Claim
    verdict: str
    summary: str                   # the numbers behind the verdict
    details: list = field(default_factory=list)  # one line per comparison when there are several

    def line(self) -> str:
        art = f" | article: {self.claim.article}" if self.claim.article else ""
        tag = " (by construction)" if self.claim.by_construction else ""
        return f"{self.verdict}{tag}: {self.claim.metric}: {self.claim.text} -- {self.summary}{art}"

    @property
    def powered(self) -> bool | None:
        """Could the design have detected the effect the claim needs? None for claims without a test
        (by construction, spreads, unmeasured, or judged on contended runs)."""
        if self.claim.by_construction or self.verdict == "shared cores" or "mde " not in self.summary + "".join(self.details):
            return None
        return self.verdict != "underpowered"


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
    if verdicts and all(v == "shared cores" for v in verdicts):
        return "shared cores"
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


def _contention_figure(runs: pd.DataFrame) -> str:
    share = pd.to_numeric(runs.get("contention/others_share", pd.Series(dtype=float)), errors="coerce")
    unknown = int(share.isna().sum()) if len(share) else len(runs)
    known = share.dropna()
    parts = []
    if len(known):
        loud = int((known >= QUIET_SHARE).sum())
        parts.append(f"{loud} of {len(known)} runs trained beside other work (others took up to "
                     f"{100 * known.max():.0f}% of the machine's CPU; alone means under {100 * QUIET_SHARE:.0f}%)")
    if unknown:
        parts.append(f"{unknown} run(s) recorded no contention")
    return "; ".join(parts)


def _quiet_rows(runs: pd.DataFrame) -> pd.Series:
    share = pd.to_numeric(runs.get("contention/others_share", pd.Series(math.nan, index=runs.index)), errors="coerce")
    gpu = pd.to_numeric(runs.get("contention/gpu_other_processes", pd.Series(0, index=runs.index)), errors="coerce")
    return (share < QUIET_SHARE) & ~(gpu.fillna(0) > 0)


def _alone(a: pd.DataFrame, b: pd.DataFrame | float) -> tuple[pd.DataFrame, pd.DataFrame | float, str | None]:
    """A time claim's arms cut to the runs that trained alone, or why it cannot be judged."""
    both = a if not isinstance(b, pd.DataFrame) else pd.concat([a, b])
    qa = a[_quiet_rows(a)]
    qb = b[_quiet_rows(b)] if isinstance(b, pd.DataFrame) else b
    if len(qa) < 2 or (isinstance(qb, pd.DataFrame) and len(qb) < 2):
        return a, b, _contention_figure(both)
    return qa, qb, None


def _compare(a: pd.DataFrame, b: pd.DataFrame | float, metric: str, claim: Claim, op: str, label_a: str,
             label_b: str):
    if metric.startswith(TIME_PREFIXES):  # a time taken beside other work is not this configuration's time
        a, b, loud = _alone(a, b)
        if loud:
            return "shared cores", f"{label_a} vs {label_b}: not judged: {loud}; rerun alone"
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
    floors = [lab for lab, x in ((label_a, a[metric]), (label_b, None if constant else b[metric]))
              if x is not None and len(x) > 1 and pd.to_numeric(x, errors="coerce").eq(0).all()
              and not metric.startswith(("params/", "plan/"))]
    if floors:  # an arm stuck at 0 in every run: the comparison is decided by the floor, not the method
        nums += f" (floor: {' and '.join(floors)} score 0 in every run)"
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
                if e.n >= 2 and e.std > 0:  # the spread n seeds can show under the limit: its upper bound must fit
                    nums += f", mde {_fmt(m * e.std / hi)} (the largest sd {e.n} seeds can show under the limit)"
                if e.n < 2:
                    results.append(("inconclusive", nums + " (one run: no spread)"))
                else:
                    results.append(("reproduced" if hi < m else "not reproduced" if lo > m else "inconclusive", nums))
    verdict = combine([v for v, _ in results])
    metric_note = f" [{shown}]" if shown else ""
    if len(results) == 1:
        return Verdict(claim, verdict, results[0][1] + metric_note)
    counts = ", ".join(f"{sum(v == s for v, _ in results)} {s}" for s in VERDICTS if any(v == s for v, _ in results))
    mdes = [float(x) for _, nums in results for x in re.findall(r"mde (-?[\d.]+(?:e-?\d+)?)", nums.replace(",", ""))]
    span = ""
    if mdes:  # the comparisons' detectable effects, on the claim's own line
        span = f", mde {_fmt(min(mdes))}" + (f"..{_fmt(max(mdes))}" if max(mdes) != min(mdes) else "")
    return Verdict(claim, verdict, f"{len(results)} comparisons: {counts}{span}{metric_note}",
                   [f"{v}: {nums}" for v, nums in results])


def _sel_text(sel: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sel.items())


def select_per_arm(df: pd.DataFrame, sel: Selection) -> tuple[pd.DataFrame, list[str]]:
    """Each arm's runs at the value of ``sel.param`` whose mean ``sel.on`` over seeds is best (its lr on
    the validation split), the param dropped from the arm's name; and one line per arm saying what
    was chosen. The claims are then judged on metrics the choice did not look at."""
    col = _column(df, sel.param)
    if col is None or sel.on not in df.columns:
        missing = sel.param if col is None else sel.on
        return df, [f"reference.select: {missing!r} is not in this study's runs, so no value was selected"]
    done = df[df["status"] == "completed"].copy()
    done["_value"] = col.loc[done.index].map(num)
    rest = df.copy()
    rest.attrs = {**df.attrs, "swept": [c for c in df.attrs.get("swept") or [] if c != sel.param]}
    done.attrs = rest.attrs
    done["_arm"] = arm_labels(done)
    keep, notes = [], []
    for arm in dict.fromkeys(done["_arm"]):
        g = done[done["_arm"] == arm]
        means = pd.to_numeric(g[sel.on], errors="coerce").groupby(g["_value"]).mean().dropna()
        if means.empty:
            continue
        best = means.idxmin() if sel.lower_is_better else means.idxmax()
        chosen = g[g["_value"] == best]
        keep.extend(chosen.index)
        lr = pd.to_numeric(chosen.get("optimizer/lr", pd.Series(dtype=float)), errors="coerce").dropna()
        lr_text = f" (lr {_fmt(float(lr.iloc[0]), 3)})" if len(lr) else ""
        grid = ", ".join(f"{_fmt(float(v), 3) if isinstance(v, (int, float)) else v}: {_fmt(m)}" for v, m in means.items())
        edge = " -- at the grid's edge: the best may lie outside it" if best in (means.index[0], means.index[-1]) and len(means) > 2 else ""
        notes.append(f"{arm}: {sel.param}={num(best)}{lr_text} [{sel.on} by value: {grid}]{edge}")
    out = rest.loc[[i for i in rest.index if i in set(keep) or rest.at[i, "status"] != "completed"]]
    out.attrs = rest.attrs
    return out, notes


def _best_lr(runs: pd.DataFrame, sel: Selection, metric: str, lower: bool) -> tuple[float | None, list[float], str]:
    """The lr (optimizer/lr) whose mean ``metric`` over seeds is best; the lrs the design cannot tell
    from it (the runner-up when their paired difference is under its mde); and the grid as text,
    with the best-vs-runner-up difference and its mde, and whether the best sits at the grid's edge."""
    value = _column(runs, sel.param)
    lr = pd.to_numeric(runs["optimizer/lr"] if "optimizer/lr" in runs.columns else value, errors="coerce")
    score = pd.to_numeric(runs[metric], errors="coerce")
    means = score.groupby(lr).mean().dropna()
    if means.empty:
        return None, [], ""
    order = means.sort_values(ascending=lower)
    best = float(order.index[0])
    grid = ", ".join(f"{_fmt(float(k), 3)}: {_fmt(float(m))}" for k, m in means.items())
    text, ties = f"[{grid}]", [best]
    if len(order) > 1:
        second = float(order.index[1])
        pair = paired_seeds(runs[lr == second], runs[lr == best], metric)
        if pair is not None:
            diffs = [x - y for x, y in zip(*pair)]
            power = mde(t_interval(diffs).std, len(diffs), paired=True)
            gap = abs(sum(diffs) / len(diffs))
            text += f", best vs runner-up {_fmt(gap)}, mde {_fmt(power)} (paired t)"
            if math.isnan(power) or gap < power:
                ties.append(second)
    if len(means) > 2 and best in (float(means.index[0]), float(means.index[-1])):
        text += " at the grid's edge"
    return best, ties, text


def evaluate_best_lr(df: pd.DataFrame, claim: Claim, sel: Selection) -> Verdict:
    """best_lr: the ratio of arm A's best lr to arm B's against the expected ratio (within the
    tolerance). The lrs are points of the grid, so the ratio is known to a grid step; a best lr at the
    grid's edge makes the claim inconclusive (widen the grid)."""
    done = df[df["status"] == "completed"].copy()
    if claim.metric not in done.columns:
        return Verdict(claim, "inconclusive", f"{claim.metric} was not measured in this study")
    rest = done.copy()
    rest.attrs = {**df.attrs, "swept": [c for c in df.attrs.get("swept") or [] if c != sel.param]}
    rest["_arm"] = arm_labels(rest)
    lower = _lower_is_better(claim, claim.metric)
    results = []
    for gname, g in _groups(rest, claim.per)[0]:
        a, wa = _select(g, claim.a)
        b, wb = _select(g, claim.b)
        if wa or wb:
            results.append(("inconclusive", f"{gname}: {wa or wb}" if gname else (wa or wb)))
            continue
        la, ties_a, ta = _best_lr(a, sel, claim.metric, lower)
        lb, ties_b, tb = _best_lr(b, sel, claim.metric, lower)
        if la is None or lb is None:
            results.append(("inconclusive", "an arm has no scored run"))
            continue
        r = la / lb
        lo, hi = claim.ratio / claim.tolerance, claim.ratio * claim.tolerance
        nums = (f"{_sel_text(claim.a)} best lr {_fmt(la, 3)} {ta} vs {_sel_text(claim.b)} best lr {_fmt(lb, 3)} {tb}: "
                f"ratio {_fmt(r, 3)} (expected {_fmt(claim.ratio, 3)}, [{_fmt(lo, 3)}, {_fmt(hi, 3)}]; on {claim.metric}, "
                f"means over seeds)")
        inside = {lo <= x / y <= hi for x in ties_a for y in ties_b}  # the ratio with every pick the design allows
        if "edge" in ta + tb:
            v = "inconclusive"
        elif len(inside) > 1:
            v = "underpowered"  # a runner-up the seeds cannot tell from the best would change the verdict
        else:
            v = "reproduced" if inside == {True} else "not reproduced"
        results.append((v, (f"{gname}: " if gname else "") + nums))
    if not results:
        return Verdict(claim, "inconclusive", "no comparison could be made")
    verdict = combine([v for v, _ in results])
    if len(results) == 1:
        return Verdict(claim, verdict, results[0][1])
    return Verdict(claim, verdict, f"{len(results)} comparisons", [f"{v}: {n}" for v, n in results])


def design_notes(df: pd.DataFrame, claim: Claim, metric: str) -> list[str]:
    """What in the design itself may decide this claim's verdict: the study's own note, a score every
    run of the compared arms sits at (a floor: nothing to separate), a warm-up that takes a large share
    of the steps."""
    notes = [claim.note] if claim.note else []
    done = df[df["status"] == "completed"]
    vals = pd.to_numeric(done.get(metric, pd.Series(dtype=float)), errors="coerce").dropna()
    if len(vals) > 1 and vals.nunique() == 1 and not metric.startswith(("params/", "plan/")):
        notes.append(f"every run scores {_fmt(float(vals.iloc[0]))}: a floor or a ceiling, the design cannot separate the arms")
    fixed = (df.attrs.get("constant") or {}).get("optimizer.warmup_steps")
    warm = pd.to_numeric(done["optimizer.warmup_steps"] if "optimizer.warmup_steps" in done.columns
                         else pd.Series(fixed, index=done.index, dtype=float), errors="coerce")
    steps = pd.to_numeric(done.get("train/steps", pd.Series(dtype=float)), errors="coerce")
    share = (warm / steps).dropna()
    if len(share) and share.max() >= 0.2:
        notes.append(f"warm-up takes up to {100 * share.max():.0f}% of the steps: a schedule claim is then "
                     "about the warm-up as much as the schedule")
    return notes


def evaluate_claims(df: pd.DataFrame) -> list[Verdict]:
    """Every claim of the study's reference block, judged on its completed runs (each arm at its
    selected value when the study has reference.select)."""
    ref = df.attrs.get("reference")
    sel = parse_selection(ref)
    judged, _ = select_per_arm(df, sel) if sel else (df, [])
    out = []
    for c in parse_claims(ref):
        if c.kind == "best_lr":
            out.append(evaluate_best_lr(df, c, sel))
            continue
        v = evaluate_claim(judged, c)
        metric = memory_key(judged) if c.metric == "memory" else c.metric
        notes = design_notes(judged, c, metric) if metric else []
        if notes:
            v.summary += " (design: " + "; ".join(notes) + ")"
        out.append(v)
    return out


def selection_lines(df: pd.DataFrame) -> list[str]:
    sel = parse_selection(df.attrs.get("reference"))
    if not sel:
        return []
    _, notes = select_per_arm(df, sel)
    head = (f"_Each arm is judged at its own {sel.param}, the one with the best mean {sel.on} over seeds "
            f"(picked on the validation split; the claims are judged on metrics it did not look at):_")
    return [head, ""] + [f"- {n}" for n in notes] + [""]


def verdicts_markdown(verdicts: list[Verdict]) -> str:
    """The summary.md section: one line per claim, the comparisons below it when there are several;
    claims that hold by construction last, apart from the findings."""
    lines = [f"_Each claim from the study file, judged on the arms' means over seeds. `mean ± h (n=k)`: an arm's "
             f"mean over k seeds and the half-width of its {INTERVAL_NAME}; `diff [lo, hi]`: the 95% interval of "
             "the difference (paired t when the arms share seeds, else Welch); `mde`: the smallest difference the "
             "design detects at 95% confidence and 80% power (docs/studies.md)._", ""]
    findings = [v for v in verdicts if not v.claim.by_construction]
    built = [v for v in verdicts if v.claim.by_construction]

    def item(v: Verdict) -> list[str]:
        art = f" Article: {v.claim.article}." if v.claim.article else ""
        return [f"- **{v.verdict}** `{v.claim.metric}`: {v.claim.text} -- {v.summary}.{art}"] + [f"  - {d}" for d in v.details]

    for v in findings:
        lines += item(v)
    if built:
        lines += ["", "_Hold by construction (how the arms are built decides them; checks of the harness, not findings):_", ""]
        for v in built:
            lines += item(v)
    return "\n".join(lines)
