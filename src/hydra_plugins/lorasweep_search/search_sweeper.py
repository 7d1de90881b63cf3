"""The Hydra sweeper of a search: check it, create its Optuna study, start its workers.

Chosen in a study file with ``defaults: [override /hydra/sweeper: search]`` (conf/hydra/sweeper/
search.yaml). The work is in lorasweep.study.search; this class only fits it into Hydra: it runs in the
launching process, refuses a bad search before any run starts (exit 2, one line naming each
field), and launches ``search.workers`` jobs through whichever launcher the sweep uses (local,
parallel, SLURM). Each job asks the shared study for trials until it holds ``search.n_trials``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class SearchSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        self.max_batch_size = max_batch_size  # launcher=parallel sets it: workers at once
        self.params = params or {}
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from lorasweep.study import search
        from lorasweep.config import ConfigError

        assert self.config is not None and self.launcher is not None
        args = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        try:
            problems = search.check(self.config, args)
            workers = None if problems else search.prepare(self.config, list(arguments), self.max_batch_size)
        except ConfigError as e:  # e.g. the study folder holds a study of the other direction
            problems = e.problems
        if problems:
            print(f"lorasweep: invalid search config: {'; '.join(problems)}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # Every worker gets the same overrides: the trials come from the study, not from the list.
        returns = self.launcher.launch([list(arguments)] * workers, initial_job_idx=0)
        for r in returns:
            _ = r.return_value  # re-raises a job that crashed outside its own handling
        return [returns]
