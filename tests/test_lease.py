"""Each run is trained once: a lease in its folder, however many launches share the sweep."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorasweep.run.lease import LEASE, HeldElsewhere, Lease, is_stale


def _write(path: Path, **holder):
    """Another host's lease; its last heartbeat (the file's mtime) at ``heartbeat``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"host": "node-b", "pid": 4242, "token": "t", "heartbeat": time.time(), **holder}
    path.write_text(json.dumps(body))
    os.utime(path, (body["heartbeat"],) * 2)


def test_a_held_lease_is_refused_and_released_only_by_its_owner(tmp_path):
    a = Lease(tmp_path / "run", timeout=60).acquire()
    with pytest.raises(HeldElsewhere, match=rf"running elsewhere \({socket.gethostname()}, pid {os.getpid()}\)"):
        Lease(tmp_path / "run", timeout=60).acquire()
    a.release()
    assert not (tmp_path / "run" / LEASE).exists()
    with Lease(tmp_path / "run", timeout=60):
        assert (tmp_path / "run" / LEASE).exists()


def test_a_lease_from_another_host_is_taken_over_only_after_the_timeout(tmp_path):
    path = tmp_path / "run" / LEASE
    _write(path, heartbeat=time.time() - 5)
    with pytest.raises(HeldElsewhere, match="node-b, pid 4242"):
        Lease(tmp_path / "run", timeout=30).acquire()
    lease = Lease(tmp_path / "run", timeout=3).acquire()  # 5 s without a heartbeat > 3 s
    try:
        assert lease.took_over["host"] == "node-b"
        assert json.loads(path.read_text())["token"] == lease.token
    finally:
        lease.release()


def test_a_dead_pid_on_this_host_is_stale_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert is_stale({"host": host, "pid": dead.pid, "heartbeat": time.time()}, timeout=600)
    assert not is_stale({"host": host, "pid": os.getpid(), "heartbeat": time.time()}, timeout=600)
    assert is_stale({"host": "elsewhere", "pid": 1, "heartbeat": 100.0}, timeout=600, now=1000.0)
    assert not is_stale({"host": "elsewhere", "pid": 1, "heartbeat": 900.0}, timeout=600, now=1000.0)


def test_the_heartbeat_moves_and_a_taken_lease_is_noticed(tmp_path):
    lease = Lease(tmp_path / "run", timeout=1.2).acquire()  # a beat every 0.2 s
    path = tmp_path / "run" / LEASE
    body = path.read_text()
    first = path.stat().st_mtime_ns
    deadline = time.time() + 30
    while path.stat().st_mtime_ns == first:  # the beat touches the file ...
        assert time.time() < deadline
        time.sleep(0.05)
    assert path.read_text() == body  # ... and never rewrites it
    _write(path, token="someone-else")  # as a launch that found this one stale would
    newer = path.read_text()
    while not lease.lost:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # beats that would have come
    lease.release()
    assert path.read_text() == newer  # the newer owner's lease, untouched in content, not ours to remove


# ------------------------------------------------------------------ two launches, end to end

TINY = ["model=tiny_llama", "logger=none", "train.batch_size=4", "train.max_seq_len=80", "data.n_train=32",
        "data.n_val=8", "data.n_test=8", "train.save_adapter=false", "train.num_threads=1", "train.log_every=1"]


def _cmd(*args, hold=None, **env):
    e = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **env}
    if hold:
        e["LORASWEEP_TEST_HOLD"] = hold
        return [sys.executable, str(Path(__file__).parent / "held_cli.py"), *args], e
    return [sys.executable, "-m", "lorasweep.cli", *args], e


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_concurrent_launches_of_a_grid_train_each_run_once(tmp_path):
    args = ["-m", *TINY, "train.max_steps=12", f"results_dir={tmp_path}/r", "study=g", "lora.r=2,4",
            "seed=0,1"]
    procs = []
    for k in range(2):
        cmd, env = _cmd(*args, f"hydra.sweep.dir={tmp_path}/sweep{k}")
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    recs = {d.name: json.loads((d / "record.json").read_text()) for d in (tmp_path / "r" / "g").iterdir()
            if d.is_dir()}
    assert len(recs) == 4 and all(r["status"] == "completed" for r in recs.values())
    trained = [int(l.split()[1]) for o in outs for l in o.splitlines() if l.startswith("sweep: ")]
    assert sum(trained) == 4, outs  # four trainings in all, whoever did them
    for d in (tmp_path / "r" / "g").iterdir():
        if d.is_dir():
            assert _steps(d) == list(range(1, 13))
            assert not (d / LEASE).exists()


@pytest.mark.slow
def test_a_dead_owners_run_is_taken_over_once_its_lease_is_stale(tmp_path):
    study = tmp_path / "r" / "k"
    args = [*TINY, "train.max_steps=8", f"results_dir={tmp_path}/r", "study=k"]
    marker = tmp_path / "held"
    cmd, env = _cmd(*args, hold=f"1:3:{marker}")
    owner = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert owner.poll() is None and time.time() < deadline, "the owner never reached step 3"
            time.sleep(0.2)
        run_dir = Path(marker.read_text())
        # While the owner lives, another launch leaves the run alone.
        cmd, env = _cmd(*args)
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and "running elsewhere" in p.stdout + p.stderr, p.stdout + p.stderr
        assert _steps(run_dir) == [1, 2, 3]
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the owner's node is lost
        owner.wait()
    # Seen from another node, the dead owner's lease is alive while its heartbeat is recent ...
    holder = {**json.loads((run_dir / LEASE).read_text()), "host": "node-b", "heartbeat": time.time()}
    (run_dir / LEASE).write_text(json.dumps(holder))
    cmd, env = _cmd(*args, LORASWEEP_LEASE_TIMEOUT_S="600")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "running elsewhere (node-b" in p.stdout + p.stderr, p.stdout + p.stderr
    assert _steps(run_dir) == [1, 2, 3]
    # ... and stale once it is older than the timeout: the next launch takes the run over.
    cmd, env = _cmd(*args, LORASWEEP_LEASE_TIMEOUT_S="3")
    while time.time() - holder["heartbeat"] <= 3:
        time.sleep(0.2)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "taking over" in p.stdout + p.stderr
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "completed" and _steps(run_dir) == list(range(1, 9))
    assert not (run_dir / LEASE).exists()


@pytest.mark.parametrize("age_s, trains", [(0, False), (30, True)])
def test_an_empty_lease_blocks_its_run_only_until_the_timeout(tiny, monkeypatch, age_s, trains):
    """Its creator died between the exclusive create and the write (or the disk was full)."""
    from lorasweep.job import run, run_dir_for

    monkeypatch.setenv("LORASWEEP_LEASE_TIMEOUT_S", "10")
    cfg = tiny("train.max_steps=2", "eval=none")
    lease = run_dir_for(cfg) / LEASE
    lease.parent.mkdir(parents=True)
    lease.write_text("")
    os.utime(lease, (time.time() - age_s,) * 2)
    out = run(cfg, show_progress=False)
    if trains:
        assert out.status == "completed" and not lease.exists()
    else:
        assert out.status == "elsewhere" and "lease.json is unreadable" in out.error and lease.exists()


@pytest.mark.slow
def test_a_launch_that_lost_its_lease_writes_nothing_more(tmp_path):
    """Held after step 3 (checkpoints and a validation point every step), the run's lease is taken over
    by another launch; let go, this launch writes no step line, checkpoint, curve point, error.log or
    record, and leaves the new owner's lease as it found it."""
    marker = tmp_path / "held"
    cmd, env = _cmd(*TINY, "train.max_steps=8", "train.checkpoint_every=1", "train.eval_every=1",
                    "train.eval_examples=4", f"results_dir={tmp_path}/r", "study=k", hold=f"1:3:{marker}")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the run never reached step 3"
            time.sleep(0.1)
        run_dir = Path(marker.read_text())
        _write(run_dir / LEASE, token="the-new-owner", pid=1)  # another host took it over
        newer = (run_dir / LEASE).read_text()
        before = {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.stat().st_size)
                  for p in run_dir.rglob("*") if p.name != LEASE}
        os.killpg(proc.pid, signal.SIGTERM)  # lets the held step go on
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    after = {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.stat().st_size)
             for p in run_dir.rglob("*") if p.name != LEASE}
    assert after == before
    assert (run_dir / LEASE).read_text() == newer
    assert json.loads((run_dir / "record.json").read_text())["status"] == "running"  # the new owner's to write
