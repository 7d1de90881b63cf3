"""One run on several processes (train.devices > 1, DDP over gloo on the CPU): the same losses and
weights as one process on the same global batches, one record written by rank 0, and a failing
rank that fails its run and not the sweep, leaving no process behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from slurm_fixture import local_slurm  # noqa: F401  (pytest fixture)
from lorasweep import job
from lorasweep.config import ConfigError, run_id, validate
from lorasweep.run.pruner import read_curve
from lorasweep.distributed.shard import row_slice

# 21 examples in micro-batches of 4: each epoch ends on a one-row micro-batch, which leaves rank 1
# no row (it runs with weight 0); accumulation 2 puts it in a short step of its own.
ARGS = ["model=tiny_llama", "logger=none", "eval=val", "lora.dropout=0", "train.batch_size=4",
        "train.grad_accum=2", "train.max_seq_len=80", "data.n_train=21", "data.n_val=8", "data.n_test=8",
        "train.max_steps=20", "train.log_every=1", "train.num_threads=1", "optimizer.lr=5e-3"]
METHODS = {"lora": ["lora=r8_a16_qv"], "full": ["lora=full"]}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [((d := json.loads(l))["step"], d["train/loss"]) for l in (run_dir / "steps.jsonl").read_text().splitlines()]


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorasweep.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_same_adapter(got_run: Path, want_run: Path, atol: float) -> None:
    a = load_file(str(got_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(want_run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def _assert_same_run(run_dir: Path, ref_dir: Path, atol: float) -> None:
    """Every step's loss (one line per step) and the validation loss are the reference run's."""
    got, want = _losses(run_dir), _losses(ref_dir)
    assert [s for s, _ in got] == list(range(1, 21))
    for (s, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=atol), (run_dir.name, s)
    ref = json.loads((ref_dir / "record.json").read_text())["metrics"]
    got_val = json.loads((run_dir / "record.json").read_text())["metrics"]["val/loss"]
    assert got_val == pytest.approx(ref["val/loss"], abs=atol)


def _leftovers(marker: str) -> list[str]:
    """Ranks or torchruns still running whose command line names ``marker`` (a test's own folder)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and ("lorasweep.distributed.rank" in cmd or "lorasweep.distributed.torchrun" in cmd):
                out.append(f"{p.name}: {cmd}")
    return out


def test_rows_split_contiguously():
    assert [row_slice(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [row_slice(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [row_slice(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]  # rank 1: no row


def test_bad_combinations_refused_before_launch(tmp_path):
    for overrides, field in ((["train.devices=2", "train.batch_size=7"], "train.batch_size=7"),
                             (["train.devices=2", "train.nodes=2", "train.batch_size=6"], "train.batch_size=6"),
                             (["train.devices=0"], "train.devices=0"),
                             (["train.devices=2", "train.strategy=fsdp", "precision=nf4"], "train.strategy='fsdp'"),
                             (["train.strategy=zero3"], "train.strategy='zero3'"),
                             (["train.devices=2", "train.compile=true"], "train.compile=True")):
        with pytest.raises(ConfigError) as e:
            validate(compose(*ARGS, f"results_dir={tmp_path}", *overrides))
        assert any(p.startswith(field) for p in e.value.problems), e.value.problems
    assert not any(tmp_path.iterdir())  # refused before any folder


def test_process_count_is_not_part_of_the_run_id():
    one = compose(*ARGS)
    assert run_id(one) == run_id(compose(*ARGS, "train.devices=2")) == run_id(compose(*ARGS, "train.devices=4"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: each method on one process, global micro-batch 4."""
    root = tmp_path_factory.mktemp("one")
    dirs = {}
    for name, extra in METHODS.items():
        out = job.run(compose(*ARGS, *extra, f"results_dir={root}", "study=one"), show_progress=False)
        assert out.status == "completed", out.error
        dirs[name] = Path(out.run_dir)
    return dirs


@pytest.mark.slow
def test_two_process_sweep_matches_one_process(one_process, tmp_path):
    """A 2-run sweep (LoRA, full fine-tuning), each run on 2 processes x 2 rows: same per-step losses
    and final weights as one process x 4 rows; rank 0 alone wrote the run folder; memory per rank."""
    res = _cli("-m", "launcher=local", *ARGS, "lora=r8_a16_qv,full", "train.devices=2",
               f"results_dir={tmp_path}/r", "study=two", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, ref_dir in one_process.items():
        run_dir = tmp_path / "r" / "two" / ref_dir.name  # the same run id: same computation
        rec = json.loads((run_dir / "record.json").read_text())
        assert rec["status"] == "completed", rec["error"]
        assert rec["env"]["world_size"] == 2 and rec["env"]["backend"] == "gloo"
        got, want = _losses(run_dir), _losses(ref_dir)
        assert [s for s, _ in got] == list(range(1, 21))  # one line per step: rank 0 alone logs
        for (s, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-5), (name, s)
        m, ref = rec["metrics"], json.loads((ref_dir / "record.json").read_text())["metrics"]
        assert m["val/loss"] == pytest.approx(ref["val/loss"], abs=1e-5)
        assert m["train/tokens"] == ref["train/tokens"]  # the global count, not rank 0's share
        for k in ("mem/rank0/train_peak_rss_gb", "mem/rank1/train_peak_rss_gb", "mem/peak_rss_gb"):
            assert m[k] > 0, k
        assert m["mem/peak_rss_gb"] >= max(m["mem/rank0/peak_rss_gb"], m["mem/rank1/peak_rss_gb"])
        assert m["plan/per_rank_batch"] == 2
        # what rank 0 (and the job) wrote; no rank folder or per-rank copy of anything
        assert {p.name for p in run_dir.iterdir()} <= {"record.json", "steps.jsonl", "config.yaml", "adapter",
                                                       "params.tsv", "ranks.log", ".dist"}
        assert {p.name for p in (run_dir / ".dist").iterdir()} == {"spec-node0.json", "result.json"}
    _assert_same_adapter(tmp_path / "r" / "two" / one_process["lora"].name, one_process["lora"], atol=1e-5)
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_fsdp_two_process_sweep_matches_one_process(one_process, tmp_path):
    """FSDP2 (fully_shard, gloo on the CPU) with gradient checkpointing: weights, gradients and
    optimizer states sharded over 2 ranks train LoRA and full fine-tuning to the one-process losses,
    val loss and adapter (FSDP without gradient checkpointing: the resume test below)."""
    res = _cli("-m", "launcher=local", *ARGS, "lora=r8_a16_qv,full", "train.devices=2", "train.strategy=fsdp",
               "train.grad_checkpointing=true", "train.eval_every=10", f"results_dir={tmp_path}/r", "study=two",
               f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = {}
    for name, ref_dir in one_process.items():
        # grad_checkpointing is part of the run id: the same arm under another id
        (run_dir,) = (tmp_path / "r" / "two").glob(ref_dir.name.rsplit("-", 1)[0] + "-*")
        runs[name] = run_dir
        rec = json.loads((run_dir / "record.json").read_text())
        assert rec["status"] == "completed", rec["error"]
        assert rec["env"]["world_size"] == 2 and rec["config"]["train"]["strategy"] == "fsdp"
        assert rec["config"]["train"]["grad_checkpointing"] is True
        _assert_same_run(run_dir, ref_dir, atol=1e-4)
        # the periodic validation runs sharded too (a collective forward); at the last step its
        # subset (all 8 examples) gives the run's final val/loss
        curve = read_curve(run_dir)
        assert sorted(curve) == [10, 20] and curve[20] == pytest.approx(rec["metrics"]["val/loss"], abs=1e-6)
    _assert_same_adapter(runs["lora"], one_process["lora"], atol=1e-4)
    assert not _leftovers(str(tmp_path))


def test_planner_shards_fsdp_state_per_rank():
    from lorasweep.distributed.launch import per_rank
    from lorasweep.run.planner import plan_run

    base = ["model=tiny_llama", "lora=full", "train.batch_size=4", "train.max_seq_len=64"]
    one = plan_run(compose(*base), "cpu", seq_len=None)
    ddp = plan_run(per_rank(compose(*base, "train.devices=2")), "cpu", seq_len=None)
    fsdp = plan_run(per_rank(compose(*base, "train.devices=2", "train.strategy=fsdp")), "cpu", seq_len=None)
    assert ddp.optimizer_gb == pytest.approx(one.optimizer_gb) and ddp.grads_gb == pytest.approx(one.grads_gb)
    assert fsdp.optimizer_gb == pytest.approx(one.optimizer_gb / 2) and fsdp.grads_gb == pytest.approx(one.grads_gb / 2)
    assert fsdp.weights_gb == pytest.approx(one.weights_gb / 2 + one.weights_gb / 2)  # half + one of 2 blocks
    assert ddp.activations_gb < one.activations_gb  # each rank's half of the global micro-batch


@pytest.mark.slow
def test_failing_rank_fails_its_run_not_the_sweep(tmp_path):
    """Rank 1 of the full fine-tuning run raises after step 2: that run is failed with rank 1's error,
    the LoRA run after it completes, and no rank of either is left running."""
    res = _cli("-m", "launcher=local", *ARGS, "train.max_steps=4", "lora=full,r8_a16_qv", "train.devices=2",
               f"results_dir={tmp_path}/r", "study=crash", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
               env={"LORASWEEP_TEST_CRASH_RANK": "1:2:_full_"})
    assert res.returncode == 1, res.stderr[-3000:]  # a failed run fails the sweep's exit code, not the sweep
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "r" / "crash").glob("*/record.json")}
    full = next(r for k, r in records.items() if "_full_" in k)
    lora = next(r for k, r in records.items() if "_full_" not in k)
    assert full["status"] == "failed"
    assert full["error"] == "rank 1: RuntimeError: injected failure in rank 1 after step 2"
    assert "injected failure" in (tmp_path / "r" / "crash" / full["run_id"] / "error.log").read_text()
    assert lora["status"] == "completed", lora["error"]
    outcomes = [json.loads(l) for l in (tmp_path / "sweep" / "outcomes.jsonl").read_text().splitlines()]
    assert sorted(o["status"] for o in outcomes) == ["completed", "failed"]
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_rank_killed_by_a_signal_is_named_and_the_sweep_goes_on(tmp_path):
    """Rank 1 of the full fine-tuning run is SIGKILLed after step 2 (as the OOM killer would): the run
    fails naming rank 1 and the signal, not rank 0's broken connection; the next run completes; no
    rank is left behind."""
    res = _cli("-m", "launcher=local", *ARGS, "train.max_steps=4", "lora=full,r8_a16_qv", "train.devices=2",
               f"results_dir={tmp_path}/r", "study=kill", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
               env={"LORASWEEP_TEST_CRASH_RANK": "1:2:_full_:kill"})
    assert res.returncode == 1, res.stderr[-3000:]
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "r" / "kill").glob("*/record.json")}
    full = next(r for k, r in records.items() if "_full_" in k)
    lora = next(r for k, r in records.items() if "_full_" not in k)
    assert full["status"] == "failed"
    assert full["error"].startswith("rank 1 was killed by SIGKILL"), full["error"]
    assert lora["status"] == "completed", lora["error"]
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
@pytest.mark.slurm
def test_two_process_runs_under_slurm(local_slurm, tmp_path):  # noqa: F811
    """launcher=slurm: each run is one job whose one task starts its 2 ranks (torchrun)."""
    res = _cli("-m", "launcher=slurm", *ARGS, "train.max_steps=3", "lora.r=2,4", "train.devices=2",
               "train.num_threads=0", f"results_dir={tmp_path}/r", "study=sl",
               f"hydra.launcher.partition={local_slurm.partition}", "hydra.launcher.gpus_per_node=null",
               "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=15",
               "hydra.launcher.array_parallelism=1", cwd=tmp_path, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r" / "sl").glob("*/record.json")]
    assert len(recs) == 2 and all(r["status"] == "completed" for r in recs), [r["error"] for r in recs]
    assert all(r["env"]["world_size"] == 2 and r["env"].get("slurm_job_id") for r in recs)
    assert all(r["metrics"]["mem/rank1/train_peak_rss_gb"] > 0 for r in recs)
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_two_process_run_resumes_from_its_checkpoint(one_process, tmp_path):
    """A 2-process LoRA run whose rank 1 fails after step 13 keeps its step-10 checkpoint (with both
    ranks' RNG states); relaunched, it resumes there and ends as the uninterrupted one-process run."""
    args = [*ARGS, *METHODS["lora"], "train.devices=2", "train.checkpoint_every=10",
            f"results_dir={tmp_path}/r", "study=res"]
    first = _cli(*args, cwd=tmp_path, env={"LORASWEEP_TEST_CRASH_RANK": "1:13"})
    assert first.returncode == 1, first.stderr[-3000:]
    run_dir = tmp_path / "r" / "res" / one_process["lora"].name
    state = torch.load(run_dir / "checkpoints" / "step-00000010" / "state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and state["world_size"] == 2
    second = _cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "completed" and rec["metrics"]["train/resumed_from_step"] == 10
    got, want = _losses(run_dir), _losses(one_process["lora"])
    assert [s for s, _ in got] == list(range(1, 21))
    for (s, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5), s
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one_process["lora"] / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert not (run_dir / "checkpoints").exists() and not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_fsdp_runs_resume_from_their_sharded_checkpoints(one_process, tmp_path):
    """FSDP, LoRA and full fine-tuning: rank 1 fails after step 13; each run keeps its step-10
    checkpoint, written as each rank's shards (torch.distributed.checkpoint) and committed by rank 0.
    Relaunched, both resume there and end as the uninterrupted one-process runs; a one-process
    relaunch is refused with the strategy to use, not a wrong resume."""
    args = ["-m", "launcher=local", *ARGS, "lora=r8_a16_qv,full", "train.devices=2", "train.strategy=fsdp",
            "train.checkpoint_every=10", f"results_dir={tmp_path}/r", "study=fres", f"hydra.sweep.dir={tmp_path}/sweep"]
    first = _cli(*args, cwd=tmp_path, env={"LORASWEEP_TEST_CRASH_RANK": "1:13"})
    assert first.returncode == 1, first.stderr[-3000:]
    for ref_dir in one_process.values():
        ckpt = tmp_path / "r" / "fres" / ref_dir.name / "checkpoints" / "step-00000010"
        assert {p.name for p in (ckpt / "sharded").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
        assert not (ckpt / "trainable.safetensors").exists()  # no rank gathered the whole model
        assert len(torch.load(ckpt / "state.pt", weights_only=True)["rng_ranks"]) == 2
    alone = _cli(*ARGS, *METHODS["lora"], f"results_dir={tmp_path}/r", "study=fres", cwd=tmp_path)
    assert alone.returncode == 1
    rec = json.loads((tmp_path / "r" / "fres" / one_process["lora"].name / "record.json").read_text())
    assert "resume it with train.strategy=fsdp" in rec["error"], rec["error"]
    second = _cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    for name, ref_dir in one_process.items():
        run_dir = tmp_path / "r" / "fres" / ref_dir.name
        rec = json.loads((run_dir / "record.json").read_text())
        assert rec["status"] == "completed" and rec["metrics"]["train/resumed_from_step"] == 10, (name, rec["error"])
        _assert_same_run(run_dir, ref_dir, atol=1e-4)
        assert not (run_dir / "checkpoints").exists()
    _assert_same_adapter(tmp_path / "r" / "fres" / one_process["lora"].name, one_process["lora"], atol=1e-4)
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_two_nodes_on_one_host_match_one_process(one_process, tmp_path):
    """train.nodes=2 as a 2-node SLURM job runs it (one lorasweep task per node, torchrun with
    --nnodes 2 --node-rank k and node 0 as master), both nodes on this host: node 0 keeps the
    lease and writes the record, node 1 only runs its rank; the losses and adapter are the
    one-process run's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*ARGS, *METHODS["lora"], "train.nodes=2", "train.devices=1", f"results_dir={tmp_path}/r", "study=nodes"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-m", "lorasweep.cli", *args], cwd=tmp_path,
                              env={**env, "LORASWEEP_NODE_RANK": str(k)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    run_dir = tmp_path / "r" / "nodes" / one_process["lora"].name
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "completed" and rec["env"]["world_size"] == 2, rec["error"]
    assert rec["metrics"]["mem/rank1/train_peak_rss_gb"] > 0
    assert {p.name for p in (run_dir / ".dist").iterdir()} == {"spec-node0.json", "result.json"}
    _assert_same_run(run_dir, one_process["lora"], atol=1e-5)
    _assert_same_adapter(run_dir, one_process["lora"], atol=1e-5)
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_pruner_stops_a_losing_two_process_run(tmp_path):
    """train.eval_every and pruner=median on 2 processes: the validation curve is the one-process
    run's, written once (rank 0), and a losing run is stopped on both ranks at the same step and
    recorded as pruned with the rule and numbers, as in one process; the sweep goes on."""
    full = [*ARGS, *METHODS["full"], "train.eval_every=5"]
    one = job.run(compose(*full, f"results_dir={tmp_path}/one", "study=one"), show_progress=False)
    assert one.status == "completed", one.error
    res = _cli("-m", "launcher=local", *full, "train.devices=2", "pruner=median", "pruner.min_runs=1",
               "pruner.warmup_steps=5", "optimizer.lr=5e-3,1e-7", f"results_dir={tmp_path}/r", "study=prune",
               f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = {r["config"]["optimizer"]["lr"]: (r, p.parent) for p in (tmp_path / "r" / "prune").glob("*/record.json")
            for r in [json.loads(p.read_text())]}
    good, good_dir = recs[5e-3]
    assert good["status"] == "completed" and good["env"]["world_size"] == 2, good["error"]
    want = read_curve(Path(one.run_dir))
    got = read_curve(good_dir)
    assert sorted(got) == sorted(want) == [5, 10, 15, 20]
    assert all(got[s] == pytest.approx(want[s], abs=1e-5) for s in want), (got, want)
    assert len((good_dir / "val_curve.jsonl").read_text().splitlines()) == 4  # one line per point: rank 0
    bad, bad_dir = recs[1e-7]
    assert bad["status"] == "pruned", bad["error"]
    assert bad["pruned"]["rule"] == "median" and bad["pruned"]["step"] == 5
    assert bad["metrics"]["prune/step"] == 5 and bad["metrics"]["dist/world_size"] == 2
    assert max(json.loads(l)["step"] for l in (bad_dir / "steps.jsonl").read_text().splitlines()) == 5
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_base_model_scores_beside_a_two_process_run(tmp_path):
    """eval.baseline with eval.tasks on 2 processes: rank 0 scores lm-eval on the tuned model, then a
    freshly loaded base (the weights in memory are tuned; full fine-tuning changed the base): the
    same eval/, eval_base/ and eval_delta/ figures as one process."""
    args = [*ARGS, *METHODS["full"], "train.max_steps=4", "eval=arithmetic", "eval.limit=4", "eval.baseline=true"]
    one = job.run(compose(*args, f"results_dir={tmp_path}/one", "study=one"), show_progress=False)
    assert one.status == "completed", one.error
    res = _cli(*args, "train.devices=2", f"results_dir={tmp_path}/r", "study=two", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((tmp_path / "r" / "two" / Path(one.run_dir).name / "record.json").read_text())
    want = json.loads((Path(one.run_dir) / "record.json").read_text())["metrics"]
    scores = [k for k in want if k.startswith(("eval/", "eval_base/", "eval_delta/")) and "stderr" not in k]
    assert any(k.startswith("eval_base/") for k in scores) and any(k.startswith("eval_delta/") for k in scores)
    for k in scores:
        assert rec["metrics"][k] == pytest.approx(want[k], rel=1e-4), k
    assert rec["metrics"]["mem/rank0/eval_base_peak_rss_gb"] > 0
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_qlora_two_process_matches_one_process(tmp_path):
    """A 4-bit (nf4) base under DDP: each rank quantizes its own copy of the base, the adapters'
    gradients are all-reduced; the losses and adapter are the one-process QLoRA run's."""
    args = [*ARGS, *METHODS["lora"], "precision=nf4", "train.max_steps=10"]
    one = job.run(compose(*args, f"results_dir={tmp_path}/one", "study=one"), show_progress=False)
    assert one.status == "completed", one.error
    res = _cli(*args, "train.devices=2", f"results_dir={tmp_path}/r", "study=two", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "r" / "two" / Path(one.run_dir).name
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "completed" and rec["env"]["world_size"] == 2, rec["error"]
    got, want = _losses(run_dir), _losses(Path(one.run_dir))
    assert len(got) == len(want) == 10
    for (s, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5), s
    _assert_same_adapter(run_dir, Path(one.run_dir), atol=1e-5)
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR2], ids=["ctrl_c", "sigusr2"])
def test_a_stopped_two_process_run_is_interrupted_and_resumes_as_one_process(tmp_path, sig):
    """Ctrl-C (SIGINT to the foreground process group) or submitit's SIGUSR2, at step 10 of 20 with a
    log line every 4 steps (so the checkpoint holds an unlogged window): 'interrupted', exit 128 +
    signal, no rank left; relaunched, every logged loss is the one-process run's."""
    common = [*ARGS, *METHODS["lora"], "train.log_every=4", "train.checkpoint_every=100"]
    ref = job.run(compose(*common, f"results_dir={tmp_path}/one", "study=one"), show_progress=False)
    assert ref.status == "completed", ref.error
    args = [*common, "train.devices=2", f"results_dir={tmp_path}/r", "study=stop"]
    marker = tmp_path / "held"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore",
           "LORASWEEP_TEST_HOLD_RANK": f"10:{marker}"}
    proc = subprocess.Popen([sys.executable, "-m", "lorasweep.cli", *args], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 900
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "rank 0 never reached step 10"
            time.sleep(0.1)
        os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C or SLURM's signal to the job reaches
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run_dir = tmp_path / "r" / "stop" / Path(ref.run_dir).name
    rec = json.loads((run_dir / "record.json").read_text())
    assert proc.returncode == 128 + sig, out[-3000:]
    assert rec["status"] == "interrupted" and f"{signal.Signals(sig).name} after step 10" in rec["error"], rec["error"]
    assert (run_dir / "checkpoints" / "step-00000010").is_dir()
    time.sleep(1)
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))
    again = _cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["status"] == "completed" and rec["metrics"]["train/resumed_from_step"] == 10
    assert "mem/peak_segment" in rec["metrics"]  # the peaks of both segments
    got, want = _losses(run_dir), _losses(Path(ref.run_dir))
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 4, 8, 12, 16, 20]
    for (s, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5), s
    assert not _leftovers(str(tmp_path))


@pytest.mark.slow
def test_a_run_node_0_skips_leaves_no_other_node_waiting(tmp_path):
    """Two nodes on one host; node 0 finds the run over planner.budget_gb and skips it: node 1 hears
    so and ends at once instead of waiting on a rendezvous that never comes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*ARGS, *METHODS["lora"], "train.nodes=2", "train.devices=1", "planner.budget_gb=0.0001",
            f"results_dir={tmp_path}/r", "study=skip"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "LORASWEEP_DIST_TIMEOUT_S": "900"}
    procs = [subprocess.Popen([sys.executable, "-m", "lorasweep.cli", *args], cwd=tmp_path,
                              env={**env, "LORASWEEP_NODE_RANK": str(k)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for k in (1, 0)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    assert "node 0 skipped it" in outs[0] and "planner.budget_gb" in outs[0]
    (rec,) = (tmp_path / "r" / "skip").glob("*/record.json")
    assert json.loads(rec.read_text())["status"] == "skipped"
    assert not _leftovers(str(tmp_path))
