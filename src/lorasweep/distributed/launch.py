"""A run on several processes, seen from the Hydra job that launched it.

The job keeps what makes a run one run: its lease, its record and its folder. It checks the
config and the data (preflight), plans the per-rank memory, opens the record, then starts the
ranks with PyTorch's own launcher, torchrun (``lorasweep.distributed.torchrun``: rendezvous,
RANK/LOCAL_RANK/WORLD_SIZE, and when one rank fails it stops the others), running
``lorasweep.distributed.rank`` (rank.py), and waits. Rank 0 writes ``.dist/result.json``; the job turns it
into the record. A rank that fails writes ``.dist/error-rank<k>.json``; the earliest one is the
run's error (the other ranks then fail on a closed connection, or are stopped by torchrun).
The ranks' output goes to this process's stderr and to ``<run folder>/ranks.log``.

Stop signals (SLURM preemption, time limits, Ctrl-C) that reach this process are passed on to
the ranks, which agree on the step to stop after, checkpoint and end as 'interrupted'; torchrun
itself holds them (torchrun.py), so it neither kills the ranks early nor dies and leaves them.
A job stopped before its ranks recorded a result is 'interrupted' too (it resumes).

Several nodes (train.nodes > 1, SLURM): the submitit launcher starts one task per node; each
runs torchrun for its node (--node-rank = SLURM_NODEID, the master is the job's first node).
Only node 0 holds the lease and writes the record; the other nodes' tasks only run their ranks.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from ..config import RunConfig, to_dict, world_size
from .rank import DIST_DIR, RESULT

log = logging.getLogger("lorasweep")

POLL_S = 0.5
LOG = "ranks.log"


def is_rank() -> bool:
    """True inside a rank that torchrun started (never launch again from there)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def wanted(cfg: RunConfig) -> bool:
    return world_size(cfg.train) > 1 and not is_rank()


def node_rank() -> int:
    return int(os.environ.get("SLURM_NODEID", os.environ.get("LORASWEEP_NODE_RANK", 0)))


def _master_addr() -> str:
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    raise RuntimeError("train.nodes > 1 needs SLURM (SLURM_JOB_NODELIST) or MASTER_ADDR to find node 0")


def torchrun_command(cfg: RunConfig, spec_path: Path) -> list[str]:
    tr = cfg.train
    cmd = [sys.executable, "-m", "lorasweep.distributed.torchrun", "--nproc-per-node", str(tr.devices),
           "--max-restarts", "0", "--monitor-interval", "0.5"]
    if tr.nodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]  # a free local port; no other node to meet
    else:
        port = os.environ.get("MASTER_PORT") or str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 1000)
        cmd += ["--nnodes", str(tr.nodes), "--node-rank", str(node_rank()),
                "--master-addr", _master_addr(), "--master-port", port]
    return cmd + ["-m", "lorasweep.distributed.rank", str(spec_path)]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), without a process library."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _pass_signal(proc: subprocess.Popen, signum: int) -> None:
    """To the ranks themselves: torchrun would turn a SIGTERM into stopping them at once."""
    for pid in _children(proc.pid):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stop_now(proc: subprocess.Popen) -> None:
    """End the ranks and torchrun at once (torchrun holds the stop signals, torchrun.py)."""
    _pass_signal(proc, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _pump(stream, sink: Path) -> threading.Thread:
    def copy() -> None:
        with open(sink, "a", buffering=1, errors="replace") as f:
            for line in iter(stream.readline, ""):
                f.write(line)
                sys.stderr.write(line)
    t = threading.Thread(target=copy, name="lorasweep-ranks-log", daemon=True)
    t.start()
    return t


def run_ranks(cfg: RunConfig, spec: dict, run_dir: Path, lease=None) -> int:
    """Start torchrun for this node and wait for it; returns its exit code."""
    from ..run import preempt

    d = Path(run_dir) / DIST_DIR
    d.mkdir(parents=True, exist_ok=True)
    if node_rank() == 0:
        spec_path = d / "spec-node0.json"
    else:  # node-local: node 0 clears the run folder's leftovers when it starts, maybe after this node did
        import tempfile

        fd, name = tempfile.mkstemp(prefix=f"lorasweep-spec-node{node_rank()}-", suffix=".json")
        os.close(fd)
        spec_path = Path(name)
    spec_path.write_text(json.dumps(spec, default=str))
    cmd = torchrun_command(cfg, spec_path)
    log.info("%s: %d process(es) per node x %d node(s) (%s): %s", spec["run_id"], cfg.train.devices,
             cfg.train.nodes, cfg.train.strategy, " ".join(cmd[1:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pump = _pump(proc.stdout, Path(run_dir) / LOG)
    passed = None
    try:
        while proc.poll() is None:
            got = preempt.requested()
            if got is not None and passed is None:
                _pass_signal(proc, got)
                passed = got
            if lease is not None and lease.lost:
                log.error("lost the lease of %s: stopping its ranks", spec["run_id"])
                _stop_now(proc)
                break
            time.sleep(POLL_S)
        rc = proc.wait()
    except BaseException:  # a second Ctrl-C, or this job failing: no rank may outlive it
        _stop_now(proc)
        raise
    pump.join(timeout=10)
    if node_rank() > 0:
        spec_path.unlink(missing_ok=True)
    return rc


def root_cause(run_dir: Path, rc: int) -> str:
    """The run's error: the first rank that wrote one, else what torchrun reported."""
    errors = []
    for p in (Path(run_dir) / DIST_DIR).glob("error-rank*.json"):
        try:
            errors.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    text = (Path(run_dir) / LOG).read_text(errors="replace") if (Path(run_dir) / LOG).exists() else ""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+).*?traceback\s*:\s*([^\n]*)", text, re.S)
    # a rank killed from outside (SIGKILL: the OOM killer) writes no error; the others then fail
    # on the broken connection, and theirs would be blamed: torchrun's root cause names the first
    killed = m and int(m.group(2)) < 0 and not any(int(e.get("rank", -1)) == int(m.group(1)) for e in errors)
    if killed:
        sig = -int(m.group(2))
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        cause = (f"rank {m.group(1)} was killed by {name} (out of memory, or stopped from outside) with no "
                 f"error of its own")
        (Path(run_dir) / "error.log").write_text(cause + "\n" + "".join(
            f"then rank {e['rank']}: {e['error']}\n{e.get('traceback', '')}" for e in errors))
        return cause
    if errors:
        first = min(errors, key=lambda e: e.get("time", 0))
        (Path(run_dir) / "error.log").write_text(first.get("traceback", ""))
        return f"rank {first['rank']}: {first['error']}"
    if m:
        return f"rank {m.group(1)} exited with code {m.group(2)}: {m.group(3).strip()}"
    return f"torchrun exited with code {rc} (see {Path(run_dir) / LOG})"


def _latest_checkpoint_step(checkpoints) -> int | None:
    """The newest whole checkpoint's step, from its manifest (the ranks load the tensors)."""
    from ..run.checkpoint import MANIFEST

    for folder in reversed(checkpoints.list()):
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if all((folder / n).stat().st_size == s for n, s in manifest["sizes"].items()):
                return int(manifest["step"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def per_rank(cfg: RunConfig) -> RunConfig:
    """What one rank computes: the run at its per-rank micro-batch (the planner's input; it keeps
    devices, nodes and strategy, which decide what each rank holds)."""
    import dataclasses

    tr = cfg.train
    return dataclasses.replace(cfg, train=dataclasses.replace(tr, batch_size=max(1, tr.batch_size // world_size(tr))))


def rank_config(cfg: RunConfig) -> dict:
    """The config the ranks get. Under SLURM the job set train.num_threads to the task's CPUs
    (sweep.job_start); one task holds all of a node's ranks, so they share those CPUs."""
    d = to_dict(cfg)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cfg.train.num_threads == int(cpus):
        d["train"]["num_threads"] = max(1, int(cpus) // cfg.train.devices)
    return d


# Multi-node: node 0 alone decides whether a run trains (completed, running elsewhere, over budget,
# refused at preflight). It writes its decision to <run folder>/.nodes/<launch>.json; the other
# nodes wait for it before starting torchrun, so a run node 0 skips leaves no node waiting on a
# rendezvous. <launch> is the SLURM job and its restart count (else MASTER_PORT, or
# LORASWEEP_LAUNCH_ID): one key per launch, the same on every node.
NODES_DIR = ".nodes"


def _decision_path(run_dir: Path) -> Path:
    key = os.environ.get("LORASWEEP_LAUNCH_ID") or (
        f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if "SLURM_JOB_ID" in os.environ else f"port-{os.environ.get('MASTER_PORT', 'none')}")
    return Path(run_dir) / NODES_DIR / f"{key}.json"


def announce(cfg: RunConfig, run_dir: Path, go: bool, reason: str | None = None) -> None:
    """Node 0 of a multi-node run: tell the other nodes whether to start their ranks."""
    if cfg.train.nodes <= 1 or node_rank() != 0:
        return
    from ..run.record import write_json_atomic

    path = _decision_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"go": go, "reason": reason, "time": time.time()})


def _await_node0(run_dir: Path, rid: str) -> dict:
    from .shard import init_timeout

    path, deadline = _decision_path(run_dir), time.time() + init_timeout().total_seconds()
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"node {node_rank()} of {rid}: node 0 said nothing about this launch in "
                               f"{init_timeout().total_seconds():.0f} s ({path}; LORASWEEP_DIST_TIMEOUT_S)")
        time.sleep(POLL_S)


def follow(cfg: RunConfig, rid: str, run_dir: Path) -> str | None:
    """Node k > 0 of a multi-node run: run this node's ranks; node 0 keeps the record. Returns why
    node 0 skipped the run, or None when it trained."""
    decision = _await_node0(run_dir, rid)
    if not decision.get("go"):
        log.info("skip %s: node 0 skipped it (%s)", rid, decision.get("reason"))
        return decision.get("reason") or "skipped by node 0"
    spec = {"config": rank_config(cfg), "run_dir": str(Path(run_dir).resolve()), "run_id": rid,
            "device": _device_type(cfg), "resume": not cfg.rerun, "show_progress": False}
    rc = run_ranks(cfg, spec, run_dir)
    if rc != 0:
        raise RuntimeError(f"node {node_rank()} of {rid}: torchrun exited with code {rc}")
    return None


def _device_type(cfg: RunConfig) -> str:
    from ..run import model as model_stage

    return model_stage.pick_device(cfg.train.device).type


def launch(cfg: RunConfig, rid: str, run_dir: Path, lease, show_progress: bool):
    """The run, on world_size(cfg.train) processes; recorded like a one-process run."""
    from omegaconf import OmegaConf

    from ..run import preempt
    from ..run.checkpoint import Checkpointer
    from ..run.pipeline import OverBudget, Outcome, PreflightError, plan_run, preflight
    from ..run.record import RunRecord

    config = to_dict(cfg)
    record = RunRecord(run_dir, rid, cfg.study, config)
    checkpoints = Checkpointer(run_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    from_step = None if cfg.rerun else _latest_checkpoint_step(checkpoints)
    if from_step is not None:
        log.info("resume %s from its checkpoint at step %d", rid, from_step)
        record.resume(from_step)
    else:
        import uuid

        record.data["wandb_id"] = f"{rid[-8:]}-{uuid.uuid4().hex[:8]}"
        record.start(OmegaConf.to_yaml(OmegaConf.create(config)))
    record._steps.close()  # rank 0 appends the step lines
    record._steps = None
    world = world_size(cfg.train)
    record.data["env"].update({"world_size": world, "devices_per_node": cfg.train.devices, "nodes": cfg.train.nodes,
                               "strategy": cfg.train.strategy, "launcher": "torchrun"})
    metrics: dict = {"dist/world_size": world}
    extra: dict = {}  # record fields beside the metrics (a pruned run's verdict)
    status, error = "failed", None
    announced = False
    t_start = time.perf_counter()
    try:
        device = _device_type(cfg)
        record.data["env"]["device"] = device
        record.data["env"]["backend"] = "nccl" if device == "cuda" else "gloo"
        include_path = preflight(cfg, run_dir)
        import torch

        planned = plan_run(per_rank(cfg), torch.device(device))  # each rank: the run at its share of the batch
        if planned:
            metrics.update(planned.metrics())
            metrics["plan/per_rank_batch"] = cfg.train.batch_size // world
            if cfg.planner.budget_gb is not None and planned.device_gb > cfg.planner.budget_gb:
                raise OverBudget(f"predicted peak per rank {planned.device_gb:.2f} GB > planner.budget_gb="
                                 f"{cfg.planner.budget_gb}")
        d = Path(run_dir) / DIST_DIR
        shutil.rmtree(d, ignore_errors=True)  # a previous attempt's result or errors are not this one's
        spec = {"config": rank_config(cfg), "run_dir": str(Path(run_dir).resolve()), "run_id": rid, "device": device,
                "resume": from_step is not None, "include_path": include_path,
                "wandb_id": record.data.get("wandb_id"), "show_progress": show_progress}
        announce(cfg, run_dir, go=True)
        announced = True
        rc = run_ranks(cfg, spec, run_dir, lease)
        result_path = d / RESULT
        stopped = preempt.requested()
        if result_path.exists() and (rc == 0 or stopped is not None):
            # Rank 0's word: on a stop signal torchrun may end non-zero after the ranks checkpointed.
            result = json.loads(result_path.read_text())
            status, error = result["status"], result.get("error")
            metrics.update(result["metrics"])
            if result.get("pruned"):
                extra["pruned"] = result["pruned"]  # the rule and numbers that stopped it, as in one process
            if status == "interrupted":
                log.warning("run %s %s", rid, error)
        elif stopped is not None:  # stopped before the ranks could say (loading, or mid-checkpoint)
            status = "interrupted"
            error = (f"interrupted by {signal.Signals(stopped).name} before the ranks recorded a result; "
                     f"relaunch the same command to resume from the last checkpoint")
            log.warning("run %s %s", rid, error)
        else:
            error = root_cause(run_dir, rc)
            log.error("run %s failed: %s", rid, error)
    except OverBudget as e:
        status, error = "skipped", str(e)
        log.info("skip %s: %s", rid, error)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, never raised into the sweep
        error = f"{type(e).__name__}: {e}" if not isinstance(e, PreflightError) else str(e)
        (Path(run_dir) / "error.log").write_text(traceback.format_exc())
        log.error("run %s failed: %s", rid, error)
    finally:
        # Skipped or refused before the ranks, or over: a node that starts late must not wait for them.
        announce(cfg, run_dir, go=False, reason=(f"this launch's run ended {status}" if announced
                                                 else error or status))
        metrics["time/total_s"] = time.perf_counter() - t_start
        if not lease.lost:
            record.finish(status, metrics, error, **extra)
    return Outcome(rid, status, error, str(run_dir), metrics)
