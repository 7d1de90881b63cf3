"""Sweeps: failures stay isolated, re-launch resumes, per-run peaks, launchers, progress, summary."""
from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose

# Small enough for seconds per run on a shared 2-core CPU.
TINY = ["model=tiny_llama", "logger=none", "train.max_steps=2", "train.batch_size=4", "train.max_seq_len=80",
        "data.n_train=32", "data.n_val=8", "data.n_test=8", "train.save_adapter=false"]


def lorasweep(*args, cwd, timeout=600, **popen):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lorasweep.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def records(study_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in Path(study_dir).glob("*/record.json")}


# ------------------------------------------------------------------ fast, in-process

def test_sweep_size_counts_file_and_command_line_lists():
    from lorasweep.study.sweep import sweep_size

    cfg = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"lora.r": "2,4"}},
        "overrides": {"task": ["seed=0,1,2", "train.max_steps=3"]}}})
    assert sweep_size(cfg) == 6
    cfg.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweep_size(cfg) is None  # optuna decides its trials as it goes


def test_gpu_pinning_and_thread_share():
    from lorasweep.study.sweep import pin_gpu, threads_per_job

    assert [pin_gpu(k, ["0", "1", "2", "3"]) for k in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert [pin_gpu(k, ["5", "7"]) for k in range(3)] == ["5", "7", "5"]  # the parent's CUDA_VISIBLE_DEVICES
    assert pin_gpu(0, []) is None  # CPU machine
    assert threads_per_job(16, 4) == 4 and threads_per_job(2, 4) == 1 and threads_per_job(8, 0) == 8


def test_summary_lists_each_kind_and_counts_silent_runs_as_failed(tmp_path, capsys):
    from lorasweep.study.summary import print_sweep

    outs = [{"run_id": "a-1", "status": "completed", "metrics": {"train/loss": 1.0}},
            {"run_id": "b-2", "status": "failed", "error": "lora.targets: unknown module(s) qkv",
             "overrides": ["lora.targets=[qkv]"]},
            {"run_id": "c-3", "status": "skipped", "metrics": {}}]
    assert print_sweep(outs, tmp_path) == 1
    out = capsys.readouterr().out
    assert "1 completed, 1 failed, 1 skipped (3 runs)" in out
    assert "FAILED b-2 [lora.targets=[qkv]]: lora.targets: unknown module(s) qkv" in out
    assert "skipped (already completed; rerun=true to redo): c-3" in out
    assert print_sweep(outs, tmp_path, expected=5) == 3  # two jobs died without a word
    assert "2 did not report" in capsys.readouterr().out


def test_seeds_give_distinct_run_ids_of_one_config():
    from lorasweep.config import run_id

    cfgs = [compose(*TINY, f"seed={s}") for s in (0, 1, 2)]
    ids = [run_id(c) for c in cfgs]
    assert len(set(ids)) == 3 and [c.train.seed for c in cfgs] == [0, 1, 2]
    assert all(f"_s{s}-" in i for s, i in zip((0, 1, 2), ids))
    assert {(c.lora.r, c.lora.alpha, tuple(c.lora.targets), c.optimizer.lr) for c in cfgs} == {
        (cfgs[0].lora.r, cfgs[0].lora.alpha, tuple(cfgs[0].lora.targets), cfgs[0].optimizer.lr)}


def test_study_file_sets_values_and_command_line_wins():
    c = compose("sweep=smoke")
    assert (c.study, c.model.name, c.train.max_steps, c.logger.backend) == ("smoke", "tiny_llama", 2, "none")
    c = compose("sweep=smoke", "study=mine", "train.max_steps=5")
    assert (c.study, c.train.max_steps) == ("mine", 5)


def _wandb_records(path: str):
    """Protobuf records of an offline .wandb file (a LevelDB-style log after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk ends a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_failed_run_finishes_its_wandb_run_with_nonzero_exit_code(tmp_path):
    from lorasweep.job import run

    cfg = compose(*[o for o in TINY if not o.startswith("logger")], "logger=wandb_offline",
                  f"results_dir={tmp_path}", "study=w", "optimizer=sgd", "optimizer.lr=inf",
                  "optimizer.max_grad_norm=null", "train.log_every=1")
    out = run(cfg, show_progress=False)
    assert out.status == "failed" and out.error.startswith("DivergedError: diverged at step")
    files = glob.glob(f"{out.run_dir}/wandb/offline-run-*/run-*.wandb")
    assert len(files) == 1
    exits = [r.exit.exit_code for r in _wandb_records(files[0]) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


# ------------------------------------------------------------------ the command, end to end

@pytest.mark.slow
def test_grid_with_bad_targets_records_failures_goes_on_and_relaunch_skips(tmp_path):
    args = ["-m", *TINY, f"results_dir={tmp_path}/r", "study=g", "lora.r=2,4", "lora.targets=[q_proj],[qkv]"]
    p = lorasweep(*args, cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    recs = records(tmp_path / "r" / "g")
    done = {k: v for k, v in recs.items() if v["status"] == "completed"}
    bad = {k: v for k, v in recs.items() if v["status"] == "failed"}
    assert len(done) == 2 and len(bad) == 2
    assert all("unknown module(s) qkv" in r["error"] for r in bad.values())
    for k in range(1, 5):
        assert f"run {k} of 4" in p.stdout
    assert "sweep: 2 completed, 2 failed, 0 skipped (4 runs)" in p.stdout
    assert sum("FAILED" in l and "qkv" in l for l in p.stdout.splitlines()) == 2
    mtimes = {k: (tmp_path / "r" / "g" / k / "record.json").stat().st_mtime_ns for k in done}

    p = lorasweep(*args, cwd=tmp_path)
    assert p.returncode == 1
    assert "sweep: 0 completed, 2 failed, 2 skipped (4 runs)" in p.stdout
    for k in done:
        assert f"skip {k}: already completed" in p.stdout
        assert (tmp_path / "r" / "g" / k / "record.json").stat().st_mtime_ns == mtimes[k]


@pytest.mark.slow
def test_sweep_killed_in_second_run_resumes_it_and_leaves_the_first_untouched(tmp_path):
    study = tmp_path / "r" / "k"
    args = ["-m", *TINY, f"results_dir={tmp_path}/r", "study=k", "train.log_every=1", "lora.r=2,4,8",
            "train.max_steps=20", "train.checkpoint_every=2"]
    # The second run holds after its step 5 until killed: the kill lands inside it on any machine.
    marker = tmp_path / "held"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           "LORASWEEP_TEST_HOLD": f"2:5:{marker}"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "held_cli.py"), *args], cwd=tmp_path,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None, "the sweep ended before its second run was held"
            assert time.time() < deadline, "the second run never reached step 3"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep, as a node loss would
        proc.wait()
    first = [k for k, v in records(study).items() if v["status"] == "completed"]
    assert len(first) == 1
    first = first[0]
    killed = [k for k, v in records(study).items() if v["status"] == "running"]
    assert len(killed) == 1
    rec1 = study / first / "record.json"
    before = (rec1.read_bytes(), rec1.stat().st_mtime_ns,
              sorted((p.name, p.stat().st_mtime_ns) for p in (study / first).rglob("*")))

    p = lorasweep(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = records(study)
    assert len(recs) == 3 and all(r["status"] == "completed" for r in recs.values())
    assert f"skip {first}: already completed" in p.stdout
    assert "sweep: 2 completed, 0 failed, 1 skipped (3 runs)" in p.stdout
    after = (rec1.read_bytes(), rec1.stat().st_mtime_ns,
             sorted((p.name, p.stat().st_mtime_ns) for p in (study / first).rglob("*")))
    assert after == before
    # the killed run resumed from its step-4 checkpoint (not restarted): one clean step log
    assert recs[killed[0]]["resumed_from_step"] == 4
    steps = (study / killed[0] / "steps.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in steps] == list(range(1, 21))
    assert all("resumed_from_step" not in r for k, r in recs.items() if k != killed[0])


@pytest.mark.slow
def test_peak_memory_is_each_runs_own_in_one_process(tmp_path):
    # One basic-launcher sweep (one process): a wide model first, then the default tiny one.
    p = lorasweep("-m", *TINY, f"results_dir={tmp_path}/r", "study=m", "model.tiny_hidden=1024,64",
                  "train.batch_size=16", "data.n_train=64", "launcher=local", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = sorted(records(tmp_path / "r" / "m").values(), key=lambda r: r["started_at"])
    by_hidden = {r["config"]["model"]["tiny_hidden"]: r["metrics"]["mem/peak_rss_gb"] for r in recs}
    assert len(by_hidden) == 2
    assert by_hidden[64] < by_hidden[1024] - 0.15, by_hidden  # measured 0.525 vs 0.937 GB


@pytest.mark.slow
def test_parallel_launcher_runs_each_job_in_its_own_process_with_a_share_of_the_cores(tmp_path):
    p = lorasweep("-m", *TINY, f"results_dir={tmp_path}/r", "study=p", "launcher=parallel",
                  "hydra.sweeper.max_batch_size=2", "lora.r=2,4", "hydra.sweep.dir=" + str(tmp_path / "sw"),
                  cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = list(records(tmp_path / "r" / "p").values())
    assert len(recs) == 2 and all(r["status"] == "completed" for r in recs)
    cores = len(os.sched_getaffinity(0))
    assert all(r["config"]["train"]["num_threads"] == max(1, cores // 2) for r in recs)
    assert all(r["env"]["torch_threads"] == max(1, cores // 2) for r in recs)
    jobs = [d for d in (tmp_path / "sw" / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2  # submitit local job ids are the pids of two fresh processes
    logs = "".join(f.read_text() for f in (tmp_path / "sw" / ".submitit").rglob("*_log.out"))
    assert "run 1 of 2" in logs and "run 2 of 2" in logs
    assert "sweep: 2 completed, 0 failed, 0 skipped (2 runs)" in p.stdout


def test_a_signal_during_the_final_validation_starts_no_further_run(tmp_path):
    """SIGTERM after run 1's last step (its training loop done, validation next): run 1 completes,
    run 2 never starts, the command exits 128 + SIGTERM."""
    study = tmp_path / "r" / "k"
    marker = tmp_path / "held"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           "LORASWEEP_TEST_HOLD": f"1:2:{marker}"}  # TINY trains 2 steps: held after the last one
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "held_cli.py"), "-m", *TINY,
                             f"results_dir={tmp_path}/r", "study=k", "train.log_every=1", "lora.r=2,4"],
                            cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "run 1 never reached its last step"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out
    recs = records(study)
    assert [r["status"] for r in recs.values()] == ["completed"], recs
    assert "SIGTERM arrived after run" in out and "starting no further run" in out


def test_the_sweep_summary_says_why_each_run_was_skipped(tmp_path):
    args = ["-m", *TINY, f"results_dir={tmp_path}/r", "study=b", "lora.r=2,4", "eval=none"]
    assert lorasweep(*args, "planner.budget_gb=100", cwd=tmp_path).returncode == 0  # both train
    p = lorasweep(*args, "lora.alpha=8", "planner.budget_gb=0.0001", cwd=tmp_path)  # two new runs, over budget
    assert p.returncode == 0, p.stdout + p.stderr
    over = [l for l in p.stdout.splitlines() if l.startswith("  skipped ")]
    assert len(over) == 2 and all("planner.budget_gb" in l for l in over), p.stdout
    assert "already completed" not in p.stdout
    p = lorasweep(*args, cwd=tmp_path)
    assert "skipped (already completed; rerun=true to redo): " in p.stdout and "planner.budget_gb" not in p.stdout


def test_a_command_line_value_that_replaces_a_studys_axis_is_announced(tmp_path):
    """The README's old QLoRA command: precision=bf16_true replaced qlora_vs_lora's precision axis."""
    p = lorasweep("sweep=qlora_vs_lora", "precision=bf16_true", "model=tiny_llama", "--cfg", "job", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "precision=bf16_true replaces the study's precision sweep fp32,nf4,nf4_dq,fp4" in p.stderr, p.stderr
    kept = lorasweep("sweep=qlora_vs_lora", "precision=bf16_true,nf4", "model=tiny_llama", "--cfg", "job", cwd=tmp_path)
    assert "replaces the study's" not in kept.stderr
