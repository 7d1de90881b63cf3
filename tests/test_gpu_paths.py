"""The GPU code paths, checked on the CPU as far as each mechanism allows (issue 11, section 2).

Resolved run ids, 4-bit activations in the compute dtype, mixed precision without a second weight
copy, weights straight onto the device, attention implementation everywhere, TF32, fused AdamW,
random streams after lm-eval, the planner's CUDA arithmetic and the parallel launcher's GPU share.
What only a GPU can show is in tests/test_gpu_cuda.py (marked gpu) and benchmarks/gpu_check.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose
from lorasweep.run import adapter as adapter_stage
from lorasweep import config as config_mod
from lorasweep.run import model as model_stage
from lorasweep.run import pipeline
from lorasweep import job
from lorasweep.run import planner
from lorasweep.config import LoraConfig, ModelConfig, PrecisionConfig, config_hash, resolve, run_id, validate

TINY = ModelConfig(name="tiny_llama", name_or_path="builtin:tiny_llama")
NF4_BF16 = PrecisionConfig(name="nf4", quant="nf4", compute_dtype="bfloat16")
BF16_MIXED = PrecisionConfig(name="bf16_mixed", autocast="bfloat16")


def _as_if_gpu(monkeypatch, bf16: bool = True) -> None:
    """The config layer believes a (bf16-capable) GPU is visible; nothing touches CUDA."""
    monkeypatch.setattr(config_mod, "_cuda_visible", lambda: True)
    monkeypatch.setattr(config_mod, "_bf16_gpu", lambda: bf16)


# ------------------------------------------------------------------ 5. resolved run ids

def test_run_id_hashes_what_auto_resolves_to(monkeypatch):
    auto = compose("model=tiny_llama", "precision=nf4", "train.device=auto")
    r = resolve(auto)
    assert (r.train.device, r.precision.compute_dtype, r.precision.tf32, r.model.attn_implementation) == \
        ("cpu", "float32", False, "sdpa")
    # auto on this CPU is the explicit CPU run; the same config resolved on a GPU is another run
    assert run_id(auto) == run_id(compose("model=tiny_llama", "precision=nf4", "train.device=cpu",
                                          "precision.compute_dtype=float32", "model.attn_implementation=sdpa"))
    _as_if_gpu(monkeypatch)
    on_gpu = resolve(auto)
    assert (on_gpu.train.device, on_gpu.precision.compute_dtype, on_gpu.precision.tf32) == ("cuda", "bfloat16", True)
    assert run_id(auto) != run_id(compose("model=tiny_llama", "precision=nf4", "train.device=cpu"))
    _as_if_gpu(monkeypatch, bf16=False)  # a V100: 4-bit compute falls back to fp32, another run again
    assert resolve(auto).precision.compute_dtype == "float32"
    # non-4-bit runs resolve the compute dtype to what their forward computes in
    assert resolve(compose("model=tiny_llama", "precision=bf16_mixed")).precision.compute_dtype == "bfloat16"
    assert resolve(compose("model=tiny_llama", "precision=bf16_true")).precision.compute_dtype == "bfloat16"


def test_base_score_cache_is_per_resolved_device(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "benchmark_scores", lambda *a, **k: calls.append(a[5]) or {"eval_base/x/acc": 0.5})
    cfg = tiny("eval=arithmetic", "eval.baseline=true")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pipeline.base_scores(cfg, None, None, None, tmp_path, cpu, False)
    again = pipeline.base_scores(cfg, None, None, None, tmp_path, cpu, False)
    assert again["eval_base/reused"] == 1 and len(calls) == 1
    gpu = pipeline.base_scores(cfg, None, None, None, tmp_path, cuda, False)  # no reuse across devices
    assert "eval_base/reused" not in gpu and calls == [cpu, cuda]
    assert len(list((Path(cfg.results_dir) / cfg.study / ".base_scores").glob("*.json"))) == 2


def test_bad_device_and_attention_and_eval_batch_are_one_line_errors():
    with pytest.raises(config_mod.ConfigError) as e:
        validate(compose("model=tiny_llama", "train.device=cuda", "model.attn_implementation=flash",
                         "eval.batch_size=0", "runs_per_gpu=0"))
    msg = str(e.value)
    for field in ("train.device='cuda'", "model.attn_implementation='flash'", "eval.batch_size=0", "runs_per_gpu=0"):
        assert field in msg, msg
    validate(compose("model=tiny_llama", "eval.batch_size=auto"))  # lm-eval's own search
    with pytest.raises(RuntimeError, match="train.device=cuda"):
        model_stage.pick_device("cuda")  # never a silent CPU fallback


# ------------------------------------------------------------------ 1. QLoRA in the compute dtype

def _block_dtypes(model, fn) -> dict[str, torch.dtype]:
    """Output dtypes of every decoder layer and attention block during fn()."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if type(mod).__name__ in ("LlamaDecoderLayer", "LlamaAttention"):
            def hook(m, args, out, name=name):
                seen[name] = (out if torch.is_tensor(out) else out[0]).dtype
            hooks.append(mod.register_forward_hook(hook))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_4bit_run_keeps_activations_in_the_compute_dtype(monkeypatch):
    """bf16 compute on the CPU: after peft's fp32 upcast is undone, every block emits bf16 while LoRA
    trains in fp32; without it the residual stream (attention included) would be fp32."""
    monkeypatch.setenv("LORASWEEP_QUANT_CACHE", "0")
    ids = torch.randint(4, 90, (2, 24))

    def prepared(keep: bool):
        loaded = model_stage.build_model(TINY, NF4_BF16, torch.device("cpu"))
        model, _ = adapter_stage.apply_adapter(loaded.model, LoraConfig(r=4, targets=["qv"]), task="causal_lm",
                                               quantized=True)
        if keep:
            model_stage.keep_compute_dtype(model, loaded.compute_dtype)
        return model, loaded

    upcast, _ = prepared(keep=False)
    assert set(_block_dtypes(upcast, lambda: upcast(input_ids=ids)).values()) == {torch.float32}  # the defect
    model, loaded = prepared(keep=True)
    autocast = model_stage.forward_autocast(NF4_BF16, loaded.compute_dtype)
    assert autocast == torch.bfloat16

    def step():
        with torch.autocast("cpu", dtype=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    dtypes = _block_dtypes(model, step)
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
                        for _, p in lora)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and type(p).__name__ != "Params4bit"}
    assert frozen == {torch.bfloat16}


def test_4bit_run_records_its_activation_dtype(tiny, monkeypatch):
    monkeypatch.setenv("LORASWEEP_QUANT_CACHE", "0")
    out = job.run(tiny("precision=nf4", "precision.compute_dtype=bfloat16", "train.max_steps=2"),
                       show_progress=False)
    assert out.status == "completed", out.error
    env = json.loads((Path(out.run_dir) / "record.json").read_text())["env"]
    assert (env["activation_dtype"], env["compute_dtype"], env["device"], env["tf32"]) == \
        ("bfloat16", "bfloat16", "cpu", False)
    assert env["attn_implementation"] == "sdpa"


# ------------------------------------------------------------------ 2. mixed precision, one weight copy

def test_mixed_lora_stores_frozen_linears_in_16_bits_and_computes_the_same():
    cpu = torch.device("cpu")
    ref = model_stage.build_model(TINY, BF16_MIXED, cpu).model  # fp32 weights, as bf16_mixed was
    lean = model_stage.build_model(TINY, BF16_MIXED, cpu, frozen_base=True).model
    dtypes = {n: p.dtype for n, p in lean.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "proj" in n or n.startswith("lm_head")), dtypes
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n or "embed" in n), dtypes
    ids = torch.randint(4, 90, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lean(input_ids=ids).logits, ref(input_ids=ids).logits)  # bit for bit
    model, _ = adapter_stage.apply_adapter(lean, LoraConfig(r=4, targets=["qv"]), task="causal_lm", quantized=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # LoRA: fp32 masters


def test_planner_counts_the_mixed_precision_weight_copy_only_where_it_exists():
    sk = model_stage.build_skeleton(TINY)
    cfg = compose("model=tiny_llama", "precision=bf16_mixed")
    fp32 = planner.plan(compose("model=tiny_llama"), sk, "cuda")
    lora = planner.plan(cfg, sk, "cuda")
    full = planner.plan(compose("model=tiny_llama", "precision=bf16_mixed", "lora=full"), sk, "cuda")
    linear = sum(m.weight.numel() for m in sk.modules() if isinstance(m, torch.nn.Linear))
    assert lora.weights_gb == pytest.approx(fp32.weights_gb - linear * 2 / 1e9)
    assert lora.autocast_copies_gb == 0
    assert full.autocast_copies_gb == pytest.approx(linear * 2 / 1e9)  # fp32 masters + their 16-bit copies


# ------------------------------------------------------------------ 3, 6. loading: device, attention

def test_weights_load_straight_onto_the_device_with_the_attention_asked():
    mc = ModelConfig(name="t", name_or_path="builtin:tiny_llama", attn_implementation="eager")
    fp32 = PrecisionConfig()
    on_gpu = model_stage.load_kwargs(mc, fp32, torch.device("cuda", 1), torch.float32)
    assert on_gpu["device_map"] == {"": 1} and on_gpu["attn_implementation"] == "eager"
    assert model_stage.load_kwargs(mc, fp32, torch.device("cuda"), torch.float32)["device_map"] == {"": "cuda"}
    assert model_stage.load_kwargs(mc, NF4_BF16, torch.device("cuda", 0), torch.bfloat16)["device_map"] == {"": 0}
    auto = ModelConfig(name="t", name_or_path="builtin:tiny_llama")
    assert "attn_implementation" not in model_stage.load_kwargs(auto, fp32, torch.device("cpu"), torch.float32)
    assert model_stage.build_skeleton(mc).config._attn_implementation == "eager"
    loaded = model_stage.build_model(mc, fp32, torch.device("cpu"))
    assert loaded.model.config._attn_implementation == "eager"


def test_the_quantizing_child_gets_the_attention_implementation(tmp_path, monkeypatch):
    from lorasweep.run import qcache

    seen = {}

    def fake_run(cmd, **kw):
        seen["args"] = json.loads(cmd[-1])
        raise SystemExit  # stop before anything is written

    monkeypatch.setattr(qcache.subprocess, "run", fake_run)
    with pytest.raises(SystemExit):
        qcache.quantized_checkpoint(tmp_path, "builtin:tiny_llama", "/src", "nf4", False, torch.bfloat16,
                                    torch.device("cuda", 0), False, "flash_attention_2")
    assert seen["args"][-1] == "flash_attention_2" and seen["args"][5] == "0"


def test_tf32_switch_and_its_restore():
    before = model_stage.tf32_enabled()
    restore = model_stage.set_tf32(True)
    assert model_stage.tf32_enabled()
    restore()
    assert model_stage.tf32_enabled() == before


def test_adamw_is_fused_only_on_cuda():
    from lorasweep.config import OptimizerConfig
    from lorasweep.run.train import build_optimizer

    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], OptimizerConfig())
    assert not opt.defaults.get("fused")


# ------------------------------------------------------------------ 4. random streams after lm-eval

def test_scoring_restores_every_random_stream_cuda_included(tiny, tmp_path, monkeypatch):
    """Mechanism: _benchmark puts back python/numpy/torch and CUDA's generator states, whatever the
    scorer reseeded (CUDA faked: its state is a tensor like any other)."""
    import random

    import numpy as np

    cuda_state = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in cuda_state])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: cuda_state.__setitem__(0, states[0]))

    def reseeding_scorer(*a, **k):
        random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)
        cuda_state[0] = torch.tensor([9, 9, 9], dtype=torch.uint8)
        return {"eval/time_s": 0.0}

    monkeypatch.setattr(pipeline, "_score", reseeding_scorer)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    pipeline.benchmark_scores(tiny(), None, None, None, tmp_path, torch.device("cpu"), "eval", False)
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2]
    assert cuda_state[0].tolist() == [1, 2, 3]


@pytest.mark.slow
def test_computed_or_reused_base_score_the_run_trains_the_same(tiny):
    """A run that scored the base, one that reused the score, one that never scored: same losses
    (LoRA dropout draws from torch's stream after the scoring)."""
    over = ("eval=arithmetic", "eval.limit=4", "train.max_steps=4", "train.log_every=1", "lora.dropout=0.2")
    first = job.run(tiny(*over, "study=a"), show_progress=False)
    cfg_b = tiny(*over, "study=b")
    shutil.copytree(Path(first.run_dir).parent / ".base_scores", Path(cfg_b.results_dir) / "b" / ".base_scores")
    reused = job.run(cfg_b, show_progress=False)
    never = job.run(tiny(*over, "eval.baseline=false", "study=c"), show_progress=False)
    assert first.status == reused.status == never.status == "completed"
    assert "eval_base/reused" not in first.metrics and reused.metrics["eval_base/reused"] == 1

    def losses(out):
        return [json.loads(l)["train/loss"] for l in (Path(out.run_dir) / "steps.jsonl").read_text().splitlines()]

    assert len(losses(first)) == 4 and losses(first) == losses(reused) == losses(never)


# ------------------------------------------------------------------ 9. the planner on CUDA

def _llama7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(hf)


def _plan7b(*overrides):
    return planner.plan(compose("model=tiny_llama", "train.batch_size=1", "train.max_seq_len=512", *overrides),
                        _llama7b(), "cuda")


def test_cuda_plan_uses_each_precisions_real_activation_dtype():
    h, layers, tokens = 4096, 32, 512
    qv_in = 2 * h * layers  # q and v inputs, all layers
    bf16 = _plan7b("precision=bf16_true", "lora.dropout=0.05")
    bf16_nodrop = _plan7b("precision=bf16_true", "lora.dropout=0")
    # peft casts a bf16 input to the adapter's fp32: dropout keeps an fp32 copy (4 B) + mask (1 B),
    # and without dropout lora_A still keeps the fp32 cast (4 B)
    assert (bf16.activations_gb - bf16_nodrop.activations_gb) * 1e9 == pytest.approx(tokens * qv_in * 1)
    fp32 = _plan7b("precision=fp32", "lora.dropout=0")
    fp32_drop = _plan7b("precision=fp32", "lora.dropout=0.05")
    assert (fp32_drop.activations_gb - fp32.activations_gb) * 1e9 == pytest.approx(tokens * qv_in * 5)
    # 4-bit: the stream in the compute dtype, about half the fp32 run's activations
    nf4 = _plan7b("precision=nf4", "lora.dropout=0")
    assert 0.45 < nf4.activations_gb / fp32.activations_gb < 0.6
    # ... and the non-4-bit weights (embeddings, norms, lm_head) in bf16, not peft's fp32
    n_other = 2 * 32000 * h + (2 * layers + 1) * h
    n_quant = sum(m.weight.numel() for n, m in _llama7b().named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert nf4.weights_gb * 1e9 == pytest.approx(n_quant * 0.5 + n_other * 2)


def test_cuda_plan_counts_paged_8bit_states_of_small_tensors_and_adds_context_for_the_budget():
    paged = _plan7b("precision=nf4", "optimizer=paged_adamw_8bit")  # r=8 on q,v: 32k-element A and B
    n_lora = 2 * 32 * 2 * 8 * 4096
    assert paged.optimizer_gb * 1e9 == pytest.approx(2 * n_lora * (1 + 4 / 256))
    wide = _plan7b("precision=nf4", "optimizer=paged_adamw_8bit", "lora.r=64", "lora.targets=[all_linear]")
    # r=64: A of the MLP (64 x 11008) and B (11008 x 64) reach 100k elements and are paged (uncounted)
    assert wide.optimizer_gb < 2 * wide.params_trainable * (1 + 4 / 256) / 1e9
    assert paged.device_gb == pytest.approx(paged.peak_gb * (1 + planner.CUDA_ALLOCATOR_SLACK) + planner.CUDA_CONTEXT_GB)
    assert paged.metrics()["plan/device_gb"] == pytest.approx(paged.device_gb, abs=1e-3)
    cpu = planner.plan(compose("model=tiny_llama"), model_stage.build_skeleton(TINY), "cpu")
    assert cpu.device_gb == cpu.peak_gb and "plan/device_gb" not in cpu.metrics()


# ------------------------------------------------------------------ 8. launcher=parallel on GPUs

def test_parallel_runs_at_most_one_per_gpu_unless_asked():
    from lorasweep.study.sweep import parallel_cap

    assert parallel_cap(2, n_gpus=1) == 1  # launcher=parallel's default 2 at once, one GPU
    assert parallel_cap(None, n_gpus=4) == 4  # submitit_local: the whole grid at once
    assert parallel_cap(2, n_gpus=4) is None  # fits already
    assert parallel_cap(4, n_gpus=1, runs_per_gpu=2) == 2
    assert parallel_cap(4, n_gpus=0) is None  # CPU machine: the cores are shared instead


def test_a_jobs_empty_cuda_visible_devices_never_sends_it_to_the_cpu():
    from lorasweep.study.sweep import job_gpu

    assert job_gpu("", ["0", "1"], 3) == ("set", "1")  # submitit's "" replaced by the job's own GPU
    assert job_gpu("", [], 0) == ("unset", None)  # launcher saw no GPU (hidden /proc): let the job look
    assert job_gpu("", [], 0, launcher_value="") == ("keep", "")  # the user hid the GPUs: respected
    assert job_gpu(None, [], 0) == ("keep", None)


def test_visible_gpus_reads_the_environment(monkeypatch):
    from lorasweep.study.sweep import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_the_sweep_callback_caps_the_parallel_launcher_config():
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lorasweep.cli import conf_dir, register_schema
    from lorasweep.study.sweep import _cap_to_gpus

    def composed(*overrides):
        register_schema()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            return hcompose(config_name="config", overrides=list(overrides), return_hydra_config=True)

    cfg = composed("launcher=parallel")
    _cap_to_gpus(cfg, ["0"])
    assert cfg.hydra.sweeper.max_batch_size == 1
    shared = composed("launcher=parallel", "hydra.sweeper.max_batch_size=4", "runs_per_gpu=2")
    _cap_to_gpus(shared, ["0"])
    assert shared.hydra.sweeper.max_batch_size == 2
    on_cpu = composed("launcher=parallel", "train.device=cpu")
    _cap_to_gpus(on_cpu, ["0"])
    assert on_cpu.hydra.sweeper.max_batch_size == 2  # CPU runs do not use the GPU


# ------------------------------------------------------------------ the one command, on a CPU

@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_and_writes_both_files(tmp_path):
    """benchmarks/gpu_check.py --device cpu --tiny: setup, device probe, the gpu-marked tests (they
    skip), the shrunk 7B layout, two arms in fresh processes, the article comparison (~2.5 min here)."""
    out = tmp_path / "g"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1",
                        "--arms", "bf16_true:adamw,nf4:adamw"],
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] and result["tests"]["ok"] and result["tests"]["skipped"] > 0
    assert [a["status"] for a in result["arms"].values()] == ["completed", "completed"]
    assert result["arms"]["bf16_true:adamw"]["activation_dtype"] == "bfloat16"
    assert result["article"]["memory_ratio"] > 0 and result["article"]["time_ratio"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "21.33 → 14.18 GB" in md and "1.85 → 2.79 h" in md and "Overall: PASS" in md
