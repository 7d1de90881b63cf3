"""`lorasweep-plan <overrides>`: predicted peak memory and time of a run, a grid (`-m`) or a study
(`sweep=NAME`), before launching.

Composes the same Hydra config as `lorasweep`, builds the model skeleton on the meta device
(no weights) and prints the breakdown; the time forecast reads the run's data with its tokenizer and
takes its throughput from finished runs like it in the results folder (run/forecast.py). Then the
totals: wall time run after run, device-hours, runs over planner.budget_gb, and on launcher=slurm
the timeout_min to ask for.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from .config import ConfigError, validate, world_size


def compose_run_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .cli import conf_dir, register_schema, to_run_config

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    rc = to_run_config(cfg)
    validate(rc)
    return rc


def expand(overrides: list[str]) -> list[list[str]]:
    """key=a,b,c -> one override list per combination (simple comma lists; brackets kept whole)."""
    axes = []
    for o in overrides:
        key, sep, val = o.partition("=")
        if sep and "," in val and not val.lstrip().startswith(("[", "{")):
            axes.append([f"{key}={v}" for v in val.split(",")])
        else:
            axes.append([o])
    return [list(c) for c in itertools.product(*axes)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lorasweep-plan", description="Predict a run's peak memory (no weights load).")
    ap.add_argument("-m", "--multirun", action="store_true", help="plan every combination of comma lists")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="plan for this device (default: what the run would pick here)")
    ap.add_argument("--config-dir", "-cd", action="append", default=[], metavar="DIR",
                    help="also search DIR for config groups (like lorasweep's --config-dir; "
                         "LORASWEEP_CONFIG_DIR works too)")
    ap.add_argument("--no-time", action="store_true", help="memory only: no time forecast (it reads the data)")
    ap.add_argument("--pilot", default="results/reference/pilot/pilot.json",
                    help="the pilot's seed spread (benchmarks/pilot.py) for each claim's power before any run "
                         "(default: %(default)s)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    from .compose import USER_DIRS_ENV, check_user_config_dirs

    if a.config_dir:  # read by the search-path plugin that lorasweep.cli.register_schema installs
        os.environ[USER_DIRS_ENV] = os.pathsep.join(
            [os.environ.get(USER_DIRS_ENV, ""), *(os.path.abspath(d) for d in a.config_dir)]).strip(os.pathsep)
    problem = check_user_config_dirs()
    if problem:
        print(f"lorasweep-plan: {problem}", file=sys.stderr)
        return 2
    from .config import resolve, run_id
    from .run.planner import plan_run

    from .study.sweep import sweep_jobs

    study = any(o.startswith("sweep=") for o in a.overrides)
    grids = sweep_jobs(a.overrides) if a.multirun or study else [a.overrides]
    status = 0
    summary, configs = [], []
    for ovr in grids:
        try:
            rc = compose_run_config(ovr)
            configs.append(rc)
        except ConfigError as e:
            print(f"lorasweep-plan: invalid config ({' '.join(ovr)}): {'; '.join(e.problems)}", file=sys.stderr)
            status = 2
            continue
        except Exception as e:  # noqa: BLE001 - a bad override is one clear line, not a traceback
            print(f"lorasweep-plan: {' '.join(ovr) or '(defaults)'}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            status = 2
            continue
        try:
            from .distributed.launch import per_rank

            # several processes (train.devices x nodes): one rank's share of the batch and of the model
            p = plan_run(per_rank(rc), device_type=None if a.device == "auto" else a.device)
        except Exception as e:  # noqa: BLE001
            print(f"lorasweep-plan: {run_id(rc)}: cannot plan: {e}", file=sys.stderr)
            status = 1
            continue
        budget = rc.planner.budget_gb
        # on CUDA the budget holds the context and the allocator's slack too, as in a run
        fits = "" if budget is None else ("  (fits the budget)" if p.device_gb <= budget else f"  (OVER budget {budget} GB: would be skipped)")
        rid = run_id(resolve(rc, p.device))  # the id the run gets on that device
        print(f"{rid}  [{p.device}]{fits}")
        print(p.table())
        fc = None if a.no_time else _time_forecast(rc, p.device)
        if fc is not None:
            print(f"  {'predicted training time':<40s} " + (f"{fc.train_s:8.1f} s" if fc.train_s is not None else
                                                           "       ? (no finished run like it here yet)")
                  + f"   ({fc.train_flops / 1e12:.3g} TFLOP"
                  + (f" at {fc.throughput.flops_per_s / 1e12:.3g} TFLOP/s from {fc.throughput.detail})" if fc.throughput else ")"))
            if fc.eval_s is not None:
                print(f"  {'predicted validation time':<40s} {fc.eval_s:8.1f} s")
        print()
        over = budget is not None and p.device_gb > budget
        summary.append((rid, p.peak_gb, fc, over, world_size(rc.train), None))
    if len(summary) > 1 or (summary and summary[0][2] is not None):
        _totals(summary, launcher_slurm=any(o.startswith("launcher=slurm") for o in a.overrides))
    if study and configs:
        _power(configs, Path(a.pilot) if a.pilot else None)
    return status


def _power(configs: list, pilot: Path | None) -> None:
    """Each claim's minimum detectable effect for this design (analysis/power.py)."""
    from .analysis.power import power_lines

    rc = configs[0]
    seeds = len({c.seed for c in configs})
    folder = Path(rc.results_dir) / (rc.study or "default")
    lines = power_lines(folder, dict(rc.reference or {}), seeds, rc.train.max_steps, pilot)
    if lines:
        print()
        print("\n".join(lines))


def _time_forecast(rc, device: str):
    from .run.forecast import plan_forecast

    try:
        return plan_forecast(rc, device)
    except Exception as e:  # noqa: BLE001 - a time forecast must never stop the memory plan
        print(f"  (no time forecast: {type(e).__name__}: {e})".splitlines()[0])
        return None


def _totals(summary, launcher_slurm: bool) -> None:
    from .run.forecast import slurm_timeout_min

    print("predicted peaks: memory, then training + validation time")
    known = []
    for rid, gb, fc, over, world, _ in summary:
        secs = (fc.train_s + (fc.eval_s or 0.0)) if fc is not None and fc.train_s is not None else None
        print(f"  {gb:8.3f} GB  " + (f"{secs:9.1f} s" if secs is not None else "        ? s") + f"  {rid}"
              + ("  OVER planner.budget_gb: skipped" if over else ""))
        if secs is not None and not over:
            known.append((secs, world))
    runs = [s for s in summary if not s[3]]
    if known:
        total = sum(s for s, _ in known)
        hours = sum(s * w for s, w in known) / 3600
        missing = len(runs) - len(known)
        wall = f"{total:.0f} s" if total < 600 else f"{total / 60:.1f} min"
        print(f"sweep: {len(runs)} runs to train, {wall} run after run, {hours:.3f} device-hours"
              + (f" (+ {missing} run(s) with no forecast yet)" if missing else ""))
        if launcher_slurm:
            print(f"launcher=slurm: timeout_min={slurm_timeout_min(max(s for s, _ in known))} per job "
                  f"(the longest run's forecast x 1.5 + 10 min; a run that overruns is checkpointed and requeued)")
    over = [s[0] for s in summary if s[3]]
    if over:
        print(f"over planner.budget_gb ({len(over)}): {', '.join(over)}")


if __name__ == "__main__":
    sys.exit(main())
