"""The memory planner: counts match the real model, 4-bit plans smaller, budgets skip runs."""
from __future__ import annotations

import json

import pytest
import torch

from lorasweep.run import adapter, model as model_stage

from lorasweep.run import planner
from lorasweep.config import (DataConfig, LoggerConfig, LoraConfig, ModelConfig, OptimizerConfig, PlannerConfig,
                              PrecisionConfig, RunConfig, TrainConfig)

TINY = ModelConfig(name="tiny_llama", name_or_path="builtin:tiny_llama")


def _cfg(**kw) -> RunConfig:
    base = dict(model=TINY, data=DataConfig(name="arithmetic", n_train=16, n_val=4, n_test=4),
                train=TrainConfig(batch_size=2, max_seq_len=64, max_steps=1, save_adapter=False))
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("lora", [LoraConfig(r=4, targets=["qv"]), LoraConfig(r=16, targets=["all_linear"]),
                                  LoraConfig(method="full"), LoraConfig(method="partial", trainable=["attention"])])
def test_plan_counts_equal_the_real_model(lora):
    cfg = _cfg(lora=lora)
    p = planner.plan_run(cfg, device_type="cpu")
    loaded = model_stage.build_model(cfg.model, cfg.precision, torch.device("cpu"))
    _, info = adapter.apply_adapter(loaded.model, lora, task="causal_lm", quantized=False)
    assert (p.params_trainable, p.params_total) == (info.trainable, info.total)


def test_plan_counts_equal_the_real_model_nf4(monkeypatch):
    monkeypatch.setenv("LORASWEEP_QUANT_CACHE", "0")  # the counts do not depend on the cache
    cfg = _cfg(precision=PrecisionConfig(name="nf4", quant="nf4"))
    p = planner.plan_run(cfg, device_type="cpu")
    loaded = model_stage.build_model(cfg.model, cfg.precision, torch.device("cpu"))
    _, info = adapter.apply_adapter(loaded.model, cfg.lora, task="causal_lm", quantized=True)
    assert (p.params_trainable, p.params_total) == (info.trainable, info.total)
    assert p.params_quantized > 0


def test_nf4_plan_is_smaller_than_fp32():
    # a shape where the weights dominate: on a CPU, 4-bit activations cost more than fp32 ones
    # (bitsandbytes dequantizes at every matmul; planner.CPU_ACT_SLACK_4BIT), so at a large batch x
    # sequence an nf4 run is not smaller there (smollm2 b4 x s256: 4.28 GB nf4 vs 3.61 GB fp32 measured)
    train = TrainConfig(batch_size=1, max_seq_len=16, max_steps=1, save_adapter=False)
    fp32 = planner.plan_run(_cfg(train=train), device_type="cpu")
    nf4 = planner.plan_run(_cfg(train=train, precision=PrecisionConfig(name="nf4", quant="nf4")), device_type="cpu")
    assert nf4.weights_gb < fp32.weights_gb and nf4.peak_gb < fp32.peak_gb


def test_llama7b_shape_plan_on_meta():
    """A 7B skeleton on the meta device: bytes per parameter by precision, no memory used."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        sk = LlamaForCausalLM(hf)
    tr = TrainConfig(batch_size=1, max_seq_len=512)
    bf16 = planner.plan(_cfg(train=tr, precision=PrecisionConfig(name="bf16_true", weights_dtype="bfloat16")), sk, "cuda")
    nf4 = planner.plan(_cfg(train=tr, precision=PrecisionConfig(name="nf4", quant="nf4")), sk, "cuda")
    dq = planner.plan(_cfg(train=tr, precision=PrecisionConfig(name="nf4_dq", quant="nf4", double_quant=True)), sk, "cuda")
    assert bf16.params_trainable == 4_194_304  # r=8 on q,v: the articles' 4.2 M
    assert 13.0 < bf16.weights_gb < 13.9  # 6.74 B params x 2 bytes
    assert nf4.weights_gb < 0.35 * bf16.weights_gb
    assert dq.quant_constants_gb < nf4.quant_constants_gb
    sgd = planner.plan(_cfg(train=tr, precision=PrecisionConfig(name="nf4", quant="nf4"),
                            optimizer=OptimizerConfig(name="sgd")), sk, "cuda")
    assert sgd.optimizer_gb == pytest.approx(nf4.optimizer_gb / 2)


def test_budget_skips_the_run_with_the_prediction(tmp_path):
    from lorasweep.job import run

    cfg = _cfg(results_dir=str(tmp_path), study="budget", planner=PlannerConfig(budget_gb=0.01),
               logger=LoggerConfig(name="none", backend="none"))
    out = run(cfg, show_progress=False)
    assert out.status == "skipped"
    rec = json.loads((tmp_path / "budget" / out.run_id / "record.json").read_text())
    assert rec["status"] == "skipped" and "planner.budget_gb" in rec["error"]
    assert rec["metrics"]["plan/peak_gb"] > 0.01
    assert "time/load_s" not in rec["metrics"]  # nothing was loaded


def test_plan_cli_prints_the_breakdown(capsys):
    from lorasweep.plan_cli import main

    assert main(["-m", "model=tiny_llama", "precision=fp32,nf4", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    for line in ("base weights", "quantization constants", "optimizer states", "activations", "predicted peak"):
        assert line in out
    assert "_fp32_" in out and "_nf4_" in out and "predicted peaks:" in out


def test_plan_cli_bad_override_is_one_line(capsys):
    from lorasweep.plan_cli import main

    assert main(["model=tiny_llama", "lora.r=-1"]) == 2
    assert "lora.r" in capsys.readouterr().err


@pytest.mark.slow
def test_cached_4bit_checkpoint_matches_on_the_fly(monkeypatch, tmp_path):
    """The cached quantized checkpoint gives exactly the on-the-fly quantized model (~30 s: child process)."""
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path))
    pc = PrecisionConfig(name="nf4_dq", quant="nf4", double_quant=True)
    ids = torch.randint(4, 90, (2, 16))
    monkeypatch.setenv("LORASWEEP_QUANT_CACHE", "0")
    a = model_stage.build_model(TINY, pc, torch.device("cpu")).model
    monkeypatch.setenv("LORASWEEP_QUANT_CACHE", "1")
    b = model_stage.build_model(TINY, pc, torch.device("cpu")).model
    assert list((tmp_path / "quantized").glob("*nf4-dq*/lorasweep_quant.json"))
    assert torch.equal(a(ids).logits, b(ids).logits)
