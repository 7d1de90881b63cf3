"""Optuna search: a study file's space, asked and told from the sweep's own jobs.

Why Optuna's ask/tell API and not hydra-optuna-sweeper: that sweeper asks a batch of trials, waits
for the whole batch, and has no pruner (hydra#1954). Here the launching process (the Hydra sweeper
``hydra_plugins.lorasweep_search.SearchSweeper``) only checks the search, creates the study and
starts ``search.workers`` jobs through the configured launcher (local, parallel, SLURM); each job
loops ask -> run -> tell until the study holds ``search.n_trials`` trials. The study lives in the
study folder as an Optuna journal file (``optuna.journal``; NFS-safe symlink locks), so jobs on other
nodes share it, a worker never waits for another, and a killed search relaunched with the same
command continues from the stored trials. Early stopping is the study-folder pruner (pruner.py),
the same one plain grids use; a pruned run is told to Optuna as PRUNED with its validation curve
as intermediate values, which TPE uses.

A trial is a set of overrides (``lora.r=16 optimizer.lr=0.0012``) applied to the job's config, so
the trial's run is an ordinary run with an ordinary run folder; the same overrides on the command
line rerun it.

Space entries (``search.space`` in a study file), keyed by config field:
    optimizer.lr: {type: float, low: 1e-5, high: 1e-2, log: true}
    lora.r:       {type: int, low: 4, high: 64, log: true}        # step: for int/float grids
    lora.alpha:   {choices: [0.5, 1, 2], times: lora.r}           # alpha = r x choice
    lora.targets: {choices: [[qv], [attention], [all_linear]]}
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, RunConfig, run_id as make_run_id, validate

log = logging.getLogger("lorasweep")

JOURNAL = "optuna.journal"
LOCK = "search"  # the ask lock: <study>/search.lock (Optuna's symlink lock, NFS-safe)
SAMPLERS = ("tpe", "random", "grid")
SWEEPER = "hydra_plugins.lorasweep_search.search_sweeper.SearchSweeper"


# ----------------------------------------------------------------------------- the space

@dataclass
class Param:
    key: str  # the config field the trial overrides
    kind: str  # int | float | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    times: str | None = None  # the value is a factor of this other field (alpha = r x factor)

    @property
    def name(self) -> str:
        """The parameter's name in the Optuna study."""
        return f"{self.key}/{self.times}" if self.times else self.key

    def candidates(self) -> list:
        """Values a config check should try: the ends of a range, or every choice."""
        return [self.low, self.high] if self.choices is None else list(self.choices)

    def grid(self) -> list | None:
        if self.choices is not None:
            return [_optuna_choice(c) for c in self.choices]
        if self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            vals = [self.low + i * self.step for i in range(n)]
            return [int(v) for v in vals] if self.kind == "int" else vals
        return None


def _fmt(v: Any) -> str:
    """A value as a command-line override writes it (and OmegaConf's dotlist parses it back)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(float(f"{v:.6g}"))  # 0.0012345678 -> 0.00123457: readable, and the run id stays short
    return str(v)


def _optuna_choice(c: Any) -> Any:
    """Optuna's categorical choices are scalars: a list choice ([qv]) is kept as its override text."""
    return _fmt(c) if isinstance(c, (list, tuple, dict)) else c


def parse_space(space: dict | None, cfg: DictConfig | None = None, sampler: str = "tpe") -> tuple[list[Param], list[str]]:
    """The space's parameters and the problems found, each naming its field."""
    params, problems = [], []
    if not space:
        return [], ["search.space: empty; give at least one parameter, e.g. "
                    "search.space={optimizer.lr: {type: float, low: 1e-5, high: 1e-2, log: true}}"]
    for key, spec in space.items():
        where = f"search.space.{key}"
        if cfg is not None and OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            problems.append(f"{where}: no such config field (e.g. optimizer.lr, lora.r, lora.dropout)")
            continue
        if not isinstance(spec, dict):
            problems.append(f"{where}={spec!r}: must be a mapping, e.g. {{type: float, low: 1e-5, high: 1e-2, log: true}}")
            continue
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "times"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)} (type, low, high, log, step, choices, times)")
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        p = Param(key, str(kind), spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step"),
                  list(spec["choices"]) if spec.get("choices") is not None else None, spec.get("times"))
        if kind not in ("int", "float", "categorical"):
            problems.append(f"{where}.type={kind!r}: must be int, float or categorical")
            continue
        if kind == "categorical":
            if not p.choices:
                problems.append(f"{where}.choices: empty; list the values to try, e.g. choices: [0.0, 0.05, 0.1]")
                continue
        else:
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (p.low, p.high)):
                problems.append(f"{where}: type {kind} needs numbers low and high (got low={p.low!r}, high={p.high!r})")
                continue
            if p.low >= p.high:
                problems.append(f"{where}: low={p.low} must be < high={p.high}")
            if p.log and p.low <= 0:
                problems.append(f"{where}.low={p.low}: a log range needs low > 0")
            if p.log and p.step is not None:
                problems.append(f"{where}: log and step exclude each other (Optuna); drop one")
            if p.step is not None and not p.step > 0:
                problems.append(f"{where}.step={p.step}: must be > 0")
            if kind == "int" and not all(float(x).is_integer() for x in (p.low, p.high)):
                problems.append(f"{where}: type int needs whole low and high")
        if p.times is not None:
            if cfg is not None and OmegaConf.select(cfg, p.times, default="<absent>") == "<absent>":
                problems.append(f"{where}.times={p.times!r}: no such config field")
            if kind == "categorical" and not all(isinstance(c, (int, float)) for c in p.choices):
                problems.append(f"{where}: times={p.times} needs numeric choices (factors)")
        if sampler == "grid" and p.grid() is None:
            problems.append(f"{where}: search.sampler=grid needs choices (or a step) for every parameter")
        params.append(p)
    return params, problems


def suggest(trial, params: list[Param], base: DictConfig) -> list[str]:
    """Ask the trial for every parameter; return the run's overrides."""
    values: dict[str, Any] = {}
    for p in params:
        if p.kind == "categorical":
            v = trial.suggest_categorical(p.name, [_optuna_choice(c) for c in p.choices])
        elif p.kind == "int":
            v = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            v = trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)
        values[p.key] = v
    out = []
    for p in params:
        v = values[p.key]
        if p.times:  # a factor of another field: that field's trial value, else the config's
            ref = values.get(p.times, OmegaConf.select(base, p.times))
            v = float(ref) * float(v)
        out.append(f"{p.key}={_fmt(v) if not isinstance(v, str) else v}")
    return out


def apply(cfg: DictConfig, overrides: list[str]) -> RunConfig:
    """The job's config with a trial's overrides, as a validated RunConfig."""
    from ..compose import to_run_config

    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError([f"{getattr(e, 'full_key', None) or 'search.space'}: {str(e).splitlines()[0]}"]) from None
    rc = to_run_config(merged)
    validate(rc)
    return rc


# ----------------------------------------------------------------------------- checks

def direction(sc) -> str:
    """search.direction; ``auto``: lm-eval's own higher_is_better for the metric's name (bits_per_byte,
    ter, perplexities are minimized), else minimize losses and perplexities, maximize the rest."""
    if sc.direction != "auto":
        return sc.direction
    name = sc.metric.rsplit("/", 1)[-1]
    higher = _lm_eval_higher_is_better(name)
    if higher is not None:
        return "maximize" if higher else "minimize"
    return "minimize" if name.endswith(("loss", "perplexity")) else "maximize"


def _lm_eval_higher_is_better(name: str) -> bool | None:
    """lm-eval's registry entry for a metric, the name as the record writes it (``<metric>`` or
    ``<metric>_<filter>``, so the longest registered prefix counts); None where it has none."""
    try:
        import lm_eval.api.metrics  # noqa: F401  (registers the metrics)
        from lm_eval.api.registry import higher_is_better_registry
    except ImportError:  # pragma: no cover - lm-eval is a dependency
        return None
    parts = name.split("_")
    for n in range(len(parts), 0, -1):
        try:
            return bool(higher_is_better_registry.get("_".join(parts[:n])))
        except KeyError:
            continue
    return None


def metric_problems(rc: RunConfig) -> list[str]:
    m = rc.search.metric
    classify = rc.model.task == "sequence_classification"
    val = ("val/loss", "val/perplexity") + (("val/accuracy", "val/f1") if classify else ())
    if m in val:
        return [] if rc.eval.val_loss else [f"search.metric={m!r}: needs eval.val_loss=true"]
    if m == "train/loss":
        return []
    if m.startswith("eval/"):
        parts = m.split("/")
        if len(parts) >= 3 and parts[1] in rc.eval.tasks and parts[-1]:
            return []
        return [f"search.metric={m!r}: eval/<task>/<metric> needs <task> in eval.tasks (now {list(rc.eval.tasks)}), "
                f"e.g. eval=arithmetic search.metric=eval/lorasweep_arithmetic/exact_match"]
    known = ", ".join(val + ("train/loss",))
    return [f"search.metric={m!r}: unknown; use {known} or eval/<task>/<metric> for a task in eval.tasks"]


def job_config(config: DictConfig) -> DictConfig:
    """A launching process's config without its hydra node: what each job sees."""
    c = copy.deepcopy(config)
    if "hydra" in c:
        with open_dict(c):
            del c["hydra"]
    return c


def check(config: DictConfig, arguments: list[str] = ()) -> list[str]:
    """Everything wrong with a search, before any run starts: the search block, the run config at
    every end of every range and every choice, and command-line value lists (grids, not searches)."""
    from ..compose import to_run_config

    problems = []
    sweeps = [a for a in arguments if _is_value_list(a)]
    if sweeps:
        problems.append(f"{sweeps[0].split('=')[0]}: value lists ({sweeps[0]}) make a grid; in a search put the values "
                        f"in search.space (e.g. search.space.lora.r={{choices: [4, 8, 16]}})")
    cfg = job_config(config)
    try:
        rc = to_run_config(cfg)
    except ConfigError as e:
        return problems + e.problems
    sc = rc.search
    if sc.n_trials <= 0:
        problems.append(f"search.n_trials={sc.n_trials}: must be a positive integer (e.g. search.n_trials=16)")
    if sc.sampler not in SAMPLERS:
        problems.append(f"search.sampler={sc.sampler!r}: must be one of {', '.join(SAMPLERS)}")
    if sc.direction not in ("auto", "minimize", "maximize"):
        problems.append(f"search.direction={sc.direction!r}: must be minimize, maximize or auto")
    if sc.workers is not None and sc.workers <= 0:
        problems.append(f"search.workers={sc.workers}: must be a positive integer, or null")
    if sc.n_startup_trials < 0:
        problems.append(f"search.n_startup_trials={sc.n_startup_trials}: must be >= 0")
    problems += metric_problems(rc)
    params, space_problems = parse_space(OmegaConf.to_container(cfg.search.space), cfg, sc.sampler)
    problems += space_problems
    try:
        validate(rc)
    except ConfigError as e:
        problems += e.problems
    if space_problems:
        return problems
    for p in params:  # each end of each range, each choice: a config the runs could get
        for v in p.candidates():
            value = v
            if p.times:
                value = float(v) * float(OmegaConf.select(cfg, p.times))
            override = f"{p.key}={_fmt(value)}"
            try:
                apply(cfg, [override])
            except ConfigError as e:
                problems += [f"search.space.{p.name}: {_fmt(v)} gives {q}" for q in e.problems]
    return list(dict.fromkeys(problems))


def _is_value_list(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(arg).is_sweep_override()
    except Exception:  # noqa: BLE001 - Hydra already parsed it; nothing to say here
        return False


def is_search(config: DictConfig) -> bool:
    """True in the launching process and in the jobs of a search (its sweeper is ours)."""
    try:
        target = str(config.hydra.sweeper.get("_target_", ""))
    except Exception:  # noqa: BLE001
        return False
    return target == SWEEPER


def is_search_job() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().sweeper.get("_target_", "")) == SWEEPER
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the study

def study_dir(rc: RunConfig) -> Path:
    return Path(rc.results_dir) / rc.study


def storage(folder: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / JOURNAL)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path)))


def open_study(rc: RunConfig, *, create: bool = False):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = storage(study_dir(rc))
    if create:
        study = optuna.create_study(storage=st, study_name=rc.study, direction=direction(rc.search), load_if_exists=True)
    else:
        study = optuna.load_study(study_name=rc.study, storage=st)
    want = direction(rc.search)
    if study.direction.name.lower() != want:
        raise ConfigError([f"search.direction={want}: the study in {study_dir(rc)} was made with "
                           f"{study.direction.name.lower()}; use another study= or the same direction"])
    return study


def load(folder: Path):
    """The search stored in a study folder, or None."""
    import optuna

    if not (Path(folder) / JOURNAL).exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = storage(Path(folder))
    names = [s.study_name for s in optuna.get_all_study_summaries(st)]
    return optuna.load_study(study_name=names[0], storage=st) if names else None


def make_sampler(sc, seed: int, params: list[Param]):
    import optuna

    if sc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sc.sampler == "grid":
        class AskTellGrid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values):
                pass  # GridSampler calls study.stop() here, which only works inside study.optimize()

        return AskTellGrid({p.name: p.grid() for p in params}, seed=seed)
    # constant_liar: trials still running count as bad guesses, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sc.n_startup_trials, constant_liar=True)


def _lease_alive(run_dir: str | None) -> bool:
    from ..run.lease import LEASE, is_stale, timeout_s

    if not run_dir:
        return False
    try:
        holder = json.loads((Path(run_dir) / LEASE).read_text())
    except (OSError, ValueError):
        return False
    return bool(holder) and not is_stale(holder, timeout_s())


def _worker_alive(t, now: float) -> bool:
    from ..run.lease import pid_alive, timeout_s

    a = t.user_attrs
    if _lease_alive(a.get("run_dir")):
        return True
    if a.get("host") == socket.gethostname() and isinstance(a.get("pid"), int):
        return pid_alive(a["pid"])
    # Another host: its run takes the run folder's lease within seconds of the ask.
    return now - t.datetime_start.timestamp() < timeout_s()


def recover(study) -> int:
    """Trials left RUNNING by a killed worker: told from their run's record if it finished, else
    marked FAIL (interrupted) and enqueued again with the same parameters. Returns how many."""
    import optuna
    from optuna.trial import TrialState

    from ..run.record import read_record

    n, now = 0, time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_alive(t, now):
            continue
        trial = optuna.trial.Trial(study, t._trial_id)
        rec = read_record(t.user_attrs["run_dir"]) if t.user_attrs.get("run_dir") else None
        if rec and rec.get("status") in ("completed", "pruned"):
            log.info("search: trial %d finished but was not told (its worker died): told from its record", t.number)
            _tell(study, trial, rec["status"], rec.get("metrics") or {}, rec.get("error"), Path(t.user_attrs["run_dir"]))
        else:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("error", "interrupted: its worker died; the same parameters are asked again")
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.info("search: trial %d was interrupted (worker gone); its parameters are queued again", t.number)
        n += 1
    return n


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "interrupted": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            c["interrupted"] += 1
        else:
            c[t.state.name.lower()] += 1
    c["planned"] = c["complete"] + c["pruned"] + c["fail"] + c["running"] + c["waiting"]
    return c


def _trained_steps(run_dir: Path, metrics: dict) -> int:
    if "train/steps" in metrics:
        return int(metrics["train/steps"])
    last = 0
    try:
        for line in (run_dir / "steps.jsonl").read_text().splitlines():
            last = max(last, int(json.loads(line).get("step", 0)))
    except (OSError, ValueError):
        pass
    return last


def _tell(study, trial, status: str, metrics: dict, error: str | None, run_dir: Path, *, reused: bool = False) -> None:
    from optuna.trial import TrialState

    from ..run.pruner import read_curve

    for step, v in sorted(read_curve(run_dir).items()):
        trial.report(v, step)  # the curve: Optuna's plots and TPE (for pruned trials) read it
    sc_metric = study.user_attrs.get("metric", "val/loss")
    trial.set_user_attr("status", status)
    # An earlier trial's run, or one another worker trains right now: no compute of this trial's
    # (that worker's steps are charged to its own trial).
    trial.set_user_attr("steps", 0 if reused or status == "elsewhere" else _trained_steps(run_dir, metrics))
    trial.set_user_attr("planned_steps", int(metrics.get("train/planned_steps", metrics.get("train/steps", 0)) or 0))
    if reused or status == "elsewhere":
        trial.set_user_attr("reused", True)  # an earlier trial's run, or one another worker trains: no new compute
    if error:
        trial.set_user_attr("error", error)
    if status == "pruned":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    elif status in ("completed", "skipped") and isinstance(metrics.get(sc_metric), (int, float)) \
            and math.isfinite(metrics[sc_metric]):
        study.tell(trial, float(metrics[sc_metric]), skip_if_finished=True)
    else:
        if status in ("completed", "skipped"):
            trial.set_user_attr("error", f"search.metric={sc_metric!r} is not a finite number in the run's metrics")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


class _Lock:
    def __init__(self, folder: Path):
        from optuna.storages.journal import JournalFileSymlinkLock

        self._lock = JournalFileSymlinkLock(str(folder / LOCK))

    def __enter__(self):
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()


# ----------------------------------------------------------------------------- launching process

def prepare(config: DictConfig, arguments: list[str], max_batch_size: int | None) -> int:
    """Create (or reopen) the study, recover what a killed launch left, record the launch; return
    how many worker jobs to start."""
    from ..compose import to_run_config

    cfg = job_config(config)
    rc = to_run_config(cfg)
    study = open_study(rc, create=True)
    sc = rc.search
    with _Lock(study_dir(rc)):
        study.set_user_attr("metric", sc.metric)
        study.set_user_attr("space", OmegaConf.to_container(cfg.search.space))
        study.set_user_attr("n_trials", sc.n_trials)
        study.set_user_attr("sampler", sc.sampler)
        study.set_user_attr("launch_overrides", [a for a in arguments])
        recover(study)
        c = counts(study)
    left = max(0, sc.n_trials - c["complete"] - c["pruned"] - c["fail"]) if c["planned"] else sc.n_trials
    workers = sc.workers or max_batch_size or 1
    if c["planned"]:
        log.info("search %s: continuing: %d of %d trials stored (%d completed, %d pruned, %d failed, %d interrupted)",
                 rc.study, c["complete"] + c["pruned"] + c["fail"], sc.n_trials, c["complete"], c["pruned"], c["fail"],
                 c["interrupted"])
    log.info("search %s: %s sampler, %s %s, %d trials to go, %d worker(s); study in %s", rc.study, sc.sampler,
             direction(sc), sc.metric, left, workers, study_dir(rc) / JOURNAL)
    return max(1, min(workers, left or 1))


# ----------------------------------------------------------------------------- a worker job

def n_trials(sc, params: list[Param]) -> int:
    """search.n_trials, capped at the grid's size for the grid sampler (each point once)."""
    if sc.sampler != "grid":
        return sc.n_trials
    return min(sc.n_trials, math.prod(len(p.grid()) for p in params))


def work(cfg: DictConfig, note: Callable[..., None], job: int = 0, show_progress: bool = False):
    """Ask, run, tell until the study holds search.n_trials trials. Returns the last outcome."""
    from ..job import Outcome, run as run_job, run_dir_for
    from ..run import preempt
    from ..compose import to_run_config

    base = to_run_config(cfg)
    sc = base.search
    params, _ = parse_space(OmegaConf.to_container(cfg.search.space), cfg, sc.sampler)
    total = n_trials(sc, params)
    study = open_study(base)
    folder = study_dir(base)
    with _Lock(folder):
        seed_offset = len(study.get_trials(deepcopy=False))
    # Reproducible for a fresh search; a relaunch (or a second worker) draws other points.
    study.sampler = make_sampler(sc, sc.seed + 1009 * seed_offset + job, params)
    last = None
    while True:
        with _Lock(folder):
            recover(study)
            c = counts(study)
            if c["waiting"] == 0 and c["planned"] >= total:
                break
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
        overrides = suggest(trial, params, cfg)
        trial.set_user_attr("overrides", overrides)
        log.info("trial %d of %d: %s", trial.number + 1, total, " ".join(overrides))
        try:
            rc = apply(cfg, overrides)
        except ConfigError as e:
            trial.set_user_attr("error", f"invalid config: {'; '.join(e.problems)}")
            from optuna.trial import TrialState

            study.tell(trial, state=TrialState.FAIL)
            last = Outcome("(invalid config)", "failed", f"invalid config: {'; '.join(e.problems)}")
            note(last, trial.number, overrides)
            continue
        run_dir = run_dir_for(rc)
        trial.set_user_attr("run_id", run_dir.name)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            last = run_job(rc, show_progress=show_progress)
        except BaseException:
            # Ctrl-C or a crash outside the run's own handling: the trial is asked again on relaunch.
            from optuna.trial import TrialState

            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        if last.status == "interrupted":
            from optuna.trial import TrialState

            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("error", last.error)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            note(last, trial.number, overrides)
            return last
        reused = last.status == "skipped" or (last.status == "pruned" and not _ran_now(run_dir, trial))
        _tell(study, trial, last.status, last.metrics or {}, last.error, run_dir, reused=reused)
        note(last, trial.number, overrides)
        if preempt.requested() is not None:  # a stop signal after the trial's training: no further trial
            return last
    return last


def _ran_now(run_dir: Path, trial) -> bool:
    """Whether the run's record was written by this trial (not an earlier trial with the same config)."""
    from ..run.record import read_record

    rec = read_record(run_dir) or {}
    try:
        started = time.mktime(time.strptime(rec.get("started_at", "")[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return True
    return started >= trial.datetime_start.timestamp() - 1


# ----------------------------------------------------------------------------- results

def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    return study.best_trial


def rerun_command(study, trial) -> str:
    """The command that trains the trial's config again, as a single run in a study of its own."""
    launch = [a for a in study.user_attrs.get("launch_overrides", []) if not a.startswith(("study=", "hydra.mode="))]
    args = launch + ["hydra.mode=RUN", f"study={study.study_name}-best"] + list(trial.user_attrs.get("overrides", []))
    return "lorasweep " + " ".join(shell_quote(a) for a in args)


def shell_quote(a: str) -> str:
    import shlex

    return a if all(ch.isalnum() or ch in "=._-/:+," for ch in a) else shlex.quote(a)


def compute(study) -> dict:
    """Optimizer steps the trials trained vs the same number of full runs."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and not t.user_attrs.get("interrupted")]
    spent = sum(int(t.user_attrs.get("steps", 0)) for t in trials)
    planned = [int(t.user_attrs.get("planned_steps", 0)) for t in trials if t.user_attrs.get("planned_steps")]
    full = max(planned) if planned else 0
    return {"trials": len(trials), "steps": spent, "full_run_steps": full, "full_steps": full * len(trials),
            "fraction": spent / (full * len(trials)) if full and trials else float("nan")}


def print_result(config: DictConfig) -> int:
    """The search's tally, best trial and compute, after the sweep's table; returns the failures
    that should fail the command (trials that crashed; a diverged trial is an answer, not a crash)."""
    from optuna.trial import TrialState

    from ..compose import to_run_config

    rc = to_run_config(job_config(config))
    try:
        study = open_study(rc)
    except Exception as e:  # noqa: BLE001 - the study was never made (refused config)
        log.debug("no study: %s", e)
        return 0
    c = counts(study)
    comp = compute(study)
    print(f"search {rc.study}: {c['complete'] + c['pruned'] + c['fail']} trials ({c['complete']} completed, "
          f"{c['pruned']} pruned, {c['fail']} failed"
          + (f", {c['interrupted']} interrupted and asked again" if c["interrupted"] else "") + ")"
          + (f"; {comp['steps']} optimizer steps = {100 * comp['fraction']:.0f}% of {comp['trials']} full runs "
             f"({comp['full_steps']} steps)" if comp["full_steps"] else ""))
    best = best_trial(study)
    if best is not None:
        print(f"best trial {best.number}: {study.user_attrs.get('metric')} = {best.value:.4g}  "
              f"[{' '.join(best.user_attrs.get('overrides', []))}]  run {best.user_attrs.get('run_id')}")
        print(f"  rerun: {rerun_command(study, best)}")
    print(f"  report: lorasweep-report {study_dir(rc)}")
    crashed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if not t.user_attrs.get("interrupted") and not t.user_attrs.get("reused")
               and "diverged" not in str(t.user_attrs.get("error", ""))]
    return len(crashed) + (1 if best is None else 0)
