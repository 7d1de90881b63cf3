"""Sweep bookkeeping: each job notes its outcome in the sweep folder; at the end a summary
is printed and the command exits non-zero if any run failed."""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lorasweep")
OUTCOMES = "outcomes.jsonl"


def _sweep_dir(config: DictConfig | None = None) -> Path:
    if config is not None:
        return Path(config.hydra.sweep.dir)
    return Path(HydraConfig.get().sweep.dir)


def note_outcome(outcome) -> None:
    """Append one line per run; O_APPEND keeps lines whole when jobs finish at once."""
    d = _sweep_dir()
    d.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: v for k, v in asdict(outcome).items()}, default=str) + "\n"
    fd = os.open(d / OUTCOMES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_outcomes(sweep_dir: Path) -> list[dict]:
    p = Path(sweep_dir) / OUTCOMES
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        p = _sweep_dir(config) / OUTCOMES
        if p.exists():
            p.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .summary import print_sweep

        outcomes = read_outcomes(_sweep_dir(config))
        failed = print_sweep(outcomes, results_dir=Path(config.results_dir) / config.study)
        if failed:
            sys.stdout.flush()
            # Hydra would swallow an exception here; the sweep's exit code must say a run failed.
            os._exit(1)
