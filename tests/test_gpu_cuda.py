"""On a CUDA device: every precision x optimizer, per-run peaks, planner vs measured, and the GPU
paths whose CPU-side mechanism tests/test_gpu_paths.py checks. Skipped without CUDA; run by
benchmarks/gpu_check.py (`pytest -m gpu`)."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose
from lorasweep.run import model as model_stage
from lorasweep.run import pipeline
from lorasweep import job

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PRECISIONS = ["fp32", "bf16_mixed", "bf16_true", "fp16_mixed", "nf4", "nf4_dq", "fp4"]
OPTIMIZERS = ["adamw", "sgd", "paged_adamw_8bit"]
# the residual stream's dtype leaving the first block (mixed: fp32 stream, 16-bit matmuls)
ACTIVATION = {"fp32": "float32", "bf16_mixed": "float32", "fp16_mixed": "float32", "bf16_true": "bfloat16",
              "nf4": "bfloat16", "nf4_dq": "bfloat16", "fp4": "bfloat16"}


def _cuda_run(tmp_path, *overrides):
    cfg = compose("model=tiny_llama", "logger=none", f"results_dir={tmp_path / 'results'}", "study=g",
                  "train.device=cuda", "train.max_steps=3", "train.batch_size=4", "train.max_seq_len=80",
                  "data.n_train=32", "data.n_val=8", "data.n_test=8", "train.log_every=1", *overrides)
    out = job.run(cfg, show_progress=False)
    rec = json.loads((Path(out.run_dir) / "record.json").read_text())
    return out, rec


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_and_optimizer_trains_on_cuda(tmp_path, precision, optimizer):
    if precision in ("nf4", "nf4_dq", "fp4") and not torch.cuda.is_bf16_supported():
        ACTIVATION[precision] = "float32"
    tf32_before = model_stage.tf32_enabled()
    out, rec = _cuda_run(tmp_path, f"precision={precision}", f"optimizer={optimizer}")
    assert out.status == "completed", out.error
    m, env = out.metrics, rec["env"]
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["val/loss"])
    assert env["device"] == "cuda" and env["activation_dtype"] == ACTIVATION[precision], env
    assert env["tf32"] is True  # fp32 matmuls on tensor cores (precision.tf32 defaults to true)
    assert model_stage.tf32_enabled() == tf32_before  # restored after the run
    assert 0 < m["mem/peak_allocated_gb"] <= m["mem/peak_reserved_gb"] < 2.0
    assert m["plan/peak_gb"] > 0 and m["plan/device_gb"] > m["plan/peak_gb"]


def test_peak_allocated_is_reset_for_each_run(tmp_path):
    big, _ = _cuda_run(tmp_path, "model.tiny_hidden=1024", "train.batch_size=16", "data.n_train=64")
    small, _ = _cuda_run(tmp_path, "lora.r=4")
    assert big.status == small.status == "completed"
    assert small.metrics["mem/peak_allocated_gb"] < 0.5 * big.metrics["mem/peak_allocated_gb"]
    assert small.metrics["mem/peak_reserved_gb"] < big.metrics["mem/peak_reserved_gb"]


def _long_records(path: Path, n: int = 48) -> Path:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an be this are which or".split()
    path.write_text("".join(json.dumps({"instruction": "Continue the text.", "input": "",
                                        "output": " ".join(rng.choice(words) for _ in range(600))}) + "\n"
                            for _ in range(n)))
    return path


@pytest.mark.parametrize("precision", ["fp32", "bf16_true", "bf16_mixed", "nf4"])
def test_planner_predicts_peak_allocated_within_30_percent(tmp_path, precision):
    """A 4-layer, 1024-wide Llama at batch 4 x 256 tokens (every row full): big enough that the
    CUDA libraries' own buffers are not most of the figure. gpu_check.py does the same at 7B."""
    data = _long_records(tmp_path / "long.jsonl")
    out, _ = _cuda_run(tmp_path, f"precision={precision}", "model.tiny_layers=4", "model.tiny_hidden=1024",
                       "train.max_seq_len=256", "data=jsonl", f"data.path={data}", "eval=none",
                       "train.save_adapter=false")
    assert out.status == "completed", out.error
    plan, meas = out.metrics["plan/peak_gb"], out.metrics["mem/train_peak_allocated_gb"]
    assert abs(plan - meas) / meas < 0.30, (plan, meas)


def test_mixed_lora_base_is_stored_in_16_bits_on_the_gpu_and_costs_less():
    mc = compose("model=tiny_llama", "model.tiny_hidden=1024", "model.tiny_layers=4").model
    dev = torch.device("cuda")
    lean = model_stage.build_model(mc, compose("precision=bf16_mixed").precision, dev, frozen_base=True).model
    proj = [p for n, p in lean.named_parameters() if "proj" in n]
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in proj)
    assert all(p.dtype == torch.float32 for n, p in lean.named_parameters() if "norm" in n)


def test_fused_adamw_on_cuda():
    from lorasweep.config import OptimizerConfig
    from lorasweep.run.train import build_optimizer

    p = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    assert build_optimizer([{"params": [p], "weight_decay": 0.0}], OptimizerConfig()).defaults["fused"] is True


def test_cuda_random_stream_is_restored_after_scoring(tiny, tmp_path, monkeypatch):
    torch.cuda.init()
    monkeypatch.setattr(pipeline, "_score", lambda *a, **k: torch.manual_seed(1234) and {"eval/time_s": 0.0})
    torch.cuda.manual_seed_all(7)
    expect = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(7)
    pipeline.benchmark_scores(tiny(), None, None, None, tmp_path, torch.device("cuda"), "eval", False)
    assert torch.equal(torch.rand(4, device="cuda"), expect)


def test_parallel_launcher_puts_each_run_on_the_gpu_one_at_a_time(tmp_path):
    """submitit's local executor gives its jobs CUDA_VISIBLE_DEVICES='' (gpus_per_node=0): each job
    must still train on the GPU, and two runs must not share it at once."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    p = subprocess.run([sys.executable, "-m", "lorasweep.cli", "-m", "model=tiny_llama", "logger=none",
                        "launcher=parallel", "lora.r=2,4", "train.max_steps=2", "train.batch_size=4",
                        "train.max_seq_len=80", "data.n_train=32", "data.n_val=8", "data.n_test=8",
                        f"results_dir={tmp_path}/r", "study=p", f"hydra.sweep.dir={tmp_path}/sw"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(f.read_text()) for f in (tmp_path / "r" / "p").glob("*/record.json")]
    assert len(recs) == 2 and all(r["status"] == "completed" and r["env"]["device"] == "cuda" for r in recs)
    if torch.cuda.device_count() == 1:  # one after the other (launcher=parallel would start 2 at once)
        a, b = sorted(recs, key=lambda r: r["started_at"])
        assert b["started_at"] >= a["finished_at"], (a["started_at"], a["finished_at"], b["started_at"])
