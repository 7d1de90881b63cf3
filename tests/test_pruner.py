"""Pruner: periodic validation curves in the run folder, the median and ASHA rules (checked against
Optuna's own pruners), pruned runs recorded with their verdict, and `pruner=median` on a plain grid."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import compose
from test_sweep import TINY, lorasweep, records

from lorasweep.run.pruner import (CURVE, Curve, append_point, asha_rule, median_rule, read_curve, rung_steps,
                              study_curves)


def _curves(n_runs: int, steps: list[int], seed: int) -> list[dict[int, float]]:
    """Noisy decreasing curves of different speeds (some flat, some fast), like an lr sweep."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_runs):
        rate, start = rng.uniform(0.0, 0.08), rng.uniform(4.0, 4.4)
        out.append({s: start * math.exp(-rate * s) + rng.gauss(0, 0.02) for s in steps})
    return out


def _race(trial, curve: dict[int, float], steps: list[int], ours_rule) -> tuple[int | None, int | None, dict]:
    """Report a curve to an Optuna trial step by step; the first step at which our rule
    (ours_rule(own_curve, step)) and Optuna's pruner would stop it, and the curve seen so far."""
    own: dict[int, float] = {}
    ours = theirs = None
    for s in steps:
        trial.report(curve[s], s)
        own[s] = curve[s]
        if ours is None and ours_rule(own, s).prune:
            ours = s
        if theirs is None and trial.should_prune():
            theirs = s
        if ours is not None or theirs is not None:
            break
    return ours, theirs, own


# ------------------------------------------------------------------ the rules, against Optuna's pruners

@pytest.mark.parametrize("warmup,min_runs", [(0, 1), (4, 3), (10, 2)])
def test_median_rule_decides_as_optunas_median_pruner(warmup, min_runs):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steps = list(range(2, 41, 2))
    for seed in range(3):
        curves = _curves(12, steps, seed)
        study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=min_runs,
                                                                       n_warmup_steps=warmup))
        finished: list[Curve] = []  # the folder as the pruner would read it
        for i, curve in enumerate(curves):
            trial = study.ask()
            ours, theirs, own = _race(trial, curve, steps, lambda own, s: median_rule(
                own, s, finished, warmup_steps=warmup, min_runs=min_runs))
            assert ours == theirs, f"seed {seed} run {i}: ours stops at {ours}, Optuna at {theirs}"
            if theirs is None:
                study.tell(trial, curve[steps[-1]])
                finished.append(Curve(f"r{i}", "completed", own))
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                finished.append(Curve(f"r{i}", "pruned", own))
    assert any(c.status == "pruned" for c in finished)  # the comparison exercised both outcomes


@pytest.mark.parametrize("factor,min_steps,every", [(3, 2, 2), (2, 3, 2), (4, 1, 1)])
def test_asha_rule_decides_as_optunas_successive_halving(factor, min_steps, every):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steps = list(range(every, 41, every))
    for seed in range(3):
        curves = _curves(15, steps, seed)
        study = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_steps, reduction_factor=factor, min_early_stopping_rate=0, bootstrap_count=0))
        seen: list[Curve] = []
        pruned = 0
        for i, curve in enumerate(curves):
            trial = study.ask()
            ours, theirs, own = _race(trial, curve, steps, lambda own, s: asha_rule(
                own, s, seen, warmup_steps=0, min_runs=1, factor=factor, min_steps=min_steps))
            assert ours == theirs, f"seed {seed} run {i}: ours stops at {ours}, Optuna at {theirs}"
            pruned += theirs is not None
            study.tell(trial, curve[steps[-1]]) if theirs is None else study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            seen.append(Curve(f"r{i}", "completed" if theirs is None else "pruned", own))
        assert 0 < pruned < len(curves)


def test_median_verdict_carries_the_numbers():
    done = [Curve(f"c{i}", "completed", {10: v}) for i, v in enumerate([2.0, 3.0, 4.0])]
    d = median_rule({5: 3.9, 10: 3.5}, 10, done + [Curve("p", "pruned", {10: 1.0})], warmup_steps=5, min_runs=3)
    assert d.prune and d.rule == "median" and d.step == 10
    assert d.numbers["value"] == 3.5 and d.numbers["threshold"] == 3.0 and d.numbers["compared_runs"] == 3
    assert "3.5 (best so far) > median 3 of 3 completed runs at step 10" in d.reason
    # not before the warm-up, and not before min_runs runs completed
    assert not median_rule({4: 9.0}, 4, done, warmup_steps=5, min_runs=3).prune
    assert not median_rule({10: 9.0}, 10, done[:2], warmup_steps=0, min_runs=3).prune


def test_asha_min_runs_waits_for_enough_runs_at_a_rung():
    assert rung_steps(2, 3, 40) == [2, 6, 18]
    others = [Curve("a", "running", {2: 1.0})]
    # two runs at rung 0 (step 2): fewer than min_runs=3, so nobody is stopped yet
    d = asha_rule({2: 5.0}, 2, others, warmup_steps=0, min_runs=3, factor=3, min_steps=2)
    assert not d.prune and "< pruner.min_runs=3" in d.reason
    d = asha_rule({2: 5.0}, 2, others + [Curve("b", "pruned", {2: 2.0})], warmup_steps=0, min_runs=3, factor=3, min_steps=2)
    assert d.prune and d.numbers["rung"] == 0 and d.numbers["threshold"] == 1.0 and d.numbers["kept"] == 1


# ------------------------------------------------------------------ curve files in the study folder

def test_curve_file_cohorts_and_partial_lines(tmp_path):
    run = tmp_path / "study" / "run-a"
    run.mkdir(parents=True)
    append_point(run, 5, 3.0, "k1", 32)
    append_point(run, 10, 2.5, "k1", 32)
    append_point(run, 10, 2.4, "k1", 32)  # written again after a resume: the last line wins
    append_point(run, 5, 9.9, "other", 32)
    with (run / CURVE).open("a") as f:
        f.write('{"step": 15, "val/lo')  # a line being written this instant
    assert read_curve(run, "k1") == {5: 3.0, 10: 2.4}
    (run / "record.json").write_text(json.dumps({"status": "pruned"}))
    other = tmp_path / "study" / "run-b"
    other.mkdir()
    append_point(other, 5, 1.0, "k1", 32)  # no record yet: a run that just started
    got = {c.run_id: c for c in study_curves(tmp_path / "study", "k1", exclude="run-b")}
    assert list(got) == ["run-a"] and got["run-a"].status == "pruned"
    assert study_curves(tmp_path / "study", "k1")[1].status == "running"


# ------------------------------------------------------------------ config

def test_pruner_needs_periodic_validation_and_sane_fields():
    from lorasweep.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(compose(*TINY, "pruner=median"))
    assert "train.eval_every=0: pruner=median compares periodic validation losses" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate(compose(*TINY, "pruner=asha", "train.eval_every=2", "pruner.reduction_factor=1",
                         "pruner.name=hyperband", "train.eval_examples=0"))
    msg = str(e.value)
    assert "pruner.name='hyperband'" in msg and "pruner.reduction_factor=1" in msg and "train.eval_examples=0" in msg
    validate(compose(*TINY, "pruner=median", "train.eval_every=2"))


def test_periodic_validation_and_pruner_are_not_part_of_the_run_identity():
    from lorasweep.config import run_id

    plain = run_id(compose(*TINY))
    assert run_id(compose(*TINY, "train.eval_every=5", "train.eval_examples=8", "pruner=median")) == plain


# ------------------------------------------------------------------ in a real run (tiny model)

def test_validation_curve_does_not_change_training(tiny):
    from lorasweep.job import run

    a = run(tiny("train.max_steps=6", "study=a", "train.num_threads=1"), show_progress=False)
    b = run(tiny("train.max_steps=6", "train.eval_every=2", "train.eval_examples=8", "study=b", "train.num_threads=1"),
            show_progress=False)
    assert a.status == b.status == "completed"
    assert a.metrics["train/loss"] == b.metrics["train/loss"] and a.metrics["val/loss"] == b.metrics["val/loss"]
    curve = [json.loads(l) for l in (Path(b.run_dir) / CURVE).read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4, 6] and all(c["examples"] == 8 for c in curve)
    assert not (Path(a.run_dir) / CURVE).exists()


def test_periodic_validation_is_timed_apart_from_training(tiny):
    """train.eval_every is outside the run id: time/train_s and tokens/s must mean the same with it.
    Here validation is far more work than training (8 x 96 items scored vs 8 steps of 4 rows)."""
    from lorasweep.job import run

    common = ["train.max_steps=8", "data.n_val=96", "train.num_threads=1", "train.save_adapter=false"]
    a = run(tiny(*common, "study=a"), show_progress=False)
    b = run(tiny(*common, "study=b", "train.eval_every=1", "train.eval_examples=96"), show_progress=False)
    assert a.run_id == b.run_id and a.status == b.status == "completed"
    assert "time/val_curve_s" not in a.metrics
    m = b.metrics
    assert m["time/val_curve_s"] > m["time/train_s"] > 0  # validation is not inside training time
    assert m["time/train_s"] + m["time/val_curve_s"] < m["time/total_s"]
    assert m["throughput/tokens_per_s"] == pytest.approx(m["train/tokens"] / m["time/train_s"])
    steps = [json.loads(l) for l in (Path(b.run_dir) / "steps.jsonl").read_text().splitlines()]
    assert all(s["throughput/tokens_per_s"] > 0 for s in steps)


def test_losing_run_is_pruned_with_its_verdict_and_not_retrained(tiny):
    """Two runs that learn, then one that cannot (lr 1e-9): stopped at the first check after warm-up."""
    from lorasweep.job import run

    common = ["train.max_steps=8", "train.eval_every=2", "train.eval_examples=8", "pruner=median",
              "pruner.min_runs=2", "pruner.warmup_steps=4", "train.save_adapter=false", "train.num_threads=1"]
    good = [run(tiny(*common, f"optimizer.lr={lr}"), show_progress=False) for lr in (1e-2, 5e-3)]
    assert [o.status for o in good] == ["completed", "completed"]
    bad = run(tiny(*common, "optimizer.lr=1e-9"), show_progress=False)
    assert bad.status == "pruned", bad.error
    rec = json.loads((Path(bad.run_dir) / "record.json").read_text())
    assert rec["status"] == "pruned" and rec["error"] == bad.error
    verdict = rec["pruned"]
    assert verdict["rule"] == "median" and verdict["step"] == 4 and verdict["compared_runs"] == 2
    assert verdict["value"] > verdict["threshold"] and verdict["warmup_steps"] == 4 and verdict["min_runs"] == 2
    assert rec["metrics"]["train/steps"] == 4 and rec["metrics"]["train/planned_steps"] == 8
    m = rec["metrics"]  # timed by the loop: validation apart, tokens/s over training time only
    assert m["time/val_curve_s"] > 0 and 0 < m["time/train_s"] < m["time/total_s"] - m["time/val_curve_s"]
    assert m["throughput/tokens_per_s"] == pytest.approx(m["train/tokens"] / m["time/train_s"])
    assert sorted(read_curve(bad.run_dir)) == [2, 4]  # the partial curve stays in the folder
    # While a pruner is on, the verdict stands: a relaunch does not train the run again.
    again = run(tiny(*common, "optimizer.lr=1e-9"), show_progress=False)
    assert again.status == "pruned" and sorted(read_curve(bad.run_dir)) == [2, 4]
    # pruner=none trains it to its end
    full = run(tiny(*common, "optimizer.lr=1e-9", "pruner=none"), show_progress=False)
    assert full.status == "completed" and full.metrics["train/steps"] == 8


# ------------------------------------------------------------------ a plain -m grid, end to end

@pytest.mark.slow
def test_grid_with_median_pruner_prunes_reports_and_relaunches(tmp_path):
    args = [*TINY, f"results_dir={tmp_path / 'results'}", "study=g", "train.max_steps=12", "train.eval_every=2",
            "train.eval_examples=8", "pruner=median", "pruner.min_runs=2", "pruner.warmup_steps=4",
            "train.num_threads=1"]
    r = lorasweep("-m", *args, "optimizer.lr=1e-2,5e-3,1e-9", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sweep: 2 completed, 1 pruned, 0 failed" in r.stdout
    assert "pruned tiny_llama" in r.stdout and "completed runs at step 4" in r.stdout
    recs = records(tmp_path / "results" / "g")
    assert sorted(v["status"] for v in recs.values()) == ["completed", "completed", "pruned"]

    from lorasweep.analysis.report import main as report_main

    report_main([str(tmp_path / "results" / "g")])
    md = (tmp_path / "results" / "g" / "trials.md").read_text()
    assert "# Pruned sweep: g" in md and "3 trials: 2 completed, 1 pruned, 0 failed" in md
    assert "optimizer.lr=0.01" in md and "hydra.mode=RUN study=g-best" in md
    assert "28 optimizer steps trained = **78%** of the 36 steps of 3 full runs" in md
    for png in ("trials_history.png", "trials_curves.png"):
        assert (tmp_path / "results" / "g" / png).stat().st_size > 0

    again = lorasweep("-m", *args, "optimizer.lr=1e-2,5e-3,1e-9", cwd=tmp_path)
    assert again.returncode == 0 and "sweep: 0 completed, 1 pruned, 0 failed, 2 skipped" in again.stdout
