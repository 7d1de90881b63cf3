"""The `lorasweep` command: a Hydra app. `-m` or `sweep=<study>` turns value lists into a sweep."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import compose
from .compose import check_user_config_dirs, conf_dir, to_run_config  # noqa: F401  (the commands' and tests' names)
from .config import ConfigError

log = logging.getLogger("lorasweep")


def _slurm_timeout_min(default, *, _root_):
    """${lorasweep_timeout_min:DEFAULT} (conf/launcher/slurm.yaml): the time limit the SLURM jobs of a
    sweep ask for, from the runs' forecasts (study/sweep.py); DEFAULT where a run has none
    yet. A hydra.launcher.timeout_min on the command line replaces it."""
    try:
        from .study.sweep import sweep_timeout_min

        got = sweep_timeout_min(_root_)
    except Exception as e:  # noqa: BLE001 - the limit is advice: never fail a launch over it
        log.warning("no forecast-based SLURM time limit (%s: %s); timeout_min=%s", type(e).__name__, e, default)
        return default
    if got is None:
        print(f"lorasweep: SLURM time limit: timeout_min={default} (a run of this sweep has no forecast yet)",
              file=sys.stderr)
        return default
    print(f"lorasweep: SLURM time limit from the forecast: timeout_min={got} (the longest run x 1.5 + 10 min)",
          file=sys.stderr)
    return got


OmegaConf.register_new_resolver("lorasweep_timeout_min", _slurm_timeout_min, replace=True)


def register_schema() -> None:
    """The typed schema and user config folders (compose.py), and the search sweeper
    (hydra/sweeper=search), which Hydra's own scan misses in an editable install."""
    from hydra_plugins.lorasweep_search.search_sweeper import SearchSweeper

    compose.register_schema()
    Plugins.instance().register(SearchSweeper)


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
    from .job import run

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
        from .job import Outcome

        outcome = Outcome(run_id="(invalid config)", status="failed", error=msg)
    except Exception as e:  # noqa: BLE001 - in a sweep one run's crash must not end the others
        if not multirun:
            raise
        from .job import Outcome

        outcome = Outcome(run_id="(crashed)", status="failed", error=f"{type(e).__name__}: {e}")
    if outcome.status == "follower":  # node k > 0 of a multi-node run: node 0 notes and reports it
        return outcome.__dict__
    if multirun:
        from .study.sweep import note_outcome, remaining_forecast

        note_outcome(outcome)
        if outcome.status in ("completed", "pruned", "skipped", "failed"):
            try:
                line = remaining_forecast()
            except Exception as e:  # noqa: BLE001 - a forecast must never stop a sweep
                line = f"forecast of the runs left: unavailable ({type(e).__name__}: {e})".splitlines()[0]
            if line:
                log.info("%s", line)
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
        from .study.summary import print_run

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
    from .study.sweep import replaced_axes

    for line in replaced_axes(sys.argv[1:]):  # before the sweep's first line: what the user asked is not run
        print(f"lorasweep: {line}", file=sys.stderr)
    register_schema()
    app = hydra.main(version_base=None, config_path=conf_dir(), config_name="config")(task)
    app()
    from .study.sweep import failed_runs

    if failed_runs():  # set by the sweep summary; Hydra itself exits 0 after a multirun
        sys.exit(1)


if __name__ == "__main__":
    main()
