"""One run on this process, end to end: preflight -> model -> adapter -> data -> train -> evaluate -> record.

The only module that calls the stages; the stages import config types, not each other. Whether a
run trains at all (done before, held by another launch, several processes) is job.py's question;
the ranks of a run on several processes (distributed/rank.py) reuse the public steps here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import adapter as adapter_stage
from . import benchmarks as bench_stage
from . import basecache as base_cache
from . import classification as cls_stage
from . import compiling
from . import data as data_stage
from . import evaluate as eval_stage
from . import forecast
from . import model as model_stage
from . import train as train_stage
from ..config import DataConfig, RunConfig, exact_base_at_start, run_id as make_run_id, to_dict
from . import preempt
from . import pruner as pruning
from .checkpoint import Checkpointer
from ..config import resolve as resolve_config
from .loss import describe as describe_loss
from .loggers import make_logger
from .memory import PeakTracker, release_memory, with_earlier_segments
from .record import RunRecord, write_json_atomic

log = logging.getLogger("lorasweep")


class PreflightError(ValueError):
    """Bad input found before any weights load (needs at most the model skeleton or the data file)."""


@dataclass
class Outcome:
    run_id: str
    status: str  # completed | failed | skipped | pruned | interrupted | elsewhere (another launch holds its lease)
    # | follower (node k > 0 of a multi-node run: node 0 records it)
    error: str | None = None
    run_dir: str | None = None
    metrics: dict | None = None


def run_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / cfg.study / make_run_id(cfg)


GENERATED_TASK = "lorasweep_arithmetic"  # + _ll: the project's own held-out arithmetic split


def prepare_tasks(cfg: RunConfig, tokenizer, run_dir: Path) -> str | None:
    """The include_path for lm-eval: generated arithmetic tasks (rendered with the training
    template) and a copy of the user's task folder, so the record keeps what was scored."""
    if not cfg.eval.tasks:
        return None
    folder = run_dir / "eval_tasks"
    dc = cfg.data if cfg.data.name == "arithmetic" else DataConfig(name="arithmetic")
    rows = data_stage.arithmetic_splits(dc)["test"]
    bench_stage.write_local_tasks(folder, GENERATED_TASK, data_stage.eval_records(rows, tokenizer, dc),
                                  max_gen_toks=cfg.eval.max_new_tokens)
    if cfg.eval.include_path:
        shutil.copytree(os.path.expanduser(cfg.eval.include_path), folder / "user")
    return str(folder)


def preflight(cfg: RunConfig, run_dir: Path | None = None) -> str | None:
    """Everything checkable without weights: targets on the meta skeleton, the data file, task names.
    Returns the lm-eval include_path to use."""
    problems = []
    include_path = None
    try:
        skeleton = model_stage.build_skeleton(cfg.model)
    except OSError as e:
        raise PreflightError(f"model.name_or_path={cfg.model.name_or_path!r}: cannot read the model config ({e})") from None
    try:
        if cfg.lora.method == "lora":
            adapter_stage.resolve_targets(cfg.lora.targets, skeleton)
            problems.extend(adapter_stage.pattern_problems(cfg.lora, skeleton))  # rank_pattern keys, exclusions
        elif cfg.lora.method == "partial":
            adapter_stage.resolve_targets(cfg.lora.trainable, skeleton, field_name="lora.trainable")
    except adapter_stage.TargetError as e:
        problems.append(str(e))
    del skeleton
    classify = cfg.model.task == "sequence_classification"
    if classify or cfg.data.name in ("sst2", "text_classification"):
        problems.extend(cls_stage.preflight_problems(cfg))  # task/data pairing, columns, labels
    elif cfg.data.path:
        try:
            data_stage.load_raw(cfg.data)
        except data_stage.DataError as e:
            problems.append(str(e))
    from .data import source_config  # data.mix and eval.val_sets files read back before weights load

    for where, spec in [(f"data.mix[{i}]", m) for i, m in enumerate(cfg.data.mix or [])] + \
                       [(f"eval.val_sets.{k}", v) for k, v in (cfg.eval.val_sets or {}).items()]:
        try:
            data_stage.load_raw(source_config(spec)[0])
        except data_stage.DataError as e:
            problems.append(f"{where}: {e}")
    if cfg.eval.tasks and run_dir is not None:
        include_path = prepare_tasks(cfg, model_stage.load_tokenizer(cfg.model), run_dir)
        try:
            bench_stage.check_tasks(list(cfg.eval.tasks), include_path)
        except ValueError as e:
            problems.append(f"eval.tasks: {e}")
    if problems:
        raise PreflightError("; ".join(problems))
    return include_path


def _rng_states() -> tuple:
    """Every random stream a scorer may reseed: python, numpy, torch's CPU and (once started) CUDA's."""
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state(), cuda


def _set_rng_states(states: tuple) -> None:
    import numpy as np

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def benchmark_scores(cfg: RunConfig, model, tokenizer, include_path, run_dir: Path, device, prefix: str,
               show_progress: bool, autocast_dtype: torch.dtype | None = None) -> dict:
    # lm-eval reseeds torch (CUDA included) / numpy / random: the run's streams continue as if it
    # had not run, so a run that scored the base and one that reused the score train alike.
    states = _rng_states()
    try:
        m = _score(cfg, model, tokenizer, include_path, run_dir, device, prefix, show_progress, autocast_dtype)
    finally:
        _set_rng_states(states)
    m[f"time/{prefix}_s"] = m.pop(f"{prefix}/time_s", 0.0)
    return m


def _score(cfg: RunConfig, model, tokenizer, include_path, run_dir: Path, device, prefix: str,
           show_progress: bool, autocast_dtype: torch.dtype | None = None) -> dict:
    ev = cfg.eval
    # scored in the run's precision: a mixed (or 16-bit 4-bit) arm under the autocast it trained under
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return bench_stage.evaluate_benchmarks(
            model, tokenizer, tasks=list(ev.tasks), include_path=include_path, limit=ev.limit,
            num_fewshot=ev.num_fewshot, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
            log_samples=ev.log_samples, out_dir=run_dir, prefix=prefix, device=str(device),
            show_progress=show_progress)


def base_scores(cfg: RunConfig, model, tokenizer, include_path, run_dir: Path, device, show_progress: bool,
                 autocast_dtype: torch.dtype | None = None) -> dict:
    """The base model's scores, computed once per study for each (model, precision, eval, data)
    setting: every run of a sweep over LoRA settings shares the same base, so they share its scores.
    ``model``: the base model, or a function that loads it (called only on a cache miss)."""
    rc = resolve_config(cfg, device.type)  # resolved: a CPU and a GPU run never share a base score
    ident = {"model": dataclasses.asdict(rc.model), "precision": dataclasses.asdict(rc.precision),
             "device": rc.train.device,
             "data": dataclasses.asdict(cfg.data), "max_seq_len": cfg.train.max_seq_len,
             "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("baseline", "log_samples", "val_loss")}}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cached = Path(cfg.results_dir) / cfg.study / ".base_scores" / f"{key}.json"
    if cached.exists() and not cfg.rerun:
        m = json.loads(cached.read_text())
        log.info("base-model scores reused from %s (same model, precision, data and eval settings)", cached)
        return {**m, "eval_base/reused": 1, "time/eval_base_s": 0.0}
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model()  # a loader: the base is loaded only when its scores are not cached yet
    m = benchmark_scores(cfg, model, tokenizer, include_path, run_dir, device, "eval_base", show_progress, autocast_dtype)
    write_json_atomic(cached, m)
    return m


def eval_deltas(metrics: dict) -> dict:
    """eval_delta/<task>/<metric> = tuned - base, for every scored metric (not stderr)."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("eval/") and not k.endswith("_stderr"):
            base = metrics.get("eval_base/" + k[len("eval/"):])
            if isinstance(base, (int, float)) and isinstance(v, (int, float)):
                out["eval_delta/" + k[len("eval/"):]] = v - base
    return out


class OverBudget(RuntimeError):
    """The plan says this run exceeds planner.budget_gb: recorded as skipped, nothing loaded."""


def plan_run(cfg: RunConfig, device: torch.device):
    """The memory plan (planner.py), or None: a planner problem must never fail the run."""
    from .planner import plan_run

    try:
        return plan_run(cfg, device_type=device.type)
    except Exception as e:  # noqa: BLE001
        log.warning("memory plan unavailable: %s", e)
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _run_env(device: torch.device, loaded, model) -> dict:
    """What this run computes with, resolved: the record's env keeps it beside the config's `auto`s."""
    config = getattr(model, "config", None) or getattr(loaded.model, "config", None)
    return {"device": str(device), "compute_dtype": str(loaded.compute_dtype).replace("torch.", ""),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "tf32": model_stage.tf32_enabled() if device.type == "cuda" else False}


def prepare_run_data(cfg: RunConfig, tokenizer):
    """The run's batches (instruction data, or classification data for a classifier); one place,
    so a one-process run and every rank of a several-process run see the same examples."""
    if cfg.model.task == "sequence_classification":
        return cls_stage.prepare_data(cfg.data, tokenizer, num_labels=cfg.model.num_labels,
                                      max_seq_len=cfg.train.max_seq_len, batch_size=cfg.train.batch_size,
                                      seed=cfg.train.seed, group_by_length=cfg.train.group_by_length,
                                      eval_batch_size=None if cfg.eval.batch_size == "auto" else cfg.eval.batch_size)
    return data_stage.prepare_data(cfg.data, tokenizer, max_seq_len=cfg.train.max_seq_len,
                                   batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   group_by_length=cfg.train.group_by_length, packing=cfg.train.packing)


def validation_scores(cfg: RunConfig, model, prepared, tokenizer, device, autocast_dtype) -> dict:
    """val/* on the run's own validation split, then val/<name>/* on each eval.val_sets set (the same
    objective); time/val_s covers both. One place for a one-process run and for rank 0."""
    if not cfg.eval.val_loss or prepared.val is None:
        return {}
    if cfg.model.task == "sequence_classification":
        return cls_stage.evaluate(model, prepared.val, device=device, autocast_dtype=autocast_dtype)  # + accuracy, f1
    kw = dict(device=device, autocast_dtype=autocast_dtype, loss_head=cfg.train.loss_head)
    metrics = eval_stage.validation_loss(model, prepared.val, **kw)
    if cfg.eval.val_sets:
        sets = data_stage.val_set_batches(cfg.data, dict(cfg.eval.val_sets), tokenizer,
                                          max_seq_len=cfg.train.max_seq_len, batch_size=cfg.train.batch_size,
                                          seed=cfg.train.seed)
        more = eval_stage.named_validation_losses(model, sets, **kw)
        metrics["time/val_s"] += more.pop("time/val_s", 0.0)
        metrics.update(more)
    if cfg.eval.test_loss:
        test = data_stage.test_batches(cfg.data, prepared.test_rows, tokenizer, max_seq_len=cfg.train.max_seq_len,
                                       batch_size=cfg.train.batch_size, seed=cfg.train.seed)
        m = eval_stage.validation_loss(model, test, **kw)
        metrics["time/val_s"] += m["time/val_s"]
        metrics.update({"test/loss": m["val/loss"], "test/perplexity": m["val/perplexity"], "test/tokens": m["val/tokens"]})
    return metrics


def _param_table(run_dir: Path, info: adapter_stage.AdapterInfo) -> None:
    lines = ["name\ttrainable\tcount"] + [f"{n}\t{t}\t{c}" for n, t, c in info.table]
    (run_dir / "params.tsv").write_text("\n".join(lines) + "\n" + f"# {info.summary_line}\n")


class LeaseLost(RuntimeError):
    """Another launch took this run over (this process stalled past the lease timeout)."""


def train_run(cfg: RunConfig, rid: str, run_dir: Path, lease, show_progress: bool) -> Outcome:
    """The run itself, on this process; every write to its folder happens here, under ``lease``
    (held by the caller, job.py: ``lease.held()`` is asked before each write)."""
    config = to_dict(cfg)
    record = RunRecord(run_dir, rid, cfg.study, config)

    def guard() -> None:  # before every write: a launch that lost its lease writes nothing more
        if not lease.held():
            raise LeaseLost(f"another launch took {rid} over; this one stops writing to it")

    checkpoints = Checkpointer(run_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints, guard=guard)
    resume = None if cfg.rerun else checkpoints.load_latest()  # a killed attempt's newest whole checkpoint
    if resume is not None:
        from_step = resume[1]["progress"]["step"]
        log.info("resume %s from its checkpoint at step %d", rid, from_step)
        record.resume(from_step)
    else:
        record.data["wandb_id"] = f"{rid[-8:]}-{uuid.uuid4().hex[:8]}"  # kept by a resumed attempt
        record.start(OmegaConf.to_yaml(OmegaConf.create(config)))
    logger = None
    metrics: dict = {}
    extra: dict = {}  # record fields beside the metrics (a pruned run's verdict)
    status, error = "failed", None
    t_start = time.perf_counter()
    device = model_stage.pick_device(cfg.train.device)
    base_cache.evict_unless(cfg, device)  # before the peak reset: an unused cached base must not count
    release_memory()
    # Process-wide state a run changes, restored after it so the next run of a one-process sweep
    # starts as a fresh process would: torch's intra-op thread count (train.num_threads).
    threads_before = torch.get_num_threads()
    restore_tf32 = model_stage.set_tf32(cfg.precision.tf32) if device.type == "cuda" else None  # also process-wide
    mem = PeakTracker(device)  # resets the process peak: this run's figures are its own
    mem.start("load")
    loaded = model = probe = None
    earlier_mem: dict = {}
    try:
        include_path = preflight(cfg, run_dir)
        planned = plan_run(cfg, device)  # meta skeleton only: the prediction exists before any weight loads
        metrics.update(planned.metrics() if planned else {})
        if planned and cfg.planner.budget_gb is not None and planned.device_gb > cfg.planner.budget_gb:
            raise OverBudget(f"predicted peak {planned.device_gb:.2f} GB > planner.budget_gb={cfg.planner.budget_gb}"
                             + (f" ({planned.peak_gb:.2f} GB allocated + CUDA context and allocator slack)"
                                if planned.device == "cuda" else ""))
        logger = make_logger(cfg.logger, run_dir=run_dir, run_id=rid, study=cfg.study, config=config,
                             wandb_id=record.data.get("wandb_id"))
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)  # process-wide: restored in `finally`
        seed_everything(cfg.train.seed)

        t0 = time.perf_counter()
        loaded, reused = base_cache.acquire(cfg, device)  # a fresh load unless train.reuse_base
        metrics["model/base_reused"] = int(reused)
        autocast = model_stage.forward_autocast(cfg.precision, loaded.compute_dtype)  # train, val and lm-eval
        base_first = bool(cfg.eval.tasks and cfg.eval.baseline) and not exact_base_at_start(cfg.lora)
        if base_first:  # PiSSA/OLoRA rewrite the base, LoftQ starts off it: score the unmodified model now
            t_eval = time.perf_counter()
            mem.start("eval_base")
            metrics.update(base_scores(cfg, loaded.model, loaded.tokenizer, include_path, run_dir, device,
                                        show_progress, autocast))
            mem.start("adapter")
            t0 += time.perf_counter() - t_eval
        model, info = adapter_stage.apply_adapter(
            loaded.model, cfg.lora, task=cfg.model.task, quantized=cfg.precision.quant != "none",
            grad_checkpointing=cfg.train.grad_checkpointing,
            source=model_stage.resolve_source(cfg.model) if cfg.lora.init == "loftq" else None)
        if cfg.precision.quant != "none":  # activations in the compute dtype, not peft's fp32 upcast
            model_stage.keep_compute_dtype(model, loaded.compute_dtype)
        probe = model_stage.ActivationProbe(model)
        record.data["env"].update(_run_env(device, loaded, model))
        metrics["time/load_s"] = time.perf_counter() - t0
        metrics["params/trainable"] = info.trainable
        metrics["params/total"] = info.total
        metrics["params/trainable_pct"] = 100.0 * info.trainable / max(info.total, 1)
        metrics.update(info.metrics())  # lora/variant, lora/scaling
        record.data["env"]["loss_path"] = describe_loss(model, cfg.train.loss_head, device, cfg.model.task)
        _param_table(run_dir, info)
        log.info("%s | %s | targets: %s", rid, info.summary_line, ",".join(info.target_modules) or "-")

        classify = cfg.model.task == "sequence_classification"
        prepared = prepare_run_data(cfg, loaded.tokenizer)
        steps = train_stage.total_steps(cfg.train, len(prepared.train))
        log.info("data: %d train examples, %d batches/epoch of %d; %d optimizer steps of %d sequences",
                 prepared.n_train_examples, len(prepared.train), cfg.train.batch_size, steps,
                 cfg.train.batch_size * cfg.train.grad_accum)

        def log_step(step: int, m: dict) -> None:
            guard()
            record.log_step(step, m)
            logger.log(step, m)

        if cfg.eval.tasks and cfg.eval.baseline and not base_first:
            # Before any step the adapter is the identity (B = 0): this scores the base model.
            mem.start("eval_base")
            metrics.update(base_scores(cfg, model, loaded.tokenizer, include_path, run_dir, device, show_progress,
                                        autocast))
        if cfg.model.task == "causal_lm" and steps > 0 and cfg.planner.forecast:
            mem.start("probe")
            fc = forecast.measure(forecast.forecast_run(cfg, model_stage.build_skeleton(cfg.model), prepared, steps,
                                                        device), cfg, rid, model, prepared, device, autocast)
            metrics.update(fc.metrics())
            record.data["forecast"] = fc.record()
            if fc.train_s is not None:
                log.info("forecast: training %.1f s, validation %.1f s (%.3g TFLOP at %.3g TFLOP/s; %s)", fc.train_s,
                         fc.eval_s or 0.0, fc.train_flops / 1e12, fc.throughput.flops_per_s / 1e12, fc.throughput.detail)
        watch = None  # train.eval_every: a validation curve, and the pruner's verdict at each point
        if cfg.train.eval_every:
            periodic = cls_stage.evaluate if classify else eval_stage.validation_loss
            watch = pruning.Watch(cfg, run_dir, prepared.val, steps, guard=guard,
                                  score=lambda val: periodic(model, val, device=device, autocast_dtype=autocast))
        mem.start("train")
        metrics.update(compiling.compile_for_training(model, prepared.train, cfg.train, device=device,
                                                      autocast_dtype=autocast))  # train.compile
        result = train_stage.train(model, prepared.train, cfg.optimizer, cfg.train, device=device, after_step=watch,
                                   autocast_dtype=autocast, log=log_step, memory=mem, show_progress=show_progress,
                                   checkpointer=checkpoints, resume=resume)
        del resume  # the checkpoint's tensors are in the model and optimizer now
        earlier_mem = result.earlier_mem or {}
        if result.resumed_from_step is not None:
            metrics["train/resumed_from_step"] = result.resumed_from_step
        compiling.uncompile(model)  # validation and generation run eager
        metrics.update(result.metrics())

        guard()  # lm-eval writes its results and samples into the run folder
        mem.start("eval")
        metrics.update(validation_scores(cfg, model, prepared, loaded.tokenizer, device, autocast))
        if cfg.eval.tasks:
            metrics.update(benchmark_scores(cfg, model, loaded.tokenizer, include_path, run_dir, device, "eval",
                                      show_progress, autocast))
            metrics.update(eval_deltas(metrics))
        mem.stop()

        if cfg.lora.method == "lora" and cfg.train.save_adapter and result.steps > 0:
            guard()
            adapter_stage.save_adapter(model, info, run_dir / "adapter")  # PiSSA/OLoRA: as a plain LoRA
        checkpoints.clear()  # a completed run resumes nothing; checkpoints of a 7B full fine-tune are large
        status = "completed"
    except preempt.Interrupted as e:
        status, error = "interrupted", str(e)
        log.warning("run %s %s", rid, error)
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt (second Ctrl-C): stopped mid-step, resumes from the last checkpoint"
        raise
    except pruning.RunPruned as e:
        status, error = "pruned", str(e)
        metrics.update(e.metrics)
        earlier_mem = getattr(e, "earlier_mem", None) or {}
        extra["pruned"] = e.decision.details()
        log.info("prune %s at step %d: %s", rid, e.decision.step, error)
    except OverBudget as e:
        status, error = "skipped", str(e)
        log.info("skip %s: %s", rid, error)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, never raised into the sweep
        error = f"{type(e).__name__}: {e}" if not isinstance(e, PreflightError) else str(e)
        if lease.held():
            (run_dir / "error.log").write_text(traceback.format_exc())
        log.error("run %s failed: %s", rid, error)
    finally:
        mem.close()
        metrics.update(with_earlier_segments(mem.metrics(), earlier_mem))
        metrics["time/total_s"] = time.perf_counter() - t_start
        if probe is not None:
            probe.close()
            record.data["env"]["activation_dtype"] = probe.dtype  # the residual stream's, first block out
        try:
            if lease.held():
                record.finish(status, metrics, error, **extra)
        finally:
            if logger is not None:
                logger.summary(metrics)
                logger.close(0 if status == "completed" else 1)
            base_cache.release(model)  # unload the adapter, check the cached base's hash
            del model, loaded
            release_memory()
            torch.set_num_threads(threads_before)
            if restore_tf32 is not None:
                restore_tf32()
    return Outcome(rid, status, error, str(run_dir), metrics)
