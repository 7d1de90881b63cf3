"""`lorasweep-plan <overrides>`: predicted peak memory of a run (or `-m` a grid) before launching.

Composes the same Hydra config as `lorasweep`, builds the model skeleton on the meta device
(no weights) and prints the breakdown. `-m lora.r=8,64 precision=fp32,nf4` plans every combination.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

from .config import ConfigError, validate


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

    grids = expand(a.overrides) if a.multirun else [a.overrides]
    status = 0
    summary = []
    for ovr in grids:
        try:
            rc = compose_run_config(ovr)
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
        print()
        summary.append((rid, p.peak_gb))
    if len(summary) > 1:
        print("predicted peaks:")
        for rid, gb in summary:
            print(f"  {gb:8.3f} GB  {rid}")
    return status


if __name__ == "__main__":
    sys.exit(main())
