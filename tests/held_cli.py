"""The `lorasweep` command, with one run held at a known step until the test kills it.

LORASWEEP_TEST_HOLD="<k>:<step>:<marker file>": the k-th run this process starts stops after
logging <step>, writes the marker and sleeps (until a stop signal, which the run then handles). A test waits for the marker, not for a moment in
time, so the kill lands where it means to whatever the machine's speed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lorasweep.run import preempt, record
from lorasweep.cli import main

_k, _step, _marker = os.environ["LORASWEEP_TEST_HOLD"].split(":", 2)
_started: list[Path] = []
_start, _log_step = record.RunRecord.start, record.RunRecord.log_step


def start(self, *a, **kw):
    _started.append(self.dir)
    return _start(self, *a, **kw)


def log_step(self, step, metrics):
    _log_step(self, step, metrics)
    if len(_started) == int(_k) and step == int(_step):
        Path(_marker).write_text(str(self.dir))
        while preempt.requested() is None:  # until killed, or a stop signal lets the run go on to stop
            time.sleep(0.05)


record.RunRecord.start, record.RunRecord.log_step = start, log_step

if __name__ == "__main__":
    main()
