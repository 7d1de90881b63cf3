"""The `lorasweep` command: a Hydra app. `-m` or `sweep=<study>` turns value lists into a sweep."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, RunConfig

log = logging.getLogger("lorasweep")


def conf_dir() -> str:
    """conf/ at the project root (src layout, editable install), or LORASWEEP_CONF."""
    env = os.environ.get("LORASWEEP_CONF")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def register_schema() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The one place YAML becomes dataclasses; type errors name their field."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError([f"{key}: {msg}"]) from None


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def task(cfg: DictConfig):
    """Hydra's task function: one run. Returns an outcome dict for the sweep summary."""
    from . import sweep  # noqa: F401  (registers the outcome file path for the callback)
    from .pipeline import run

    multirun = _multirun()
    try:
        rc = to_run_config(cfg)
        outcome = run(rc, show_progress=sys.stderr.isatty() or not multirun)
    except ConfigError as e:
        msg = f"invalid config: {'; '.join(e.problems)}"
        if not multirun:
            print(f"lorasweep: {msg}", file=sys.stderr)
            sys.exit(2)
        from .pipeline import Outcome

        outcome = Outcome(run_id="(invalid config)", status="failed", error=msg)
    if multirun:
        from .sweep import note_outcome

        note_outcome(outcome)
    elif outcome.status == "failed":
        print(f"lorasweep: run {outcome.run_id} failed: {outcome.error}", file=sys.stderr)
        sys.exit(1)
    else:
        from .summary import print_run

        print_run(outcome)
    return outcome.__dict__


def main() -> None:
    register_schema()
    app = hydra.main(version_base=None, config_path=conf_dir(), config_name="config")(task)
    app()


if __name__ == "__main__":
    main()
