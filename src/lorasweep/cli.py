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


# Study files set alpha relative to r (lora.alpha='${mul:${lora.r},2}'); registered at import so
# jobs of process-per-run launchers, which unpickle `task`, resolve it too.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)


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
    from . import sweep

    multirun = _multirun()
    if multirun:
        sweep.job_start(cfg)  # "run k of n"; GPU pinning and thread share before torch starts
    from .pipeline import run

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
    except Exception as e:  # noqa: BLE001 - in a sweep one run's crash must not end the others
        if not multirun:
            raise
        from .pipeline import Outcome

        outcome = Outcome(run_id="(crashed)", status="failed", error=f"{type(e).__name__}: {e}")
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
    from .sweep import failed_runs

    if failed_runs():  # set by the sweep summary; Hydra itself exits 0 after a multirun
        sys.exit(1)


if __name__ == "__main__":
    main()
