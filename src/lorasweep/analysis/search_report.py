"""The trials of a search or of a pruned sweep -> trials.md, trials.csv and plots in the study folder.

A search's trials come from its Optuna study (``<study>/optuna.journal``); a plain ``-m`` grid run
with a pruner has no study, so its runs' records and validation curves stand in for trials. Both
get the same report: the trials table (completed / pruned / failed, with the rule and numbers that
stopped each pruned run), the best trial with its overrides and a command to rerun it, the
history plot, the validation curves with pruned runs marked, Optuna's parameter importance (for a
search), and the optimizer steps spent against the same number of full runs.

``lorasweep-report <folder>`` calls ``write_trials_report`` when ``applies(folder)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..run.pruner import CURVE, METRIC, read_curve
from ..run.record import read_record
from ..study.search import JOURNAL, compute, load, rerun_command, shell_quote


@dataclass
class Trial:
    number: int
    status: str  # completed | pruned | failed | running | interrupted
    overrides: list[str]
    value: float | None
    steps: int
    planned_steps: int
    run_id: str | None
    run_dir: str | None
    note: str = ""  # a pruned run's rule and numbers, or a failure's error
    curve: dict[int, float] = field(default_factory=dict)


@dataclass
class Trials:
    kind: str  # search | pruned sweep
    study: str
    metric: str
    direction: str
    trials: list[Trial]
    best: Trial | None
    rerun: str | None
    compute: dict
    sampler: str | None = None
    importance: dict | None = None


def applies(folder: str | Path) -> bool:
    """A search's study folder, or a sweep whose runs wrote validation curves."""
    folder = Path(folder)
    return (folder / JOURNAL).exists() or any(folder.glob(f"*/{CURVE}"))


# ----------------------------------------------------------------------------- loading

_STATES = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def _from_study(folder: Path, study) -> Trials:
    metric = study.user_attrs.get("metric", METRIC)
    trials = []
    for t in study.get_trials(deepcopy=False):
        status = "interrupted" if t.user_attrs.get("interrupted") else _STATES[t.state.name]
        if status == "waiting":
            continue
        run_dir = t.user_attrs.get("run_dir")
        rec = read_record(run_dir) if run_dir else None
        note = (rec or {}).get("error") or t.user_attrs.get("error") or ""
        value = t.value if status == "completed" else None  # Optuna gives a pruned trial its last curve value
        trials.append(Trial(t.number, status, list(t.user_attrs.get("overrides", [])), value,
                            int(t.user_attrs.get("steps", 0)), int(t.user_attrs.get("planned_steps", 0)),
                            t.user_attrs.get("run_id"), run_dir, note if status != "completed" else "",
                            dict(t.intermediate_values)))
    done = [t for t in trials if t.status == "completed" and t.value is not None]
    best = None
    if done:
        bt = study.best_trial
        best = next(t for t in trials if t.number == bt.number)
    return Trials("search", study.study_name, metric, study.direction.name.lower(), trials, best,
                  rerun_command(study, study.best_trial) if best else None, compute(study),
                  sampler=study.user_attrs.get("sampler"), importance=_importance(study))


def _importance(study) -> dict | None:
    """Optuna's parameter importance (fANOVA), where it has enough completed trials to say."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 3 or len({k for t in done for k in t.params}) < 1:
        return None
    try:
        return dict(optuna.importance.get_param_importances(study))
    except Exception:  # noqa: BLE001 - e.g. a parameter that never varied; the report goes on without it
        return None


def _sweep_overrides(folder: Path) -> dict[str, list[str]]:
    """run_id -> the overrides its sweep job ran with (from the sweeps' outcomes.jsonl)."""
    out: dict[str, list[str]] = {}
    for f in sorted(folder.glob(".sweeps/*/outcomes.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("run_id") and row.get("overrides"):
                out[row["run_id"]] = list(row["overrides"])
    return out


def _from_records(folder: Path) -> Trials:
    from .report_data import load_study

    df = load_study(folder)
    overrides = _sweep_overrides(folder)
    trials = []
    for i, row in enumerate(df.itertuples(index=False)):
        rec = read_record(row.run_dir) or {}
        m = rec.get("metrics") or {}
        value = m.get(METRIC) if rec.get("status") == "completed" else None
        steps = int(m.get("train/steps", 0) or 0)
        planned = int(m.get("train/planned_steps", steps) or 0)
        label = [row.label] if row.label != row.run_id else []
        trials.append(Trial(i, rec.get("status", "unknown"), overrides.get(row.run_id, label), value, steps, planned,
                            row.run_id, row.run_dir, rec.get("error") or "" if rec.get("status") != "completed" else "",
                            read_curve(row.run_dir)))
    done = [t for t in trials if t.status == "completed" and isinstance(t.value, (int, float))]
    best = min(done, key=lambda t: t.value) if done else None
    rerun = None
    if best is not None and best.run_id in overrides:
        rerun = "lorasweep " + " ".join(shell_quote(a) for a in overrides[best.run_id]
                                        if not a.startswith(("study=", "hydra.mode="))) \
            + f" hydra.mode=RUN study={df.attrs['study']}-best"
    counted = [t for t in trials if t.status in ("completed", "pruned", "failed")]
    full = max((t.planned_steps for t in counted), default=0)
    spent = sum(t.steps for t in counted)
    comp = {"trials": len(counted), "steps": spent, "full_run_steps": full, "full_steps": full * len(counted),
            "fraction": spent / (full * len(counted)) if full and counted else float("nan")}
    return Trials("pruned sweep", df.attrs["study"], METRIC, "minimize", trials, best, rerun, comp)


def load_trials(folder: str | Path) -> Trials:
    folder = Path(folder)
    study = load(folder)
    return _from_study(folder, study) if study is not None else _from_records(folder)


# ----------------------------------------------------------------------------- output

def _fig(**kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=kw.pop("figsize", (7, 4)))
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_history(tr: Trials, path: Path) -> Path | None:
    """Each completed trial's objective in trial order and the best so far; pruned trials marked
    at their last validation value."""
    done = [t for t in tr.trials if t.status == "completed" and t.value is not None]
    if not done:
        return None
    fig, ax = _fig()
    ax.scatter([t.number for t in done], [t.value for t in done], label=f"completed ({tr.metric})", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        if best is None or (t.value < best if tr.direction == "minimize" else t.value > best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    last = max(t.number for t in tr.trials)
    if xs[-1] < last:  # the best so far holds to the last trial
        xs.append(last)
        ys.append(ys[-1])
    ax.step(xs, ys, where="post", color="C1", label="best so far")
    pruned = [t for t in tr.trials if t.status == "pruned" and t.curve]
    if pruned:
        ax.scatter([t.number for t in pruned], [t.curve[max(t.curve)] for t in pruned], marker="x", color="grey",
                   label="pruned (last validation value)", zorder=2)
    ax.set_xlabel("trial" if tr.kind == "search" else "run (in start order)")
    ax.set_ylabel(tr.metric)
    ax.set_title(f"{tr.study}: optimisation history")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(tr: Trials, path: Path) -> Path | None:
    """Validation curves (the fixed subset, every train.eval_every steps); a pruned run ends in an x."""
    with_curves = [t for t in tr.trials if t.curve]
    if not with_curves:
        return None
    fig, ax = _fig()
    styles = {"completed": dict(lw=1.4, alpha=0.9), "pruned": dict(lw=1.0, ls="--", alpha=0.7),
              "failed": dict(lw=1.0, ls=":", alpha=0.7)}
    labelled = set()
    for t in with_curves:
        steps = sorted(t.curve)
        vals = [t.curve[s] for s in steps]
        st = styles.get(t.status, dict(lw=1.0, ls="-.", alpha=0.6))
        color = "C0" if t.status == "completed" else "grey" if t.status == "pruned" else "C3"
        ax.plot(steps, vals, color=color, label=None if t.status in labelled else t.status, **st)
        labelled.add(t.status)
        if t.status == "pruned":
            ax.plot(steps[-1], vals[-1], marker="x", color="black", ms=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{METRIC} (validation subset)")
    ax.set_title(f"{tr.study}: validation curves (x = pruned)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_importance(tr: Trials, path: Path) -> Path | None:
    if not tr.importance:
        return None
    names = list(tr.importance)[::-1]
    fig, ax = _fig(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [tr.importance[n] for n in names])
    ax.set_xlabel("importance (Optuna, fANOVA)")
    ax.set_title(f"{tr.study}: parameter importance")
    return _save(fig, path)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def trials_markdown(tr: Trials, plots: list[Path]) -> str:
    n = {s: sum(t.status == s for t in tr.trials) for s in ("completed", "pruned", "failed", "running", "interrupted")}
    total = n["completed"] + n["pruned"] + n["failed"]
    title = "Search" if tr.kind == "search" else "Pruned sweep"
    lines = [f"# {title}: {tr.study}", ""]
    head = f"{total} trials: {n['completed']} completed, {n['pruned']} pruned, {n['failed']} failed"
    if n["running"]:
        head += f", {n['running']} running"
    if n["interrupted"]:
        head += f" ({n['interrupted']} interrupted and asked again)"
    how = f"{tr.sampler} sampler, " if tr.sampler else ""
    lines += [f"{head}. {how}objective: {tr.direction} {tr.metric}.", ""]
    lines += ["## Best trial", ""]
    if tr.best is not None:
        b = tr.best
        lines += [f"Trial {b.number}: {tr.metric} = **{_fmt(b.value)}**, `{' '.join(b.overrides) or b.run_id}` "
                  f"(run `{b.run_id}`).", ""]
        lines += ["Rerun it:", "", "```bash", tr.rerun or f"# overrides unknown; config: {b.run_dir}/config.yaml", "```", ""]
    else:
        lines += ["No trial completed yet.", ""]
    c = tr.compute
    lines += ["## Compute", ""]
    if c.get("full_steps"):
        lines += [f"{c['steps']} optimizer steps trained = **{100 * c['fraction']:.0f}%** of the {c['full_steps']} "
                  f"steps of {c['trials']} full runs ({c['full_run_steps']} steps each).", ""]
    else:
        lines += ["No trial reported its steps yet.", ""]
    if tr.importance:
        lines += ["## Parameter importance (Optuna, fANOVA)", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in tr.importance.items()] + [""]
    lines += ["## Trials", "", f"| trial | status | overrides | {tr.metric} | steps | stopped by / error | run |",
              "|---|---|---|---|---|---|---|"]
    for t in tr.trials:
        note = t.note.replace("|", "/")
        lines.append(f"| {t.number} | {t.status} | {' '.join(t.overrides)} | {_fmt(t.value)} | "
                     f"{t.steps}/{t.planned_steps or '?'} | {note} | {t.run_id or '-'} |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_trials_report(folder: str | Path) -> dict[str, Path]:
    """trials.md, trials.csv and the plots; returns their paths."""
    import csv

    folder = Path(folder)
    tr = load_trials(folder)
    plots = [p for p in (plot_history(tr, folder / "trials_history.png"),
                         plot_curves(tr, folder / "trials_curves.png"),
                         plot_importance(tr, folder / "trials_importance.png")) if p is not None]
    md = folder / "trials.md"
    md.write_text(trials_markdown(tr, plots))
    table = folder / "trials.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "overrides", tr.metric, "steps", "planned_steps", "note", "run_id"])
        for t in tr.trials:
            w.writerow([t.number, t.status, " ".join(t.overrides), t.value, t.steps, t.planned_steps, t.note, t.run_id])
    return {"trials_md": md, "trials_csv": table, **{p.stem: p for p in plots}}
