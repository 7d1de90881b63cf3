"""torchrun, with the stop signals left to lorasweep's launcher: ``python -m lorasweep.distributed.torchrun ARGS``.

A stop signal (Ctrl-C, SLURM's SIGTERM at a time limit, submitit's SIGUSR2 before preemption) must
reach the ranks as a request to checkpoint and stop after the current step. torchrun would not let
it: on SIGINT/SIGTERM its agent signals the ranks and SIGKILLs them 30 s later (too soon for a large
checkpoint) and exits 1; SIGUSR1/SIGUSR2 kill torchrun at once, leaving its ranks (each in its own
session) to train on with no one to hear them. So here torchrun hears none of them: the launcher
(distributed/launch.py) passes the signal to the ranks and waits for their checkpoint.

The ranks are not left behind either: torchrun dies with its launcher (PR_SET_PDEATHSIG), and each
rank with its torchrun (rank.py).
"""
from __future__ import annotations

import os
import signal
import sys

HELD = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took hold
        os._exit(1)


def main() -> None:
    die_with_parent()
    for name in HELD:
        # A handler, not SIG_IGN: a caught signal is reset to its default in the ranks torchrun
        # execs, an ignored one would stay ignored there.
        signal.signal(getattr(signal, name), lambda *_: None)
    # torchrun installs its own handlers for these names only: none of the held ones.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
