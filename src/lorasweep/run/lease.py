"""A run folder's lease: one launch trains a run, however many launches of its sweep there are.

A double submit, a SLURM requeue while the old job still runs, or array tasks sharing a study
would otherwise train one run twice, each overwriting the other's files. The run being trained
holds ``<run folder>/lease.json`` (host, pid, token, start, heartbeat), its mtime refreshed every
``timeout / 6`` seconds by a daemon thread (a touch, never a rewrite: no beat can replace a newer
owner's lease). Another launch that finds a fresh lease skips the run
("running elsewhere"); one that finds a stale lease (no heartbeat for ``timeout`` seconds, or the
owner's pid gone on this same host) takes the run over.

Why a file and not ``fcntl``/``flock``: those locks are unreliable on the NFS and Lustre mounts
clusters keep results on. The lease is created with O_EXCL (atomic on local disks and NFSv3+),
refreshed by write-to-temporary + rename, and a stale one is moved aside by rename (only one taker
wins) before a new one is created.

``LORASWEEP_LEASE_TIMEOUT_S`` (default 120) sets the staleness timeout. To force a takeover of a
run whose owner is known to be dead, delete its ``lease.json``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("lorasweep")

LEASE = "lease.json"
DEFAULT_TIMEOUT_S = 120.0


def timeout_s() -> float:
    return float(os.environ.get("LORASWEEP_LEASE_TIMEOUT_S", DEFAULT_TIMEOUT_S))


class HeldElsewhere(RuntimeError):
    """Another live launch holds this run's lease."""

    def __init__(self, holder: dict):
        self.holder = holder
        if holder.get("unreadable"):
            age = time.time() - float(holder.get("heartbeat", 0))
            super().__init__(f"running elsewhere? its lease.json is unreadable, written {age:.0f} s ago "
                             f"(stale after LORASWEEP_LEASE_TIMEOUT_S={timeout_s():.0f} s)")
        else:
            super().__init__(f"running elsewhere ({holder.get('host')}, pid {holder.get('pid')})")


def _read(path: Path) -> dict | None:
    """The holder, with ``touched`` = the file's mtime (the heartbeat, see Lease._beat)."""
    try:
        holder = json.loads(path.read_text())
        if isinstance(holder, dict):
            holder["touched"] = path.stat().st_mtime
        return holder
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being replaced this instant, or torn: treat as a holder we cannot judge yet


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: dict, timeout: float, now: float | None = None) -> bool:
    """A holder is gone when its heartbeat is older than ``timeout``, or at once when it ran on
    this host and its pid no longer exists (a SIGKILLed launch on the same machine)."""
    now = time.time() if now is None else now
    if not holder:
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not pid_alive(holder["pid"]):
        return True
    return now - max(float(holder.get("heartbeat", 0)), float(holder.get("touched", 0))) > timeout


class Lease:
    def __init__(self, run_dir: Path, timeout: float | None = None):
        self.path = Path(run_dir) / LEASE
        self.timeout = timeout_s() if timeout is None else float(timeout)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.took_over: dict | None = None  # the stale holder this lease replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    def _body(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": self.started, "heartbeat": time.time(), "timeout_s": self.timeout}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._body(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "Lease":
        """Take the lease or raise HeldElsewhere. Starts the heartbeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="lorasweep-lease", daemon=True)
                self._thread.start()
                return self
            holder = _read(self.path)
            if holder is None:
                continue  # released between our two calls: try again
            if not holder:
                holder = self._unreadable_holder()
                if holder is None:
                    continue
            if not is_stale(holder, self.timeout):
                raise HeldElsewhere(holder)
            # Move the stale lease aside; of several takers only one rename succeeds.
            grave = self.path.with_name(f".{LEASE}.stale-{self.token}")
            try:
                os.rename(self.path, grave)
            except FileNotFoundError:
                continue
            moved = _read(grave) or {}
            if moved.get("token") != holder.get("token"):
                # A fresh lease replaced the stale one between our read and our rename: put it back.
                try:
                    os.link(grave, self.path)
                except FileExistsError:
                    pass
                grave.unlink(missing_ok=True)
                raise HeldElsewhere(moved)
            grave.unlink(missing_ok=True)
            self.took_over = holder
            log.warning("taking over %s from %s (pid %s): no heartbeat for %.0f s", self.path.parent.name,
                        holder.get("host"), holder.get("pid"),
                        time.time() - max(float(holder.get("heartbeat", 0)), float(holder.get("touched", 0))))
        raise HeldElsewhere(_read(self.path) or {})

    def _unreadable_holder(self) -> dict | None:
        """An empty or torn lease (its creator died between the exclusive create and the write, or
        the disk was full): judged by the file's age, stale once older than the timeout."""
        try:
            age_from = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"host": None, "pid": None, "heartbeat": age_from, "unreadable": True}

    @property
    def interval(self) -> float:
        return max(0.2, self.timeout / 6)

    @property
    def lost(self) -> bool:
        """True once another launch took the lease over (this process stalled past the timeout)."""
        return self._lost

    def held(self) -> bool:
        """Whether the lease file is still this launch's, read now (before a write to the run folder);
        once it is not, it never is again."""
        if self._lost:
            return False
        holder = _read(self.path)
        if holder == {}:
            return True  # being replaced this instant by our own heartbeat: judge at the next write
        if holder is None or holder.get("token") != self.token:
            self._lost = True
            log.error("lost the lease of %s to %s", self.path.parent.name, (holder or {}).get("host"))
        return not self._lost

    def _beat(self) -> None:
        """The heartbeat is the lease file's mtime (is_stale reads the later of it and the written
        one): touching never rewrites the file, so a beat cannot replace a newer owner's lease."""
        while not self._stop.wait(self.interval):
            if not self.held():
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                continue  # released or moved aside this instant: the next beat reads who holds it
            except OSError as e:  # a full or flaky disk: the next beat tries again
                log.warning("lease heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = _read(self.path)
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
