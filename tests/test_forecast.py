"""Know what a run costs before it runs: a time forecast in every record, made before training,
in lorasweep-plan with sweep totals, and as the SLURM jobs' time limit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose
from lorasweep import job
from lorasweep.run.forecast import slurm_timeout_min

TINY = ["model=tiny_llama", "logger=none", "eval=none", "train.batch_size=4", "train.max_seq_len=80",
        "data.n_train=32", "data.n_val=8", "data.n_test=8", "train.num_threads=1", "train.log_every=1"]


def _run(tmp_path, *extra):
    out = job.run(compose(*TINY, f"results_dir={tmp_path}/r", "study=f", *extra), show_progress=False)
    assert out.status == "completed", out.error
    return out, json.loads((Path(out.run_dir) / "record.json").read_text())


def test_forecast_is_in_the_record_from_a_probe_then_from_finished_runs(tmp_path):
    first, rec1 = _run(tmp_path, "train.max_steps=6")
    m = first.metrics
    assert rec1["forecast"]["source"] == "probe" and m["time/probe_s"] > 0
    assert m["plan/train_s"] > 0 and m["plan/train_flops"] > 0 and "plan/eval_s" not in m  # eval=none: no val loss
    second, rec2 = _run(tmp_path, "train.max_steps=12")  # another run like it: no probe needed
    assert rec2["forecast"]["source"] == "runs" and first.run_id in rec2["forecast"]["detail"]
    assert "time/probe_s" not in second.metrics
    # twice the steps (8 batches an epoch: the second epoch's order pads otherwise): about twice the
    # FLOPs, at the first run's measured throughput
    assert second.metrics["plan/train_flops"] == pytest.approx(2 * m["plan/train_flops"], rel=0.05)
    rate = m["plan/train_flops"] / m["time/train_s"]
    assert second.metrics["plan/train_s"] == pytest.approx(second.metrics["plan/train_flops"] / rate, rel=1e-6)


def test_the_probe_changes_nothing_the_run_computes(tmp_path):
    a, _ = _run(tmp_path, "train.max_steps=4", "lora.dropout=0.1", "study=a")
    b, _ = _run(tmp_path, "train.max_steps=4", "lora.dropout=0.1", "study=b", "planner.forecast=false")
    steps = [[json.loads(l)["train/loss"] for l in (Path(o.run_dir) / "steps.jsonl").read_text().splitlines()]
             for o in (a, b)]
    assert steps[0] == steps[1] and a.metrics["train/loss"] == b.metrics["train/loss"]
    assert "plan/train_s" not in b.metrics and a.run_id == b.run_id


def test_lorasweep_plan_prints_each_runs_time_and_the_sweep_total(tmp_path):
    _run(tmp_path, "train.max_steps=6")
    p = subprocess.run([sys.executable, "-m", "lorasweep.plan_cli", "-m", *TINY, f"results_dir={tmp_path}/r",
                        "study=f", "train.max_steps=6,12", "launcher=slurm"], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("predicted training time") == 2
    assert "sweep: 2 runs to train" in p.stdout and "device-hours" in p.stdout
    assert "launcher=slurm: timeout_min=" in p.stdout


def _slurm_limit(tmp_path, *overrides) -> int:
    """hydra.launcher.timeout_min as the launching process of `lorasweep -m launcher=slurm ...` sees it."""
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from lorasweep.cli import conf_dir, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    # a CPU partition (gpus_per_node=null): the runs it plans for are CPU runs, like the finished one
    task = [*TINY, f"results_dir={tmp_path}/r", "study=f", "train.max_steps=6", "hydra.launcher.gpus_per_node=null",
            *overrides]
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = hcompose(config_name="config", overrides=["launcher=slurm", *task], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = ["launcher=slurm", *task, "lora.r=2,4"]  # what `-m` hands the sweeper
            cfg.hydra.job.config_name = "config"
        return cfg.hydra.launcher.timeout_min


def test_slurm_jobs_ask_for_a_limit_from_the_forecast(tmp_path):
    assert _slurm_limit(tmp_path) == 240  # no finished run like these yet: the launcher's default
    _run(tmp_path, "train.max_steps=6", "lora.r=2")
    limit = _slurm_limit(tmp_path)
    assert limit == slurm_timeout_min(1.0) < 240  # tiny runs: a minute's margin and the allowance
    assert _slurm_limit(tmp_path, "hydra.launcher.timeout_min=30") == 30  # the user's limit wins


def test_the_report_shows_forecast_against_measured_time(tmp_path):
    from lorasweep.analysis.report import write_report

    _run(tmp_path, "train.max_steps=6")
    _run(tmp_path, "train.max_steps=6", "lora.r=4")
    md = write_report(tmp_path / "r" / "f")["md"].read_text()
    assert "## Training time: forecast (before the run) vs measured" in md
    table = md.split("## Training time")[1].split("\n\n")[1]
    assert table.count("\n") == 4 and "**all runs**" in table  # header, rule, 2 runs, total


def test_a_sweep_updates_the_forecast_of_its_remaining_runs_after_each_run(tmp_path):
    from test_sweep import lorasweep

    p = lorasweep("-m", *TINY, f"results_dir={tmp_path}/r", "study=s", "train.max_steps=4", "lora.r=2,4,8",
                  cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "forecast: 2 run(s) left, " in out and "forecast: 1 run(s) left, " in out, out[-3000:]
    assert "(from the runs finished so far)" in out
