"""Metric loggers: one protocol (log / summary / close), a W&B one and none.

steps.jsonl is written by the record (always); W&B is the optional mirror.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from ..config import LoggerConfig

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...
    def summary(self, metrics: dict) -> None: ...
    def close(self, exit_code: int) -> None: ...


class NullLogger:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def close(self, exit_code: int) -> None:
        pass


class WandbLogger:
    """One W&B run per lorasweep run, living in <run folder>/wandb/, grouped by study."""

    def __init__(self, lc: LoggerConfig, *, run_dir: Path, run_id: str, study: str, config: dict,
                 wandb_id: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        settings = wandb.Settings(init_timeout=lc.init_timeout, console="off", x_disable_stats=False)
        self._wandb = wandb
        self.run = wandb.init(project=lc.project, entity=lc.entity, mode=lc.mode, dir=str(run_dir),
                              name=run_id, id=wandb_id, resume="allow" if wandb_id else None,
                              group=study, job_type="train", config=config,
                              settings=settings, reinit="create_new")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def make_logger(lc: LoggerConfig, *, run_dir: Path, run_id: str, study: str, config: dict,
                wandb_id: str | None = None) -> MetricLogger:
    """``wandb_id``: a resumed run continues its W&B run (resume="allow"), so its curve is one line."""
    if lc.backend == "none":
        return NullLogger()
    return WandbLogger(lc, run_dir=run_dir, run_id=run_id, study=study, config=config, wandb_id=wandb_id)
