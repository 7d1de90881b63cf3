"""Long runs survive: a killed or preempted run resumes from its checkpoint as if never stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from lorasweep import job
from lorasweep.run.checkpoint import Checkpointer

# dropout on, AdamW with warmup + cosine, accumulation: every state a resume must carry matters
ARGS = ["model=tiny_llama", "logger=none", "eval=none", "lora.dropout=0.1", "optimizer=adamw_cosine",
        "optimizer.warmup_steps=5", "optimizer.lr=5e-3", "train.grad_accum=2", "train.batch_size=4",
        "train.max_seq_len=80", "data.n_train=64", "data.n_val=8", "data.n_test=8", "train.max_steps=60",
        "train.log_every=1", "train.checkpoint_every=10", "train.num_threads=1"]
HELD = Path(__file__).parent / "held_cli.py"


def _losses(run_dir: Path) -> dict[int, float]:
    return {(d := json.loads(l))["step"]: d["train/loss"] for l in (run_dir / "steps.jsonl").read_text().splitlines()}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    root = tmp_path_factory.mktemp("ref")
    out = job.run(compose(*ARGS, f"results_dir={root}", "study=ref"), show_progress=False)
    assert out.status == "completed", out.error
    run_dir = Path(out.run_dir)
    assert not (run_dir / "checkpoints").exists()  # a completed run keeps no checkpoints
    return _losses(run_dir), _adapter(run_dir)


def _launch(tmp_path, *extra, hold=None, **popen):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lorasweep.cli"]
    if hold:
        env["LORASWEEP_TEST_HOLD"] = hold
        cmd = [sys.executable, str(HELD)]
    cmd += [*ARGS, f"results_dir={tmp_path}/r", "study=k", *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, **popen)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def _hold_at(tmp_path, step: int) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "held"
    proc = _launch(tmp_path, hold=f"1:{step}:{marker}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the run never reached its hold step"
        time.sleep(0.1)
    return proc, Path(marker.read_text())


def _assert_same_as(reference, run_dir: Path, from_step: int):
    ref_losses, ref_adapter = reference
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "completed" and rec["resumed_from_step"] == from_step
    assert rec["metrics"]["train/resumed_from_step"] == from_step
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 61))  # one line per step: nothing lost, nothing twice
    for step in range(from_step + 1, 61):
        # to 1e-6 relative: fp32 sums may round differently once states are reloaded (~1 ulp of a loss of 4)
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-6), step
    adapter = _adapter(run_dir)
    for k, v in ref_adapter.items():
        torch.testing.assert_close(adapter[k], v, atol=1e-6, rtol=0)
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_sigkill_after_step_35_resumes_from_30_exactly(tmp_path, reference):
    proc, run_dir = _hold_at(tmp_path, 35)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    p = _launch(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resume" in p.stdout + p.stderr
    _assert_same_as(reference, run_dir, 30)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_it_arrived_in_and_redoes_nothing(tmp_path, reference):
    proc, run_dir = _hold_at(tmp_path, 35)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "interrupted" and "SIGTERM after step 35" in rec["error"]
    assert (run_dir / "checkpoints" / "step-00000035").is_dir()
    p = _launch(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    _assert_same_as(reference, run_dir, 35)


@pytest.mark.slow
def test_a_torn_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, reference):
    proc, run_dir = _hold_at(tmp_path, 35)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = run_dir / "checkpoints" / "step-00000030" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut in half
    p = _launch(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step-00000030 is torn or unreadable" in p.stdout + p.stderr
    _assert_same_as(reference, run_dir, 20)


@pytest.mark.slow
def test_a_torn_last_step_line_is_dropped_and_the_run_resumes(tmp_path, reference):
    """A node lost mid-write leaves half a line at the end of steps.jsonl."""
    proc, run_dir = _hold_at(tmp_path, 35)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(run_dir / "steps.jsonl", "a") as f:
        f.write('{"step": 36, "train/lo')
    p = _launch(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "is torn" in p.stdout + p.stderr
    _assert_same_as(reference, run_dir, 30)


def test_rerun_starts_over_and_keep_checkpoints_is_honoured(tmp_path):
    cfg = compose(*ARGS, "train.max_steps=7", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                  f"results_dir={tmp_path}", "study=c")
    from lorasweep.run import checkpoint as ck

    seen = []
    save = ck.Checkpointer.save

    def spy(self, *a, **kw):
        folder = save(self, *a, **kw)
        seen.append(sorted(p.name for p in self.list()))
        return folder

    ck.Checkpointer.save = spy
    try:
        out = job.run(cfg, show_progress=False)
    finally:
        ck.Checkpointer.save = save
    assert out.status == "completed"
    assert seen[-1] == ["step-00000004", "step-00000006"] and len(seen) == 3
    assert "train/resumed_from_step" not in out.metrics


def test_checkpoint_settings_do_not_change_the_run_id():
    from lorasweep.config import run_id

    assert run_id(compose(*ARGS)) == run_id(compose(*ARGS, "train.checkpoint_every=0", "train.keep_checkpoints=5"))


def test_bad_checkpoint_settings_are_refused_naming_the_field():
    from lorasweep.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"train.checkpoint_every=-1: must be >= 0"):
        validate(compose(*ARGS, "train.checkpoint_every=-1"))
    with pytest.raises(ConfigError, match=r"train.keep_checkpoints=0: must be >= 1"):
        validate(compose(*ARGS, "train.keep_checkpoints=0"))
