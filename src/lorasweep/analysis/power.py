"""Power before launch: what each claim of a study could detect with its design, and the seeds it
would need, from the study's own finished runs or else from the pilot (benchmarks/pilot.py).

lorasweep-plan sweep=NAME prints these lines after the memory and time plan.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..claims import margin_value, parse_claims
from .report_claims import evaluate_claims
from .report_data import has_records, load_study
from .report_stats import mde, seeds_needed

_MDE = re.compile(r"mde ([-\d.e,]+)")
_NEEDS = re.compile(r"needs ~(\d+) seeds per arm")


def from_finished_runs(folder: Path) -> list[str]:
    """Each claim's mde and verdict on the runs already finished in the study folder."""
    lines = []
    for v in evaluate_claims(load_study(folder)):
        text = v.summary + " " + " ".join(v.details)
        mdes = _MDE.findall(text)
        needs = _NEEDS.findall(text)
        tag = " (by construction)" if v.claim.by_construction else ""
        lines.append(f"  {v.claim.metric}: {v.claim.text}{tag}: {v.verdict}"
                     + (f", mde {', '.join(mdes)}" if mdes else "")
                     + (f"; needs ~{max(map(int, needs))} seeds per arm" if needs else ""))
    return lines


def from_pilot(reference: dict, n_seeds: int, max_steps: int | None, pilot: Path) -> list[str]:
    """The loss claims' mde from the pilot's seed spread at the nearest number of steps (unpaired: an
    upper bound; arms paired by seed do better), against each claim's margin."""
    res = json.loads(pilot.read_text())
    rows = res.get("by_steps") or res.get("by_size")
    steps = [int(re.search(r"step (\d+)", r["cell"]).group(1)) for r in rows]
    i = min(range(len(rows)), key=lambda k: abs(steps[k] - (max_steps or steps[-1])))
    sd, mean = rows[i]["sd"], rows[i]["mean"]
    lines = [f"  from the pilot ({pilot}): val-loss sd over seeds {sd:.4f} around {mean:.3f} at step {steps[i]} "
             f"({rows[i]['n_seeds']} seeds); this design: {n_seeds} seeds per arm"]
    for c in parse_claims(reference):
        if "loss" not in c.metric or c.kind not in ("compare", "best"):
            continue
        m = c.margin
        aim = mean * float(str(m).rstrip("%")) / 100 if isinstance(m, str) and str(m).endswith("%") else margin_value(m)
        power = mde(sd, n_seeds, n_seeds)
        if not aim:
            lines.append(f"  {c.metric}: {c.text}: mde {power:.4f} (no margin: any larger difference shows)")
            continue
        need = seeds_needed(aim, sd, paired=False)
        lines.append(f"  {c.metric}: {c.text}: mde {power:.4f} vs margin {aim:.4f}: "
                     + ("powered" if power <= aim else f"underpowered, needs ~{need} seeds per arm"))
    return lines


def power_lines(folder: Path, reference: dict, n_seeds: int, max_steps: int | None, pilot: Path | None) -> list[str]:
    if not parse_claims(reference):
        return []
    if has_records(folder):
        return [f"power of the claims, from the finished runs in {folder}:"] + from_finished_runs(folder)
    if pilot is not None and pilot.is_file():
        return ["power of the claims, before any run of this study:"] + from_pilot(reference, n_seeds, max_steps, pilot)
    return [f"power of the claims: no finished run in {folder} and no pilot ({pilot}); run the pilot "
            "(sweeps/pilot.yaml, benchmarks/pilot.py) or a few runs of the study first"]
