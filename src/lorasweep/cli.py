"""The `lorasweep` command: a Hydra app. `-m` or `sweep=<study>` turns value lists into a sweep."""
from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, RunConfig

log = logging.getLogger("lorasweep")


CONF_PACKAGE = "lorasweep.conf"
USER_DIRS_ENV = "LORASWEEP_CONFIG_DIR"


def conf_dir() -> str:
    """The folder of lorasweep's own config groups: the package lorasweep.conf, which is the
    repository's conf/ in an editable install and <site-packages>/lorasweep/conf in a wheel
    (pyproject.toml maps one onto the other). LORASWEEP_CONF replaces it wholesale."""
    env = os.environ.get("LORASWEEP_CONF")
    if env:
        return str(Path(env).resolve())
    root = resources.files(CONF_PACKAGE)
    if isinstance(root, Path):
        return str(root)
    return f"pkg://{CONF_PACKAGE}"  # not on a file system (zipped): Hydra reads the package itself


def user_config_dirs() -> list[str]:
    """Extra config folders from LORASWEEP_CONFIG_DIR (os.pathsep-separated), searched after
    lorasweep's own: a user's model/my_model.yaml or sweep/my_study.yaml becomes model=my_model,
    sweep=my_study. Same role as Hydra's --config-dir, for every lorasweep command."""
    raw = os.environ.get(USER_DIRS_ENV, "")
    return [str(Path(d).expanduser().resolve()) for d in raw.split(os.pathsep) if d.strip()]


def check_user_config_dirs() -> str | None:
    """One line naming a LORASWEEP_CONFIG_DIR entry that is not a folder, else None."""
    for d in user_config_dirs():
        if not Path(d).is_dir():
            return f"no such config folder: {d} ({USER_DIRS_ENV} / --config-dir)"
    return None


class UserConfigDirs(SearchPathPlugin):
    """Adds user_config_dirs() to the search path of compositions whose main config is lorasweep's."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        ours = {conf_dir(), f"pkg://{CONF_PACKAGE}"}
        mains = [e.path.removeprefix("file://") for e in search_path.get_path() if e.provider == "main"]
        if not any(m in ours for m in mains):
            return
        for d in user_config_dirs():
            search_path.append(provider=USER_DIRS_ENV, path=f"file://{d}")


# Study files set alpha relative to r (lora.alpha='${mul:${lora.r},2}'); registered at import so
# jobs of process-per-run launchers, which unpickle `task`, resolve it too.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)


def register_schema() -> None:
    """The typed schema, and the user config folders (every composition calls this first)."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    Plugins.instance().register(UserConfigDirs)
    # The search sweeper (hydra/sweeper=search): Hydra's own scan misses it in an editable install.
    from hydra_plugins.lorasweep_search.search_sweeper import SearchSweeper

    Plugins.instance().register(SearchSweeper)


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
    from .study import sweep

    multirun = _multirun()
    if multirun:
        sweep.job_start(cfg)  # "run k of n"; GPU pinning and thread share before torch starts
    from .run.pipeline import run

    if multirun and _search_job():
        return _search_worker(cfg)
    try:
        rc = to_run_config(cfg)
        outcome = run(rc, show_progress=sys.stderr.isatty() or not multirun)
    except ConfigError as e:
        msg = f"invalid config: {'; '.join(e.problems)}"
        if not multirun:
            print(f"lorasweep: {msg}", file=sys.stderr)
            sys.exit(2)
        from .run.pipeline import Outcome

        outcome = Outcome(run_id="(invalid config)", status="failed", error=msg)
    except Exception as e:  # noqa: BLE001 - in a sweep one run's crash must not end the others
        if not multirun:
            raise
        from .run.pipeline import Outcome

        outcome = Outcome(run_id="(crashed)", status="failed", error=f"{type(e).__name__}: {e}")
    if outcome.status == "follower":  # node k > 0 of a multi-node run: node 0 notes and reports it
        return outcome.__dict__
    if multirun:
        from .study.sweep import note_outcome

        note_outcome(outcome)
    if outcome.status == "interrupted":
        # The process was asked to stop (preemption, time limit, Ctrl-C): the run is checkpointed,
        # and no further run of the sweep starts. 128 + signal, as the shell reports a signal death.
        from .run import preempt

        print(f"lorasweep: run {outcome.run_id} {outcome.error}", file=sys.stderr)
        sys.exit(128 + (preempt.requested() or 15))
    _stop_if_signalled(outcome)
    if multirun:
        pass
    elif outcome.status == "failed":
        print(f"lorasweep: run {outcome.run_id} failed: {outcome.error}", file=sys.stderr)
        sys.exit(1)
    else:
        from .analysis.summary import print_run

        print_run(outcome)
    return outcome.__dict__


def _stop_if_signalled(outcome) -> None:
    """A stop signal that came after the training loop (final validation, lm-eval, saving) let the
    run finish, and still means what it says: no further run of the sweep starts, exit 128 + signal."""
    from .run import preempt

    got = preempt.requested()
    if got is None:
        return
    import signal

    print(f"lorasweep: {signal.Signals(got).name} arrived after run {outcome.run_id}'s training "
          f"(recorded {outcome.status}); starting no further run", file=sys.stderr)
    sys.exit(128 + got)


def _search_job() -> bool:
    from .study.search import is_search_job

    return is_search_job()


def _search_worker(cfg: DictConfig):
    """A job of a search: trials until the study is full (search.py), each noted as it ends."""
    from .run import preempt
    from .study import sweep
    from .study.search import work

    last = work(cfg, note=lambda o, number, overrides: sweep.note_outcome(o, trial=number, overrides=overrides),
                job=HydraConfig.get().job.num, show_progress=sys.stderr.isatty())
    if last is not None and last.status == "interrupted":
        print(f"lorasweep: run {last.run_id} {last.error}", file=sys.stderr)
        sys.exit(128 + (preempt.requested() or 15))
    if last is not None:
        _stop_if_signalled(last)
    return last.__dict__ if last is not None else None


def main() -> None:
    problem = check_user_config_dirs()
    if problem:
        print(f"lorasweep: {problem}", file=sys.stderr)
        sys.exit(2)
    register_schema()
    app = hydra.main(version_base=None, config_path=conf_dir(), config_name="config")(task)
    app()
    from .study.sweep import failed_runs

    if failed_runs():  # set by the sweep summary; Hydra itself exits 0 after a multirun
        sys.exit(1)


if __name__ == "__main__":
    main()
