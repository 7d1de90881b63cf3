"""One rank of a run on several processes: ``python -m torch.distributed.run ... -m lorasweep.distributed.rank SPEC``.

Started by distributed.py (the Hydra job that holds the run's lease and writes its record). Every
rank loads the model, applies the adapter, prepares the same seeded data and trains its rows of
each global micro-batch (shard.py). Rank 0 alone writes: the step lines (appended to the
steps.jsonl the launcher opened), the W&B run, checkpoints, the adapter, and ``.dist/result.json``
(status, metrics with every rank's memory), which the launcher turns into the record. A rank that
fails writes ``.dist/error-rank<k>.json`` first, so the launcher can name the rank and the error;
torchrun then stops the other ranks.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("lorasweep")

DIST_DIR = ".dist"
RESULT = "result.json"
# tests: "<rank>:<step>[:<text>]" raises in that rank after that step (of runs whose id contains <text>)
CRASH_ENV = "LORASWEEP_TEST_CRASH_RANK"
# tests: "<step>:<marker file>": rank 0 writes the marker after that step and waits for a stop
# request, so a test's signal lands in a known step whatever the machine's speed
HOLD_ENV = "LORASWEEP_TEST_HOLD_RANK"


def error_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / DIST_DIR / f"error-rank{rank}.json"


def load_config(config: dict):
    from omegaconf import OmegaConf

    from ..config import RunConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), config))


def _threads(cfg, local_world: int) -> int:
    if cfg.train.num_threads > 0:
        return cfg.train.num_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, local_world))  # the node's cores shared by its ranks


def _hold_hook(rank: int):
    """Tests: rank 0 holds after a given step until a stop signal reaches it (HOLD_ENV)."""
    spec = os.environ.get(HOLD_ENV, "")
    if not spec or rank != 0:
        return None
    from ..run import preempt

    want, marker = spec.split(":", 1)

    def after_step(step: int) -> None:
        if step == int(want):
            Path(marker).write_text(str(os.getpid()))
            while preempt.requested() is None:
                time.sleep(0.05)
    return after_step


def _crash_hook(rank: int, run_id: str):
    """A failure injected for tests, after a given step of a given rank."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return _hold_hook(rank)
    parts = spec.split(":")
    want_rank, want_step = int(parts[0]), int(parts[1])
    if len(parts) > 2 and parts[2] not in ("", "kill") and parts[2] not in run_id:
        return None

    kill = parts[-1] == "kill"  # the rank dies as the OOM killer would end it: no error of its own

    def after_step(step: int) -> None:
        if rank == want_rank and step >= want_step:
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure in rank {rank} after step {step}")
    return after_step


def train_rank(spec: dict, rank: int, world: int, local_rank: int) -> None:
    from ..run import adapter as adapter_stage
    from ..run import model as model_stage
    from ..run import preempt
    from ..run import pruner as pruning
    from ..run import train as train_stage
    from ..run.checkpoint import Checkpointer
    from ..run.loggers import make_logger
    from ..run.memory import PeakTracker, with_earlier_segments
    from ..run.record import write_json_atomic
    from .shard import RankCheckpointer, Shard, init_timeout, own_rng

    cfg = load_config(spec["config"])
    run_dir = Path(spec["run_dir"])
    t_start = time.perf_counter()
    if spec["device"] == "cuda":
        device = torch.device("cuda", local_rank)  # LOCAL_RANK picks this rank's GPU
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=init_timeout(),
                            **({"device_id": device} if device.type == "cuda" else {}))
    control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    random_seed = cfg.train.seed
    from ..run.pipeline import prepare_run_data, seed_everything  # the one-process run's seeding and data

    seed_everything(random_seed)
    mem = PeakTracker(device)
    mem.start("load")
    loaded, model, info = _build(cfg, device, cfg.train.grad_checkpointing)
    autocast = model_stage.forward_autocast(cfg.precision, loaded.compute_dtype)
    prepared = prepare_run_data(cfg, loaded.tokenizer)
    metrics: dict = {"time/load_s": time.perf_counter() - t_start, "params/trainable": info.trainable,
                     "params/total": info.total,
                     "params/trainable_pct": 100.0 * info.trainable / max(info.total, 1), **info.metrics()}

    shard = Shard(model, rank=rank, world=world, device=device, head=cfg.train.loss_head, control=control,
                  strategy=cfg.train.strategy)
    if rank > 0:
        torch.manual_seed(random_seed + rank)  # dropout draws differ by rank, as over one batch's rows
    checkpoints = Checkpointer(run_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    resume = checkpoints.load_latest() if spec["resume"] else None
    if resume is not None:
        resume = (resume[0], own_rng(resume[1], rank, world))

    steps_file = open(run_dir / "steps.jsonl", "a", buffering=1) if rank == 0 else None
    logger = (make_logger(cfg.logger, run_dir=run_dir, run_id=spec["run_id"], study=cfg.study,
                          config=spec["config"], wandb_id=spec.get("wandb_id")) if rank == 0 else None)

    def log_step(step: int, m: dict) -> None:
        if rank == 0:
            steps_file.write(json.dumps({"step": step, **m}) + "\n")
            logger.log(step, m)

    status, error, pruned = "completed", None, None
    earlier_mem: dict = {}  # the peaks of the segments before a resume (from the checkpoint)
    mem.start("train")
    try:
        with preempt.StopOnSignal():
            result = train_stage.train(model, prepared.train, cfg.optimizer, cfg.train, device=device,
                                       autocast_dtype=autocast, log=log_step, memory=mem,
                                       show_progress=spec["show_progress"] and rank == 0,
                                       after_step=_after_step(cfg, run_dir, prepared, shard, device, autocast,
                                                              _crash_hook(rank, spec["run_id"])),
                                       checkpointer=RankCheckpointer(checkpoints, shard), resume=resume, shard=shard)
    except preempt.Interrupted as e:
        status, error, result = "interrupted", str(e), None
    except pruning.RunPruned as e:  # every rank got rank 0's verdict at the same step
        status, error, result = "pruned", str(e), None
        metrics.update(e.metrics)
        pruned = e.decision.details()
        earlier_mem = getattr(e, "earlier_mem", None) or {}
    del resume
    mem.stop()
    peaks = shard.all_objects(mem.metrics())  # every rank's memory, to rank 0
    if shard.fsdp and result is not None:
        # rank 0 evaluates and saves alone: it gathers the sharded weights into a plain copy of the model
        full = shard.full_state_dict()
        if rank == 0:
            del shard, model
            model = _plain_model(cfg, device, full)
        del full
    if rank > 0:
        dist.destroy_process_group()
        return
    if steps_file is not None:
        steps_file.close()
    if result is not None:
        earlier_mem = result.earlier_mem or {}
    metrics.update(with_earlier_segments(rank_memory(peaks), earlier_mem))
    if result is not None:
        if result.resumed_from_step is not None:
            metrics["train/resumed_from_step"] = result.resumed_from_step
        metrics.update(result.metrics())
        dist.destroy_process_group()  # rank 0 evaluates alone; the other ranks have finished
        eval_mem = PeakTracker(device)
        eval_mem.start("eval")
        from ..run.pipeline import validation_scores

        metrics.update(validation_scores(cfg, model, prepared, loaded.tokenizer, device, autocast))
        if cfg.lora.method == "lora" and cfg.train.save_adapter and result.steps > 0:
            adapter_stage.save_adapter(model, info, run_dir / "adapter")
        if cfg.eval.tasks:
            from ..run.pipeline import base_scores, benchmark_scores, eval_deltas

            metrics.update(benchmark_scores(cfg, model, loaded.tokenizer, spec.get("include_path"), run_dir, device,
                                      "eval", spec["show_progress"], autocast))
            if cfg.eval.baseline:
                # The study's cached base scores, else a fresh unmodified base scored here: the
                # weights in memory are tuned now (and PiSSA/OLoRA or full fine-tuning change the base).
                del model
                loaded.model = None  # the tuned weights go before the base comes in
                eval_mem.start("eval_base")
                metrics.update(base_scores(cfg, lambda: _fresh_base(cfg, device), loaded.tokenizer,
                                            spec.get("include_path"), run_dir, device, spec["show_progress"], autocast))
            metrics.update(eval_deltas(metrics))
        eval_mem.close()
        for k, v in eval_mem.metrics().items():  # rank 0's evaluation: its own figures, in the run's max
            if k.startswith("mem/eval_"):
                metrics[k] = metrics[k.replace("mem/", "mem/rank0/", 1)] = v
            else:
                metrics[k] = max(metrics.get(k, 0.0), v)
                metrics[k.replace("mem/", "mem/rank0/", 1)] = max(metrics.get(k.replace("mem/", "mem/rank0/", 1), 0.0), v)
        checkpoints.clear()
    else:
        dist.destroy_process_group()
    if logger is not None:
        logger.summary(metrics)
        logger.close(0 if status == "completed" else 1)
    write_json_atomic(run_dir / DIST_DIR / RESULT, {"status": status, "error": error, "metrics": metrics,
                                                    "world_size": world, "pruned": pruned})


def _after_step(cfg, run_dir: Path, prepared, shard: Shard, device, autocast, then):
    """The loop's after_step hook: train.eval_every's validation curve and pruner (pruner.Watch),
    then ``then`` (a test's injected failure)."""
    from ..run import pruner as pruning
    from ..run import train as train_stage

    if not cfg.train.eval_every:
        return then
    n_steps = train_stage.total_steps(cfg.train, len(prepared.train))
    watch = pruning.Watch(cfg, run_dir, prepared.val, n_steps, shard=shard,
                          score=lambda val: shard.validation_loss(val, device, autocast))
    if then is None:
        return watch

    def both(step: int) -> None:
        watch(step)
        then(step)
    return both


def _build(cfg, device: torch.device, grad_checkpointing: bool):
    """The run's base model and adapter on this rank: (loaded, model, adapter info)."""
    from ..run import adapter as adapter_stage
    from ..run import model as model_stage

    loaded = model_stage.build_model(cfg.model, cfg.precision, device, grad_checkpointing,
                                     frozen_base=cfg.lora.method == "lora" and cfg.lora.bias == "none")
    model, info = adapter_stage.apply_adapter(
        loaded.model, cfg.lora, task=cfg.model.task, quantized=cfg.precision.quant != "none",
        grad_checkpointing=grad_checkpointing,
        source=model_stage.resolve_source(cfg.model) if cfg.lora.init == "loftq" else None)
    return loaded, model, info


def _fresh_base(cfg, device: torch.device) -> torch.nn.Module:
    """The run's base model as loaded before any adapter or step (for eval.baseline's scores)."""
    from ..run import model as model_stage

    return model_stage.build_model(cfg.model, cfg.precision, device, False, frozen_base=True).model


def _plain_model(cfg, device: torch.device, state: dict) -> torch.nn.Module:
    """The run's model built again unsharded (same base, same adapter) holding the gathered weights."""
    _, model, _ = _build(cfg, device, False)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return model


def rank_memory(peaks: list[dict]) -> dict:
    """mem/rank<k>/<figure> for every rank, and mem/<figure> = the largest over the ranks (what the
    busiest device needed; the planner predicts it)."""
    out: dict = {}
    for k, figures in enumerate(peaks):
        for name, v in figures.items():
            out[name.replace("mem/", f"mem/rank{k}/", 1)] = v
            out[name] = max(out.get(name, 0.0), v)
    return out


def main(argv: list[str]) -> int:
    from .torchrun import die_with_parent

    die_with_parent()  # no rank outlives its torchrun (itself tied to the launching job)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][rank " + os.environ.get("RANK", "?")
                        + "][%(levelname)s] %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        train_rank(spec, rank, world, local_rank)
    except BaseException as e:  # noqa: BLE001 - named for the launcher, then re-raised (torchrun stops the rest)
        from ..run.record import write_json_atomic

        write_json_atomic(error_path(Path(spec["run_dir"]), rank),
                          {"rank": rank, "error": f"{type(e).__name__}: {e}", "time": time.time(),
                           "traceback": traceback.format_exc()})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
