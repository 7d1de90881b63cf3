"""One rank of a run on several processes (train.devices x train.nodes > 1, strategy ddp or fsdp).

Every rank iterates the same seeded micro-batches (data.Batches) and trains on its own contiguous
rows of each one (rank 0 the first rows); the step's loss-token total is counted on the host from
the whole global micro-batch, so it is known on every rank without communication. Each rank's loss
is (its rows' loss sum) / (the step's total) x world, and DDP averages the gradients over the
ranks: the result is the one-process gradient of the whole global batch. DDP all-reduces on the
step's last micro-batch only (``no_sync`` before it).

Besides the gradients, three things are agreed over the ranks, on a gloo group (host tensors, so
a GPU never waits for them): the logged loss (summed over ranks on logging steps only), stop
requests (preemption signals: every rank stops after the same step), and the checkpoint's RNG
states (rank 0 writes every rank's).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..run.checkpoint import SHARDED, Checkpointer, Progress, rng_state
from ..run.loss import batch_loss_sum

log = logging.getLogger("lorasweep")

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
ROW_WEIGHT = "row_weight"


class LossModule(torch.nn.Module):
    """What DDP wraps: the run's loss sum, so DDP sees the forward whose backward it reduces."""

    def __init__(self, model: torch.nn.Module, head: str):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, inputs: dict, weight: float = 1.0) -> torch.Tensor:
        loss = batch_loss_sum(self.model, inputs, self.head)
        return loss if weight == 1.0 else loss * weight


def row_slice(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this rank's rows of an n-row micro-batch: contiguous, sizes differ by <= 1."""
    base, extra = divmod(n_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes (LlamaDecoderLayer, ...): what each FSDP unit holds. Hugging
    Face models name them in ``_no_split_modules``, the units that must stay whole on one device."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


class Shard:
    """This rank's part of the run. ``strategy`` ddp: every rank holds the whole model, DDP all-reduces
    the gradients. fsdp: FSDP2 (``fully_shard``) shards every parameter, gradient and optimizer state
    over the ranks, one unit per transformer block plus the root (embeddings, final norm, head); the
    gradients are reduce-scattered with the same mean over ranks as DDP's, so the step is the same."""

    def __init__(self, model: torch.nn.Module, *, rank: int, world: int, device: torch.device, head: str,
                 control=None, strategy: str = "ddp"):
        self.rank, self.world, self.device = rank, world, device
        self.control = control  # a gloo group for host-side agreements (None = the default group)
        self.fsdp = strategy == "fsdp"
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            self.module = LossModule(model, head)
            blocks = block_classes(model)
            units = [m for m in model.modules() if type(m).__name__ in blocks]
            if not units:
                raise RuntimeError(f"train.strategy=fsdp: no transformer blocks found in {type(model).__name__} "
                                   "(no _no_split_modules); use train.strategy=ddp")
            for unit in units:
                fully_shard(unit)
            fully_shard(self.module)  # the root: embeddings, final norm and the output head
            self.ddp = self.module
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(LossModule(model, head), device_ids=[device.index] if device.type == "cuda" else None)

    def full_state_dict(self) -> dict:
        """fsdp: the whole model's weights gathered to rank 0's host memory (a collective: every rank
        calls it); keys as the unwrapped model's own state_dict. Other ranks get {}."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k[len("model."):]: v for k, v in sd.items()}

    def _sharded_state(self, opt) -> dict:
        """The trainable weights and optimizer states as this rank's shards (DTensors), keyed as
        torch.distributed.checkpoint wants them; frozen weights are the base model's, not saved."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, opt, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model_sd, "optim": optim_sd}

    def save_sharded(self, opt, folder) -> None:
        """Every rank writes its own shards into ``folder`` (a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(opt), checkpoint_id=str(folder), process_group=self.control)

    def load_sharded(self, opt, folder) -> None:
        """A sharded checkpoint put back into this rank's shards (a collective). DCP reshards on load,
        so a run may resume on another number of ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._sharded_state(opt)  # the shapes to read into (initialises an empty optimizer's state)
        dcp.load(state, checkpoint_id=str(folder), process_group=self.control)
        # strict=False: the frozen base weights are not in it (dcp.load above fails on a missing trainable one)
        set_state_dict(self.module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))

    def validation_loss(self, val, device: torch.device, autocast_dtype: torch.dtype | None) -> dict:
        """The periodic validation loss (train.eval_every), computed by every rank on the same
        batches through the loss module: FSDP's forward is a collective, and a DDP rank holds the
        whole model. The one-process run's sum over the same loss tokens."""
        from ..run.evaluate import validation_loss

        module = self.module if self.fsdp else self.ddp.module
        return validation_loss(module, val, device=device, autocast_dtype=autocast_dtype, loss_sum=module)

    def rows(self, batch: dict) -> dict:
        """This rank's rows of a global micro-batch. An epoch's short last micro-batch may leave a
        rank no row: it then runs the batch's first row with weight 0 (DDP needs every rank's
        backward; the gradient it adds is zero)."""
        n = batch["labels"].shape[0]
        start, stop = row_slice(n, self.rank, self.world)
        weight = 1.0
        if start == stop:
            start, stop, weight = 0, 1, 0.0
        out = {k: batch[k][start:stop] for k in MODEL_INPUTS if k in batch}
        out[ROW_WEIGHT] = weight
        return out

    def sync(self, last: bool):
        """Gradients are all-reduced (fsdp: reduce-scattered) on the step's last micro-batch only."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def loss_sum(self, inputs: dict, rows: dict, head: str) -> torch.Tensor:
        return self.ddp(inputs, rows.get(ROW_WEIGHT, 1.0))

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu", torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.control)
        return t

    def agree_stop(self, signum: int | None) -> int | None:
        """The stop request of any rank, seen by all after the same step (else ranks part ways and hang)."""
        t = torch.tensor([signum or 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        got = int(t.item())
        return signal.Signals(got) if got else None

    def all_objects(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.control)


class RankCheckpointer:
    """Checkpoints of a run on several ranks. ddp: weights, optimizer, scheduler and progress are the
    same on every rank, so rank 0 writes them. fsdp: each rank writes its own shards of the trainable
    weights and optimizer states (torch.distributed.checkpoint, ``sharded/``) into one folder, then
    rank 0 adds the rest and commits it. Each rank's RNG state differs (dropout), so rank 0 writes all
    of them (``rng_ranks``). No rank goes on until the checkpoint is on disk."""

    def __init__(self, inner: Checkpointer, shard: Shard):
        self.inner, self.shard = inner, shard

    def due(self, step: int) -> bool:
        return self.inner.due(step)

    def save(self, model, opt, sched, scaler, progress: Progress):
        extra = {"rng_ranks": self.shard.all_objects(rng_state()), "world_size": self.shard.world}
        if not self.shard.fsdp:
            path = self.inner.save(model, opt, sched, scaler, progress, extra=extra) if self.shard.rank == 0 else None
            self.shard.barrier()
            return path
        t0 = time.perf_counter()
        if self.shard.rank == 0:
            self.inner.begin(progress.step, tag="sharded")
        self.shard.barrier()  # the folder is there (and empty) before any rank writes
        tmp = self.inner.tmp_folder(progress.step, tag="sharded")
        self.shard.save_sharded(opt, tmp / SHARDED)
        path = None
        if self.shard.rank == 0:
            Checkpointer.write_state(tmp, sched, scaler, progress, extra)
            path = self.inner.commit(tmp, progress.step)
            log.info("sharded checkpoint at step %d (%.2f s): %s", progress.step, time.perf_counter() - t0, path)
        self.shard.barrier()
        return path


def own_rng(state: dict, rank: int, world: int) -> dict:
    """A checkpoint's state with ``rng`` set to this rank's stream (when it was saved by as many ranks)."""
    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == world:
        return {**state, "rng": ranks[rank]}
    return state


def init_timeout() -> timedelta:
    import os

    return timedelta(seconds=float(os.environ.get("LORASWEEP_DIST_TIMEOUT_S", 600)))
