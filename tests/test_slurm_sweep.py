"""`lorasweep -m launcher=slurm ...` runs each configuration of the grid as a job of a real SLURM."""
from __future__ import annotations

import pytest

from slurm_fixture import local_slurm  # noqa: F401  (pytest fixture)
from test_sweep import TINY, lorasweep, records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_slurm_sweep_runs_each_config_as_a_job(local_slurm, tmp_path):  # noqa: F811
    # The cluster fields of conf/launcher/slurm.yaml, sized for the one small local node.
    p = lorasweep("-m", "launcher=slurm", *TINY, f"results_dir={tmp_path}/r", "study=sl", "lora.r=2,4",
                  f"hydra.launcher.partition={local_slurm.partition}", "hydra.launcher.gpus_per_node=null",
                  "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15",
                  "hydra.launcher.array_parallelism=2", cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = list(records(tmp_path / "r" / "sl").values())
    assert sorted(r["config"]["lora"]["r"] for r in recs) == [2, 4]
    assert all(r["status"] == "completed" for r in recs)
    job_ids = {r["env"].get("slurm_job_id") for r in recs}
    assert None not in job_ids and len(job_ids) == 2  # two jobs (of one array)
    assert all(r["env"].get("slurm_array") for r in recs)
    assert all(r["config"]["train"]["num_threads"] == 1 for r in recs)  # = cpus_per_task
    assert "sweep: 2 completed, 0 failed, 0 skipped (2 runs)" in p.stdout


def test_slurm_job_signalled_mid_run_is_requeued_and_resumes(local_slurm, tmp_path):  # noqa: F811
    import json
    import subprocess
    import time

    study = tmp_path / "r" / "pre"
    proc = lorasweep("-m", "launcher=slurm", *TINY, f"results_dir={tmp_path}/r", "study=pre", "lora.r=2",
                     "train.max_steps=400", "train.log_every=1", "train.checkpoint_every=100",
                     f"hydra.launcher.partition={local_slurm.partition}", "hydra.launcher.gpus_per_node=null",
                     "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15",
                     cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    job = None
    while job is None:
        assert proc.poll() is None and time.time() < deadline, "the job never started training"
        for rec in records(study).values():
            steps = study / rec["run_id"] / "steps.jsonl"
            if rec["status"] == "running" and steps.exists() and steps.read_text().count("\n") >= 20:
                job = rec["env"]["slurm_job_id"]
        time.sleep(0.2)
    # What SLURM sends the job's steps ahead of a time limit (submitit asks for --signal=USR2@delay).
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    (rec,) = records(study).values()
    assert rec["status"] == "completed", rec.get("error")
    assert rec["resumed_from_step"] >= 20
    steps = [json.loads(l)["step"] for l in (study / rec["run_id"] / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))


def test_search_workers_share_one_study_as_slurm_jobs(local_slurm, tmp_path):  # noqa: F811
    """launcher=slurm search.workers=2: two array jobs ask and tell one Optuna journal in the study
    folder; the search stops at n_trials across both, and every trial's run records its SLURM job."""
    from lorasweep.study.search import counts, load

    p = lorasweep("sweep=search_tiny_lr", "launcher=slurm", "search.workers=2", "search.n_trials=4",
                  "search.n_startup_trials=2", "train.max_steps=10", "train.eval_every=5", "pruner.warmup_steps=5",
                  "data.n_train=64", f"results_dir={tmp_path}/r",
                  f"hydra.launcher.partition={local_slurm.partition}", "hydra.launcher.gpus_per_node=null",
                  "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15",
                  "hydra.launcher.array_parallelism=2", cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    folder = tmp_path / "r" / "search_tiny_lr"
    study = load(folder)
    c = counts(study)
    assert len(study.trials) == 4 and c["complete"] + c["pruned"] == 4, c  # n_trials across both jobs
    recs = records(folder)
    assert {t.user_attrs["run_id"] for t in study.trials} == set(recs)
    assert all(r["env"].get("slurm_job_id") and r["env"].get("slurm_array") for r in recs.values())
    assert "best trial" in p.stdout


def test_slurm_jobs_ask_for_the_time_limit_the_forecast_gives(local_slurm, tmp_path):  # noqa: F811
    """With a finished run like them in the results folder, and no hydra.launcher.timeout_min given, the
    sweep's SLURM jobs ask for the forecast's limit (the longest run x 1.5 + 10 min) instead of 240."""
    from lorasweep.run.forecast import slurm_timeout_min

    common = [*TINY, f"results_dir={tmp_path}/r", "study=fc"]
    assert lorasweep(*common, "lora.r=8", cwd=tmp_path).returncode == 0  # a finished run of this model here
    p = lorasweep("-m", "launcher=slurm", *common, "lora.r=2,4", f"hydra.sweep.dir={tmp_path}/sweep",
                  f"hydra.launcher.partition={local_slurm.partition}", "hydra.launcher.gpus_per_node=null",
                  "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    want = slurm_timeout_min(1.0)  # tiny runs: well under a minute, so the allowance and one minute
    assert f"SLURM time limit from the forecast: timeout_min={want}" in p.stdout + p.stderr
    scripts = list((tmp_path / "sweep").rglob("*_submission.sh"))
    assert scripts and all(f"--time={want}" in s.read_text() for s in scripts), [s.read_text()[:800] for s in scripts]
