"""One run config, end to end: skip it if done, take its lease, train it on this process or on
several (torchrun), and hand back its Outcome. The entry of every command and sweep job.

Layers, top down: cli / plan_cli -> study (sweeps, searches) -> job -> distributed -> run -> config.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig, run_id as make_run_id, validate
from .distributed import launch as distributed
from .run import preempt
from .run.lease import HeldElsewhere, Lease
from .run.pipeline import Outcome, run_dir_for, train_run
from .run.record import read_record

log = logging.getLogger("lorasweep")

__all__ = ["Outcome", "run", "run_dir_for"]


def run(cfg: RunConfig, *, show_progress: bool = True) -> Outcome:
    """Run one configuration. Bad static config raises ConfigError (no folder is made);
    anything later is recorded as a failed run and returned, never raised."""
    validate(cfg)
    rid = make_run_id(cfg)
    run_dir = run_dir_for(cfg)
    if distributed.wanted(cfg) and distributed.node_rank() > 0:  # another node of a multi-node run
        skipped = distributed.follow(cfg, rid, run_dir)
        return Outcome(rid, "follower", skipped, str(run_dir))
    done = _already_completed(cfg, rid, run_dir)
    if done is not None:
        distributed.announce(cfg, run_dir, go=False, reason=done.error or "already completed")
        return done
    lease = Lease(run_dir)  # one launch trains a run, however many launches of its sweep there are
    try:
        lease.acquire()
    except HeldElsewhere as e:
        log.info("skip %s: %s", rid, e)
        distributed.announce(cfg, run_dir, go=False, reason=str(e))
        return Outcome(rid, "elsewhere", str(e), str(run_dir))
    try:
        # Under the lease, look again: another launch may have finished the run since the check above.
        done = _already_completed(cfg, rid, run_dir)
        if done is not None:
            distributed.announce(cfg, run_dir, go=False, reason=done.error or "already completed")
            return done
        with preempt.StopOnSignal():  # SIGTERM/SIGUSR1/SIGUSR2/Ctrl-C: stop after the step, checkpointed
            if distributed.wanted(cfg):  # train.devices x train.nodes > 1: torchrun starts the ranks
                return distributed.launch(cfg, rid, run_dir, lease, show_progress)
            return train_run(cfg, rid, run_dir, lease, show_progress)
    finally:
        lease.release()


def _already_completed(cfg: RunConfig, rid: str, run_dir: Path) -> Outcome | None:
    prev = read_record(run_dir)
    if prev and prev.get("status") == "completed" and not cfg.rerun:
        log.info("skip %s: already completed (rerun=true to redo)", rid)
        return Outcome(rid, "skipped", None, str(run_dir), prev.get("metrics"))
    if prev and prev.get("status") == "pruned" and cfg.pruner.name != "none" and not cfg.rerun:
        # A pruner's verdict is final while pruning is on; pruner=none trains the run to its end.
        log.info("skip %s: pruned earlier (%s)", rid, prev.get("error"))
        return Outcome(rid, "pruned", prev.get("error"), str(run_dir), prev.get("metrics"))
    return None
