"""Sweep bookkeeping around Hydra's multirun.

In the launching process (a Hydra callback): count the grid, hand the job processes what they
need through the environment, and at the end print the summary and remember whether any run
failed (cli.main turns that into the exit code; Hydra swallows exceptions raised in callbacks).
In each job (job_start): say "run k of n", pin a GPU and split CPU threads when runs share a
machine, and note the run's outcome in <sweep dir>/outcomes.jsonl.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger("lorasweep")
OUTCOMES = "outcomes.jsonl"
# Set by the launching process; job processes (submitit local, SLURM) inherit the environment.
ENV_SIZE = "LORASWEEP_SWEEP_SIZE"
ENV_GPUS = "LORASWEEP_SWEEP_GPUS"
ENV_AT_ONCE = "LORASWEEP_SWEEP_AT_ONCE"
ENV_LAUNCH_CVD = "LORASWEEP_LAUNCH_CUDA_VISIBLE_DEVICES"  # the launching shell's own value, or UNSET
UNSET = "<unset>"

_failed_runs = 0  # set at multirun end; read by cli.main for the exit code


def failed_runs() -> int:
    return _failed_runs


# ------------------------------------------------------------------ launching process

def sweep_size(config: DictConfig) -> int | None:
    """How many jobs Hydra's basic sweeper will launch: the product of the sweep lists in
    hydra.sweeper.params and the command line. None for other sweepers (optuna decides as it goes)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    try:
        return len(jobs_of(config.hydra, list(config.hydra.overrides.task)))
    except Exception:  # noqa: BLE001 - the count is for display only
        return None


def jobs_of(hc, task: list[str]) -> list[list[str]]:
    """The override list of every job Hydra's basic sweeper launches for the study's
    ``hc.sweeper.params`` and the command line ``task``, in launch order (job.num indexes it): its
    own expansion (a command-line key replaces the study's axis of that key, in the axis's place)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = hc.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(task)
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
    return [list(j) for batch in BasicSweeper.split_arguments(parsed, None) for j in batch]


def visible_gpus() -> list[str]:
    """GPUs this process may use, without initialising CUDA (a job must pick its GPU first)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        pass
    # containers often hide /proc/driver/nvidia but pass the device files in
    return [str(i) for i in range(len(glob.glob("/dev/nvidia[0-9]*")))]


def parallel_cap(at_once: int | None, n_gpus: int, runs_per_gpu: int = 1) -> int | None:
    """The runs a process-per-run launcher may start at once on ``n_gpus`` GPUs: at most
    ``runs_per_gpu`` per GPU (two runs on one GPU share its memory and its time, and each one's
    figures are then no longer its own). None when ``at_once`` (None = the whole grid) already fits."""
    if n_gpus <= 0:
        return None
    limit = n_gpus * max(1, runs_per_gpu)
    return limit if at_once is None or at_once > limit else None


def _cap_to_gpus(config: DictConfig, gpus: list[str]) -> None:
    """launcher=parallel / submitit_local on a GPU machine: no more runs at once than parallel_cap."""
    if not str(config.hydra.launcher.get("_target_", "")).endswith("submitit_launcher.LocalLauncher"):
        return
    if not gpus or config.train.get("device", "auto") == "cpu" or "max_batch_size" not in config.hydra.sweeper:
        return
    per_gpu = int(config.get("runs_per_gpu", 1) or 1)
    at_once = config.hydra.sweeper.max_batch_size
    cap = parallel_cap(at_once, len(gpus), per_gpu)
    if cap is None:
        return
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweeper.max_batch_size = cap  # read by the sweeper, which Hydra makes after this callback
    os.environ[ENV_AT_ONCE] = str(cap)  # jobs compose their own config: tell them for their thread share
    log.info("%s runs at a time on %d GPU(s): %d (runs_per_gpu=%d; set runs_per_gpu=N to share a GPU)",
             "all" if at_once is None else at_once, len(gpus), cap, per_gpu)


def job_gpu(current: str | None, sweep_gpus: list[str], job_num: int,
            launcher_value: str | None = None) -> tuple[str, str | None]:
    """What a process-per-run job does with CUDA_VISIBLE_DEVICES: ("set", gpu) pins it to one of the
    GPUs the launching process saw; ("unset", None) drops the empty value submitit's local executor
    sets (gpus_per_node=0), which would otherwise send a GPU run silently to the CPU, unless the
    user's own environment (``launcher_value``) hid the GPUs; ("keep", current) otherwise."""
    gpu = pin_gpu(job_num, sweep_gpus)
    if gpu is not None:
        return "set", gpu
    if current is not None and not current.strip() and launcher_value is None:
        return "unset", None
    return "keep", current


def _sweep_dir(config: DictConfig | None = None) -> Path:
    if config is not None:
        return Path(config.hydra.sweep.dir)
    return Path(HydraConfig.get().sweep.dir)


class SweepSummary(Callback):
    """Registered in conf/config.yaml (hydra.callbacks); runs in the launching process."""

    def __init__(self) -> None:
        self.size: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _failed_runs
        _failed_runs = 0
        d = _sweep_dir(config)
        d.mkdir(parents=True, exist_ok=True)
        (d / OUTCOMES).unlink(missing_ok=True)
        self.size = sweep_size(config)
        os.environ[ENV_SIZE] = str(self.size or "")
        gpus = visible_gpus()
        os.environ[ENV_GPUS] = ",".join(gpus)
        os.environ[ENV_LAUNCH_CVD] = os.environ.get("CUDA_VISIBLE_DEVICES", UNSET)
        os.environ.pop(ENV_AT_ONCE, None)
        _cap_to_gpus(config, gpus)
        launcher = config.hydra.runtime.choices.get("launcher", "?")
        from . import search

        what = f"search of {config.search.n_trials} trials" if search.is_search(config) else \
            f"sweep of {self.size if self.size is not None else '?'} runs"
        log.info("%s, launcher %s; results in %s/%s; sweep log in %s", what, launcher, config.results_dir, config.study, d)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .summary import print_sweep

        global _failed_runs
        outcomes = read_outcomes(_sweep_dir(config))
        _failed_runs = print_sweep(outcomes, results_dir=Path(config.results_dir) / config.study,
                                   expected=self.size)
        from . import search

        if search.is_search(config):  # the best trial, its rerun command, compute vs full runs
            _failed_runs = search.print_result(config)


# ------------------------------------------------------------------ job process

def _job_info() -> tuple[int, int | None, str]:
    hc = HydraConfig.get()
    n = os.environ.get(ENV_SIZE)
    return hc.job.num, int(n) if n else None, str(hc.launcher.get("_target_", ""))


def pin_gpu(job_num: int, gpus: list[str]) -> str | None:
    """The GPU a parallel job gets: jobs launched together have consecutive numbers, so
    job number modulo the GPU count gives each its own."""
    return gpus[job_num % len(gpus)] if gpus else None


def threads_per_job(cpus: int, parallel: int) -> int:
    return max(1, cpus // max(1, parallel))


def job_start(cfg: DictConfig) -> None:
    """Called first thing in a multirun job, before torch touches CUDA or sets its threads."""
    num, n, launcher = _job_info()
    overrides = " ".join(HydraConfig.get().overrides.task)
    log.info("run %d of %s: %s", num + 1, n if n is not None else "?", overrides)
    threads = cfg.train.num_threads
    if launcher.endswith("submitit_launcher.LocalLauncher"):
        # Several runs share this machine: each gets its own GPU and a share of the cores.
        launched = os.environ.get(ENV_LAUNCH_CVD, UNSET)
        what, gpu = job_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"),
                            [g for g in os.environ.get(ENV_GPUS, "").split(",") if g], num,
                            None if launched == UNSET else launched)
        if what == "set":
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("run %d pinned to GPU %s", num + 1, gpu)
        elif what == "unset":
            del os.environ["CUDA_VISIBLE_DEVICES"]
        at_once = int(os.environ.get(ENV_AT_ONCE) or 0) or HydraConfig.get().sweeper.get("max_batch_size") or n or 1
        if threads == 0:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = threads_per_job(cpus, min(at_once, n or at_once))
    elif os.environ.get("SLURM_CPUS_PER_TASK") and threads == 0:
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    if threads != cfg.train.num_threads:
        import torch  # no CUDA call: only the CPU thread pool

        torch.set_num_threads(threads)  # now, so the record's env.torch_threads says it too
        with open_dict(cfg):
            cfg.train.num_threads = threads


def note_outcome(outcome, trial: int | None = None, overrides: list[str] | None = None) -> None:
    """Append one line per run; O_APPEND keeps lines whole when jobs finish at once. A search's
    worker notes each trial with its number and the trial's own overrides."""
    hc = HydraConfig.get()
    d = Path(hc.sweep.dir)
    d.mkdir(parents=True, exist_ok=True)
    row = {**asdict(outcome), "job": hc.job.num,
           "overrides": list(hc.overrides.task) if overrides is None else list(overrides)}
    if trial is not None:
        row["trial"] = trial
    line = json.dumps(row, default=str) + "\n"
    fd = os.open(d / OUTCOMES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_outcomes(sweep_dir: Path) -> list[dict]:
    p = Path(sweep_dir) / OUTCOMES
    if not p.exists():
        return []
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return sorted(rows, key=lambda r: (r.get("trial", -1), r.get("job", 0)))  # a search: in trial order


# ----------------------------------------------------------------------------- forecasts of a whole sweep

_PLANNED: dict[tuple, tuple] = {}  # job overrides -> (results_dir, Forecast): this process's sweep


def remaining_forecast() -> str | None:
    """After a run of a one-process basic sweep: the forecast of the runs still to come, made from every
    run finished so far (each new one moves it), as one line; None where there is nothing to say."""
    from hydra import compose

    from ..compose import to_run_config
    from ..run.forecast import finished_runs, from_finished_runs, plan_forecast

    hc = HydraConfig.get()
    if not str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper") or \
            not str(hc.launcher.get("_target_", "")).endswith("BasicLauncher"):
        return None  # a search decides as it goes; other launchers run jobs side by side
    # In-process jobs (the basic launcher) see only their own overrides; the sweep's are the command line's.
    task = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    rest = jobs_of(hc, task)[hc.job.num + 1:]
    if not rest:
        return None
    total, finished = 0.0, {}  # each results folder's finished runs, read once
    for job in rest:
        planned = _PLANNED.get(tuple(job))
        if planned is None:  # a job's config and FLOPs do not change as the sweep goes: planned once
            rc = to_run_config(compose(config_name=hc.job.config_name, overrides=job))
            planned = _PLANNED[tuple(job)] = (rc.results_dir, plan_forecast(rc, finished=[]))
        results_dir, fc = planned
        if results_dir not in finished:
            finished[results_dir] = finished_runs(Path(results_dir))
        if fc is not None:  # only the throughput moves: from the runs finished so far
            fc.throughput = from_finished_runs(finished[results_dir], fc.key, fc.tokens_per_micro_batch)
        if fc is None or fc.train_s is None:
            return f"forecast: {len(rest)} run(s) left; no forecast yet for {' '.join(job)}"
        total += fc.train_s + (fc.eval_s or 0.0)
    wall = f"{total:.0f} s" if total < 600 else f"{total / 60:.1f} min"
    return f"forecast: {len(rest)} run(s) left, {wall} of training and validation (from the runs finished so far)"


def sweep_timeout_min(root) -> int | None:
    """launcher=slurm's timeout_min from the forecasts of the sweep it launches (root: the launching
    process's config): the longest run's forecast x 1.5 + 10 min, or None when a run has no forecast
    (no finished run like it yet: the launcher's default stands)."""
    from hydra import compose

    from ..compose import to_run_config
    from ..run.forecast import finished_runs, plan_forecast, slurm_timeout_min

    hc = root.hydra
    jobs = jobs_of(hc, list(hc.overrides.task))  # the launching process sees the whole command line
    device = "cuda" if hc.launcher.get("gpus_per_node") else "cpu"
    worst, finished = 0.0, {}  # each results folder's finished runs, read once
    for job in jobs:
        rc = to_run_config(compose(config_name=hc.job.config_name, overrides=job))
        if rc.results_dir not in finished:
            finished[rc.results_dir] = finished_runs(Path(rc.results_dir))
        fc = plan_forecast(rc, device, loose=True, finished=finished[rc.results_dir])
        if fc is None or fc.train_s is None:
            return None
        worst = max(worst, fc.train_s + (fc.eval_s or 0.0))
    return slurm_timeout_min(worst)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job a `lorasweep -m ...` (or a study file's hydra.sweeper.params) would launch, as override
    lists: Hydra's own basic-sweeper expansion of the study's axes and the command line's lists."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ..compose import conf_dir, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    plain = [o for o in overrides if not is_list(o)]
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=plain, return_hydra_config=True)
        return jobs_of(cfg.hydra, overrides)


def is_list(o: str) -> bool:
    """key=a,b,c: a sweep list (brackets and braces are one value)."""
    key, sep, val = o.partition("=")
    return bool(sep) and "," in val and not val.lstrip().startswith(("[", "{"))


def replaced_axes(overrides: list[str]) -> list[str]:
    """One line per single command-line value that replaces an axis the study file sweeps (a key of
    its hydra.sweeper.params): Hydra lets the command line win, so `sweep=qlora_vs_lora
    precision=bf16_true` trains bf16 only. A value list (`precision=bf16_true,nf4`) keeps a sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ..compose import conf_dir, register_schema

    if not any(o.startswith("sweep=") for o in overrides):
        return []
    register_schema()
    GlobalHydra.instance().clear()
    plain = [o for o in overrides if "=" in o and not o.startswith("-") and not is_list(o)]
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose(config_name="config", overrides=[o for o in plain if not o.startswith("hydra/")],
                          return_hydra_config=True)
            params = {str(k): str(v) for k, v in (cfg.hydra.sweeper.get("params") or {}).items()}
    except Exception:  # noqa: BLE001 - Hydra itself reports a bad override, with its own message
        return []
    finally:
        GlobalHydra.instance().clear()
    study = next(o.partition("=")[2] for o in overrides if o.startswith("sweep="))
    out = []
    for o in plain:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in params:
            out.append(f"{key}={value} replaces the study's {key} sweep {params[key]} (sweep={study}): "
                       f"every run takes {key}={value}; give a list to keep a sweep, e.g. '{key}={value},...'")
    return out
