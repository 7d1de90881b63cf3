"""Optuna search: bad searches refused before any run, the space as run overrides, workers sharing
one study in the study folder, a killed search resumed, and one real search end to end."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from omegaconf import open_dict

from test_sweep import lorasweep, records


def compose_search(*overrides: str):
    """The launching process's config of `lorasweep sweep=search_tiny_lr <overrides>` (hydra node kept)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lorasweep.cli import conf_dir, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose(config_name="config", overrides=["sweep=search_tiny_lr", *overrides], return_hydra_config=True)


def set_space(cfg, space: dict):
    with open_dict(cfg):
        cfg.search.space = space


def problems_of(*overrides, space=None, arguments=()):
    from lorasweep.study.search import check

    cfg = compose_search(*overrides)
    if space is not None:
        set_space(cfg, space)
    return "; ".join(check(cfg, list(arguments)))


# ------------------------------------------------------------------ refused before any run

def test_the_study_file_is_a_valid_search(tmp_path):
    from lorasweep.study.search import check, is_search

    cfg = compose_search(f"results_dir={tmp_path}")
    assert is_search(cfg) and check(cfg) == []


@pytest.mark.parametrize("overrides,space,arguments,expected", [
    (["search.metric=val/los"], None, (), "search.metric='val/los': unknown; use val/loss"),
    (["search.metric=eval/hellaswag/acc"], None, (), "search.metric='eval/hellaswag/acc': eval/<task>/<metric> needs <task> in eval.tasks"),
    ([], {}, (), "search.space: empty"),
    (["search.n_trials=0"], None, (), "search.n_trials=0: must be a positive integer"),
    (["search.n_trials=-3"], None, (), "search.n_trials=-3: must be a positive integer"),
    (["train.eval_every=0"], None, (), "train.eval_every=0: pruner=median compares periodic validation losses"),
    ([], {"optimizer.lrr": {"type": "float", "low": 1e-5, "high": 1e-2}}, (), "search.space.optimizer.lrr: no such config field"),
    ([], {"optimizer.lr": {"type": "float", "low": 1e-2, "high": 1e-5}}, (), "search.space.optimizer.lr: low=0.01 must be < high=1e-05"),
    ([], {"optimizer.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, (), "search.space.optimizer.lr.low=0.0: a log range needs low > 0"),
    ([], {"optimizer.lr": {"type": "float", "low": -1.0, "high": 1e-2}}, (), "search.space.optimizer.lr: -1.0 gives optimizer.lr=-1.0: must be > 0"),
    ([], {"lora.dropout": {"choices": [0.0, 1.5]}}, (), "search.space.lora.dropout: 1.5 gives lora.dropout=1.5: must be in [0, 1)"),
    (["search.sampler=grid"], None, (), "search.space.optimizer.lr: search.sampler=grid needs choices"),
    (["search.sampler=cmaes"], None, (), "search.sampler='cmaes': must be one of tpe, random, grid"),
    ([], None, ("lora.r=4,8",), "lora.r: value lists (lora.r=4,8) make a grid"),
])
def test_bad_search_config_is_refused_naming_the_field(tmp_path, overrides, space, arguments, expected):
    assert expected in problems_of(f"results_dir={tmp_path}", *overrides, space=space, arguments=arguments)


def test_cli_refuses_a_bad_search_before_any_run(tmp_path):
    r = lorasweep("sweep=search_tiny_lr", f"results_dir={tmp_path / 'results'}", "search.n_trials=0",
                  "search.metric=val/accuracy", cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [l for l in r.stderr.splitlines() if l.startswith("lorasweep: invalid search config:")]
    assert line and "search.n_trials=0" in line[0] and "search.metric='val/accuracy'" in line[0]
    study = tmp_path / "results" / "search_tiny_lr"
    assert not (study / "optuna.journal").exists() and not list(study.glob("*/record.json"))


# ------------------------------------------------------------------ the space as overrides

def test_space_becomes_run_overrides(tmp_path):
    import optuna

    from lorasweep.study.search import apply, job_config, parse_space, suggest

    cfg = job_config(compose_search(f"results_dir={tmp_path}"))
    space = {"lora.r": {"type": "int", "low": 4, "high": 64, "log": True},
             "lora.alpha": {"choices": [0.5, 1, 2], "times": "lora.r"},
             "optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
             "lora.targets": {"choices": [["qv"], ["attention"], ["q_proj", "v_proj"]]}}
    params, problems = parse_space(space, cfg)
    assert problems == [] and [p.name for p in params][1] == "lora.alpha/lora.r"
    study = optuna.create_study()
    study.enqueue_trial({"lora.r": 16, "lora.alpha/lora.r": 2, "optimizer.lr": 0.00123456789,
                         "lora.targets": "[q_proj,v_proj]"})
    overrides = suggest(study.ask(), params, cfg)
    assert overrides == ["lora.r=16", "lora.alpha=32.0", "optimizer.lr=0.00123457", "lora.targets=[q_proj,v_proj]"]
    rc = apply(cfg, overrides)
    assert (rc.lora.r, rc.lora.alpha, rc.optimizer.lr, rc.lora.targets) == (16, 32.0, 0.00123457, ["q_proj", "v_proj"])


# ------------------------------------------------------------------ workers and the study folder (fake runs)

def _fake_run(rc, show_progress=False):
    """A run that costs nothing: val/loss is best at lr 1e-2; runs below lr 1e-3 are 'pruned'."""
    from lorasweep.job import Outcome, run_dir_for
    from lorasweep.run.pruner import append_point

    d = run_dir_for(rc)
    d.mkdir(parents=True, exist_ok=True)
    loss = 1.0 + abs(math.log10(rc.optimizer.lr) + 2)
    pruned = rc.optimizer.lr < 1e-3
    for step in (5, 10) if not pruned else (5,):
        append_point(d, step, loss + 1.0 / step, "k", 8)
    metrics = {"train/steps": 5 if pruned else 10, "train/planned_steps": 10}
    if not pruned:
        metrics["val/loss"] = loss
    status = "pruned" if pruned else "completed"
    (d / "record.json").write_text(json.dumps({"status": status, "metrics": metrics, "error": "median" if pruned else None,
                                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    return Outcome(d.name, status, "median" if pruned else None, str(d), metrics)


def _prepared(tmp_path, *overrides):
    from lorasweep.study.search import job_config, prepare

    config = compose_search(f"results_dir={tmp_path}", *overrides)
    prepare(config, [f"results_dir={tmp_path}", *overrides], None)
    return config, job_config(config)


def _study(cfg):
    from lorasweep.cli import to_run_config
    from lorasweep.study.search import open_study

    return open_study(to_run_config(cfg))


def test_two_workers_share_one_study_and_stop_at_n_trials(tmp_path, monkeypatch):
    import lorasweep.job
    from lorasweep.study.search import compute, counts, work

    monkeypatch.setattr(lorasweep.job, "run", _fake_run)
    _, cfg = _prepared(tmp_path, "search.n_trials=12", "search.n_startup_trials=4")
    children = []
    for job in range(2):  # two processes, as two parallel or SLURM jobs would be
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work(cfg, note=lambda *a: None, job=job)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            os._exit(code)
        children.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
    study = _study(cfg)
    c = counts(study)
    assert c["complete"] + c["pruned"] + c["fail"] == 12 and c["running"] == c["waiting"] == 0
    assert {t.user_attrs["pid"] for t in study.trials} == set(children)  # both took part
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and all(list(t.intermediate_values) == [5] for t in pruned)  # the curve, as Optuna's intermediate values
    assert study.best_value == min(t.value for t in study.trials if t.value is not None)
    assert compute(study)["steps"] == sum(5 if t.state.name == "PRUNED" else 10 for t in study.trials)
    # A relaunch of a full search runs nothing more.
    work(cfg, note=lambda *a: pytest.fail("no trial expected"), job=0)
    assert len(_study(cfg).trials) == 12


def test_a_trial_whose_worker_died_is_asked_again(tmp_path, monkeypatch):
    import socket

    import lorasweep.job
    from lorasweep.study.search import counts, parse_space, suggest, work
    from omegaconf import OmegaConf

    monkeypatch.setattr(lorasweep.job, "run", _fake_run)
    _, cfg = _prepared(tmp_path, "search.n_trials=4")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = _study(cfg)
    params, _ = parse_space(OmegaConf.to_container(cfg.search.space), cfg)
    t = study.ask()  # what a SIGKILLed worker leaves: a RUNNING trial, its run folder without a lease
    overrides = suggest(t, params, cfg)
    for k, v in {"host": socket.gethostname(), "pid": dead.pid, "overrides": overrides,
                 "run_dir": str(tmp_path / "search_tiny_lr" / "never-started")}.items():
        t.set_user_attr(k, v)
    seen = []
    work(cfg, note=lambda o, number, ov: seen.append((number, ov)), job=0)
    study = _study(cfg)
    first = study.trials[0]
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    retry = [s for s in study.trials if s.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == first.params and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert seen[0] == (retry[0].number, overrides)  # the same parameters, asked first
    c = counts(study)
    assert c["complete"] + c["pruned"] + c["fail"] == 4 and c["interrupted"] == 1


def test_grid_sampler_visits_every_point_once(tmp_path, monkeypatch):
    import lorasweep.job
    from lorasweep.study.search import work

    monkeypatch.setattr(lorasweep.job, "run", _fake_run)
    config = compose_search(f"results_dir={tmp_path}", "search.sampler=grid", "search.n_trials=6")
    set_space(config, {"optimizer.lr": {"choices": [1e-3, 1e-2, 1e-1]}, "lora.r": {"type": "int", "low": 2, "high": 4, "step": 2}})
    from lorasweep.study.search import check, job_config, prepare

    assert check(config) == []
    prepare(config, [], None)
    cfg = job_config(config)
    work(cfg, note=lambda *a: None, job=0)
    points = sorted(tuple(sorted(t.params.items())) for t in _study(cfg).trials)
    assert len(points) == 6 and len(set(points)) == 6


# ------------------------------------------------------------------ a real search, killed and resumed

def _journal_state(folder: Path) -> tuple[int, list]:
    from lorasweep.study.search import load

    study = load(folder) if (folder / "optuna.journal").exists() else None
    if study is None:
        return 0, []
    trials = study.get_trials(deepcopy=False)
    return sum(t.state.is_finished() for t in trials), [t for t in trials if t.state.name == "RUNNING"]


@pytest.mark.slow
def test_search_prunes_survives_a_kill_and_resumes(tmp_path):
    args = ["sweep=search_tiny_lr", f"results_dir={tmp_path / 'results'}", "search.n_trials=6",
            "search.n_startup_trials=3", "train.max_steps=30", "train.eval_every=5", "pruner.min_runs=2",
            "pruner.warmup_steps=5", "data.n_train=128", "train.num_threads=1"]
    folder = tmp_path / "results" / "search_tiny_lr"
    p = lorasweep(*args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while time.time() < deadline:  # kill while a trial trains, after two have finished
        done, running = _journal_state(folder)
        if done >= 2 and running and (Path(running[0].user_attrs.get("run_dir", "/nonexistent")) / "lease.json").exists():
            break
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        time.sleep(0.3)
    else:
        pytest.fail("the search never reached its third trial")
    killed = running[0]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    before = {k: v["started_at"] for k, v in records(folder).items() if v["status"] in ("completed", "pruned")}

    r = lorasweep(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "continuing: " in r.stdout and "best trial" in r.stdout and "rerun: lorasweep sweep=search_tiny_lr" in r.stdout
    from lorasweep.study.search import counts, load

    study = load(folder)
    c = counts(study)
    assert c["complete"] + c["pruned"] + c["fail"] == 6 and c["interrupted"] == 1
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params
    after = records(folder)
    assert all(after[k]["started_at"] == v for k, v in before.items())  # finished trials were not redone
    assert all(t.user_attrs.get("run_id") in after for t in study.trials if not t.user_attrs.get("interrupted"))

    from lorasweep.analysis.report import main as report_main

    report_main([str(folder)])
    md = (folder / "trials.md").read_text()
    assert "# Search: search_tiny_lr" in md and "(1 interrupted and asked again)" in md
    assert f"Trial {study.best_trial.number}: val/loss = **" in md and "hydra.mode=RUN study=search_tiny_lr-best" in md
    assert "optimizer steps trained = **" in md and "## Parameter importance" in md


@pytest.mark.parametrize("metric, want", [
    ("eval/wikitext/bits_per_byte", "minimize"), ("eval/wikitext/word_perplexity", "minimize"),
    ("eval/wmt16/ter", "minimize"), ("eval/gsm8k/exact_match_strict-match", "maximize"),
    ("eval/piqa/acc_norm", "maximize"), ("val/loss", "minimize"), ("val/accuracy", "maximize")])
def test_direction_auto_follows_lm_evals_higher_is_better(metric, want):
    from lorasweep.config import SearchConfig
    from lorasweep.study.search import direction

    assert direction(SearchConfig(metric=metric)) == want


def test_a_trial_another_worker_trains_is_charged_no_steps(tmp_path):
    """Its run is held by another worker's lease: those steps are that worker's trial's, not this one's."""
    import optuna

    from lorasweep.study.search import _tell, compute

    study = optuna.create_study(direction="minimize")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "steps.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2, 3)))
    _tell(study, study.ask(), "elsewhere", {}, "running elsewhere (node-b, pid 7)", run_dir)
    (trial,) = study.trials
    assert trial.user_attrs["steps"] == 0 and trial.user_attrs["reused"] is True
    assert compute(study)["steps"] == 0
