"""Early stopping of losing runs, decided from the study folder.

Every ``train.eval_every`` optimizer steps a run scores a fixed validation subset (the first
``train.eval_examples`` examples of the validation split, the same for every run) and appends
``{"step", "val/loss", "cohort"}`` to ``<run>/val_curve.jsonl``. The pruner then reads the other runs
of the same study folder (their curves and record statuses) and stops this run when it is losing:

- ``median`` (Optuna's MedianPruner): once ``min_runs`` runs have completed, a run whose best
  validation loss so far is worse than the median of the completed runs' losses at the same step.
- ``asha`` (Optuna's SuccessiveHalvingPruner, asynchronous): rungs at ``min_steps x factor^k``;
  at its first validation step at or past a rung, a run goes on only if its loss is in the best
  ``1/factor`` of all runs that reached that rung (``min_runs`` of them at least, itself included).

Why files and not Optuna's pruner objects: those read an Optuna study that the trial reports to in
the same process, which a plain ``-m`` grid does not have and a launcher in another process or on
another node cannot share cheaply. A file per run in the study folder works with every launcher
(local, parallel, SLURM) and for grids and searches alike. tests/test_pruner.py checks that these
rules decide exactly as Optuna's pruners do on the same curves.

Only runs of the same cohort are compared: same model, data and validation subset (``cohort_key``).
A stopped run raises ``RunPruned`` out of the training loop; the pipeline records it as ``pruned``
with the rule and the numbers that stopped it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .record import read_record

log = logging.getLogger("lorasweep")

CURVE = "val_curve.jsonl"
METRIC = "val/loss"  # what the curve holds and the rules minimise


class RunPruned(Exception):
    """Raised from the training loop's after_step hook: the run is losing and stops here."""

    def __init__(self, decision: "Decision", metrics: dict):
        self.decision = decision
        self.metrics = metrics
        super().__init__(decision.reason)


@dataclass
class Decision:
    prune: bool
    rule: str
    step: int
    reason: str
    numbers: dict = field(default_factory=dict)  # value, threshold, runs compared, settings

    def details(self) -> dict:
        return {"rule": self.rule, "step": self.step, "reason": self.reason, **self.numbers}


@dataclass
class Curve:
    run_id: str
    status: str  # the run's record status: running, completed, pruned, failed, ...
    points: dict[int, float]


# ----------------------------------------------------------------------------- curve files

def cohort_key(cfg) -> str:
    """Runs are compared only when their validation losses measure the same thing: same model,
    data and validation subset. LoRA settings, optimizer, precision and seed may differ (that is
    what a sweep compares)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    ident = {"model": [m.name_or_path, m.task, m.tiny_layers, m.tiny_hidden],
             "data": dataclasses.asdict(d), "max_seq_len": t.max_seq_len, "eval_examples": t.eval_examples}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]


def append_point(run_dir: Path, step: int, value: float, cohort: str, examples: int) -> None:
    """One line per validation; O_APPEND keeps a line whole for a reader in another process."""
    line = json.dumps({"step": step, METRIC: value, "examples": examples, "cohort": cohort}) + "\n"
    fd = os.open(Path(run_dir) / CURVE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_curve(run_dir: Path, cohort: str | None = None) -> dict[int, float]:
    """{step: val/loss} of a run (the last line wins for a step written twice, e.g. after a resume)."""
    points: dict[int, float] = {}
    try:
        text = (Path(run_dir) / CURVE).read_text()
    except OSError:
        return points
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written this instant
        if cohort is None or row.get("cohort") == cohort:
            points[int(row["step"])] = float(row[METRIC])
    return points


def study_curves(study_dir: Path, cohort: str, exclude: str | None = None) -> list[Curve]:
    """Every other run of the study folder with a curve in this cohort, with its record status."""
    out = []
    for curve_file in sorted(Path(study_dir).glob(f"*/{CURVE}")):
        run_dir = curve_file.parent
        if run_dir.name == exclude:
            continue
        points = read_curve(run_dir, cohort)
        if points:
            status = (read_record(run_dir) or {}).get("status", "running")
            out.append(Curve(run_dir.name, status, points))
    return out


# ----------------------------------------------------------------------------- the rules

def _best(points: dict[int, float], step: int) -> float:
    vals = [v for s, v in points.items() if s <= step and not math.isnan(v)]
    return min(vals) if vals else math.nan


def _median(values: list[float]) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def median_rule(own: dict[int, float], step: int, others: list[Curve], *, warmup_steps: int,
                min_runs: int) -> Decision:
    """Optuna's MedianPruner(n_startup_trials=min_runs, n_warmup_steps=warmup_steps): only
    completed runs are the reference; the run's best value so far against their median at this step."""
    settings = {"warmup_steps": warmup_steps, "min_runs": min_runs}
    completed = [c for c in others if c.status == "completed"]
    if len(completed) < min_runs:
        return Decision(False, "median", step, f"{len(completed)} completed runs < pruner.min_runs={min_runs}", settings)
    if step < warmup_steps:
        return Decision(False, "median", step, f"step {step} < pruner.warmup_steps={warmup_steps}", settings)
    best = _best(own, step)
    at_step = [c.points[step] for c in completed if step in c.points]
    if math.isnan(best):
        return Decision(True, "median", step, f"{METRIC} is NaN at step {step}", {**settings, "value": best})
    if not at_step:
        return Decision(False, "median", step, f"no completed run has a value at step {step}", settings)
    med = _median(at_step)
    numbers = {**settings, "value": best, "threshold": med, "compared_runs": len(at_step)}
    if best > med:
        return Decision(True, "median", step, f"{METRIC} {best:.4g} (best so far) > median {med:.4g} of "
                        f"{len(at_step)} completed runs at step {step}", numbers)
    return Decision(False, "median", step, f"{METRIC} {best:.4g} <= median {med:.4g}", numbers)


def rung_steps(min_steps: int, factor: int, up_to: int) -> list[int]:
    steps, k = [], 0
    while min_steps * factor ** k <= up_to:
        steps.append(min_steps * factor ** k)
        k += 1
    return steps


def _at_rung(points: dict[int, float], rung: int) -> int | None:
    """The validation step a rung is judged at: the first one at or past it."""
    past = [s for s in points if s >= rung]
    return min(past) if past else None


def asha_rule(own: dict[int, float], step: int, others: list[Curve], *, warmup_steps: int, min_runs: int,
              factor: int, min_steps: int) -> Decision:
    """Optuna's SuccessiveHalvingPruner(min_resource=min_steps, reduction_factor=factor), asynchronous:
    every run that reached a rung competes there, running and stopped ones included."""
    settings = {"warmup_steps": warmup_steps, "min_runs": min_runs, "reduction_factor": factor, "min_steps": min_steps}
    if step < warmup_steps:
        return Decision(False, "asha", step, f"step {step} < pruner.warmup_steps={warmup_steps}", settings)
    value = own[step]
    last = Decision(False, "asha", step, f"step {step} judges no rung", settings)
    for k, rung in enumerate(rung_steps(min_steps, factor, step)):
        if _at_rung(own, rung) != step:
            continue  # judged at an earlier validation step (or not reached)
        if math.isnan(value):
            return Decision(True, "asha", step, f"{METRIC} is NaN at step {step}", {**settings, "value": value})
        competing = [c.points[s] for c in others if (s := _at_rung(c.points, rung)) is not None] + [value]
        numbers = {**settings, "rung": k, "rung_step": rung, "value": value, "compared_runs": len(competing)}
        if len(competing) < min_runs:
            last = Decision(False, "asha", step, f"{len(competing)} runs reached rung {k} (step {rung}) < "
                            f"pruner.min_runs={min_runs}", numbers)
            continue
        keep = max(1, len(competing) // factor)
        cutoff = sorted(competing)[keep - 1]
        numbers.update(threshold=cutoff, kept=keep)
        if value > cutoff:
            return Decision(True, "asha", step, f"{METRIC} {value:.4g} > {cutoff:.4g}, the cutoff of the best {keep} of "
                            f"{len(competing)} runs at rung {k} (step {rung})", numbers)
        last = Decision(False, "asha", step, f"{METRIC} {value:.4g} in the best {keep} of {len(competing)} at rung {k}",
                        numbers)
    return last


def decide(pc, own: dict[int, float], step: int, others: list[Curve], eval_every: int) -> Decision:
    if pc.name == "median":
        return median_rule(own, step, others, warmup_steps=pc.warmup_steps, min_runs=pc.min_runs)
    if pc.name == "asha":
        return asha_rule(own, step, others, warmup_steps=pc.warmup_steps, min_runs=pc.min_runs,
                         factor=pc.reduction_factor, min_steps=pc.min_steps or eval_every)
    return Decision(False, "none", step, "no pruner")


# ----------------------------------------------------------------------------- in the run

class Watch:
    """The training loop's after_step hook: every train.eval_every steps, score the validation
    subset, append it to the run's curve, and ask the pruner (if any) whether to stop. On several
    processes (``shard``) every rank scores (FSDP's forward is a collective), rank 0 alone writes
    the curve and asks the pruner, and every rank gets its verdict (else the ranks part ways)."""

    def __init__(self, cfg, run_dir: Path, val, n_steps: int, score: Callable[[object], dict], shard=None,
                 guard: Callable[[], None] | None = None):
        if val is None:
            raise ValueError(f"train.eval_every={cfg.train.eval_every}: the data has no validation split to score")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.subset = dataclasses.replace(val, examples=val.examples[: cfg.train.eval_examples])
        self.n_steps = n_steps
        self.score = score
        self.shard = shard
        self.guard = guard  # before the curve is written: raises once this process may not write
        self.cohort = cohort_key(cfg)
        # A resumed run (checkpoint.py) keeps the curve of its earlier attempt: its best so far counts.
        self.points: dict[int, float] = read_curve(self.run_dir, self.cohort)

    def __call__(self, step: int) -> None:
        every = self.cfg.train.eval_every
        if step % every:
            return
        value = float(self.score(self.subset)["val/loss"])
        d = self._verdict(step, value, every) if self.shard is None or self.shard.rank == 0 else None
        if self.shard is not None:
            d = self.shard.all_objects(d)[0]  # rank 0's verdict, on every rank
        if d is not None and d.prune:
            raise RunPruned(d, {"train/steps": step, "train/planned_steps": self.n_steps,
                                "prune/step": step, "prune/val_loss": value})  # the loop adds its times

    def _verdict(self, step: int, value: float, every: int) -> Decision | None:
        """Record the point; the pruner's decision, or None where there is nothing to decide."""
        if self.guard is not None:
            self.guard()
        append_point(self.run_dir, step, value, self.cohort, len(self.subset.examples))
        self.points = {s: v for s, v in self.points.items() if s < step}  # later ones: a resume redoes them
        self.points[step] = value
        if self.cfg.pruner.name == "none" or step >= self.n_steps:
            return None  # the last step: nothing left to save
        others = study_curves(self.run_dir.parent, self.cohort, exclude=self.run_dir.name)
        return decide(self.cfg.pruner, self.points, step, others, every)
