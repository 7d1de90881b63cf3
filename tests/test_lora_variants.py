"""LoRA variants through peft: DoRA, rsLoRA, PiSSA/OLoRA init, LoRA+, per-layer ranks.

Each test checks the mechanism in the built model (scalings, magnitude gradients, optimizer lrs,
ranks, the PiSSA start), not only that a run completes; then whole runs on tiny_llama, the
base-score and save/merge round trips of PiSSA, and the refusals.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose
from lorasweep.run import adapter as adapter_stage
from lorasweep import merge, switch
from lorasweep.run import pipeline, train as train_stage
from lorasweep import job
from lorasweep.config import ConfigError, validate
from lorasweep.run.model import build_model, build_skeleton
from lorasweep.run.planner import plan
from lorasweep.run.record import read_record
from lorasweep.run.reload import RunFolderError

CPU = torch.device("cpu")


def _base(cfg):
    return build_model(cfg.model, cfg.precision, CPU).model


def _adapt(cfg):
    return adapter_stage.apply_adapter(_base(cfg), cfg.lora, task="causal_lm", quantized=cfg.precision.quant != "none")


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 90, (2, 24), generator=g)


@torch.no_grad()
def _logits(model, ids):
    was = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was)
    return out


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# ---------------------------------------------------------------- the mechanisms, in the built model

@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_in_the_built_model_is_alpha_over_r_or_sqrt_r(tiny, rslora):
    cfg = tiny("lora.r=16", "lora.alpha=8", f"lora.use_rslora={str(rslora).lower()}")
    model, info = _adapt(cfg)
    want = 8 / math.sqrt(16) if rslora else 8 / 16
    layers = _lora_layers(model)
    assert layers and all(m.scaling["default"] == pytest.approx(want) for m in layers.values())
    m = info.metrics()
    assert m["lora/scaling"] == pytest.approx(want)
    assert m["lora/variant"] == ("rslora" if rslora else "lora") and m["lora/modules"] == len(layers)


def test_rank_and_alpha_patterns_layers_and_exclusions_reach_the_named_modules(tiny):
    cfg = tiny("lora.targets=[all_linear]", "lora.r=4", "lora.alpha=8", "lora.use_rslora=true",
               "++lora.rank_pattern={layers.0.self_attn.q_proj:16,down_proj:2}", "++lora.alpha_pattern={v_proj:3}",
               "lora.exclude_modules=[layers.1.mlp.up_proj]")
    model, info = _adapt(cfg)
    layers = _lora_layers(model)
    r = {n: m.r["default"] for n, m in layers.items()}
    assert r["model.layers.0.self_attn.q_proj"] == 16 and r["model.layers.1.self_attn.q_proj"] == 4
    assert r["model.layers.0.mlp.down_proj"] == r["model.layers.1.mlp.down_proj"] == 2
    assert layers["model.layers.0.self_attn.q_proj"].lora_A["default"].weight.shape == (16, 64)
    assert "model.layers.1.mlp.up_proj" not in layers and "model.layers.0.mlp.up_proj" in layers
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(3 / 2)  # 3/sqrt(4)
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == pytest.approx(8 / 4)  # 8/sqrt(16)
    assert info.metrics()["lora/scaling_min"] < info.metrics()["lora/scaling_max"]
    # the planner's prediction of what peft wraps (on the meta skeleton) is what peft wrapped
    predicted = adapter_stage.lora_modules(cfg.lora, build_skeleton(cfg.model))
    assert {n: v[0] for n, v in predicted.items()} == r
    assert plan(cfg, build_skeleton(cfg.model)).params_trainable == info.trainable

    only0 = tiny("lora.layers_to_transform=[0]")
    assert set(_lora_layers(_adapt(only0)[0])) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_dora_magnitudes_are_trained_and_the_start_is_the_base(tiny, precision, cpu_kind):
    cfg = tiny("lora.use_dora=true", f"precision={precision}")
    base = _base(cfg)
    ids = _ids()
    before = _logits(base, ids)
    model, info = adapter_stage.apply_adapter(base, cfg.lora, task="causal_lm", quantized=precision != "fp32")
    assert (_logits(model, ids) - before).abs().max() == 0  # magnitude = ||W||: DoRA starts as the base
    mags = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mags) == 4 and all(p.requires_grad for p in mags.values())
    assert info.magnitude_params == sum(p.numel() for p in mags.values()) == 4 * 64
    model.train()
    # B = 0 at the start gives the magnitudes no gradient (the direction is W's): take one step first
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags.values())
    assert plan(cfg, build_skeleton(cfg.model)).params_trainable == info.trainable


def test_loraplus_gives_b_matrices_lr_times_ratio_in_the_optimizer(tiny):
    cfg = tiny("lora.loraplus_lr_ratio=16", "optimizer.lr=1e-3", "optimizer.weight_decay=0.01")
    model, info = _adapt(cfg)
    groups, opt_info = train_stage.param_groups(model, cfg.optimizer)
    opt = train_stage.build_optimizer(groups, cfg.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged train/lr
    b = [n for n in lr_of if ".lora_B." in n]
    a = [n for n in lr_of if ".lora_A." in n]
    assert len(b) == len(a) == 4 == info.loraplus_b_tensors == opt_info["optimizer/scaled_lr_tensors"]
    assert all(lr_of[n] == pytest.approx(16e-3) for n in b) and all(lr_of[n] == pytest.approx(1e-3) for n in a)
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups if g["params"])
    # a schedule scales both rates: the ratio holds at every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train_stage.lr_lambda(cfg.optimizer, 10))
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[1] / lrs[0] == pytest.approx(16)
    sgd = train_stage.build_optimizer(groups, dataclasses.replace(cfg.optimizer, name="sgd"))  # LoRA+ under SGD too
    assert sorted({g["lr"] for g in sgd.param_groups}) == pytest.approx([1e-3, 16e-3])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_olora_start_equals_the_base_but_disable_adapter_does_not(tiny, init):
    cfg = tiny(f"lora.init={init}", "lora.targets=[all_linear]", "lora.dropout=0")
    base = _base(cfg)
    ids = _ids()
    before = _logits(base, ids)
    model, info = adapter_stage.apply_adapter(base, cfg.lora, task="causal_lm", quantized=False)
    assert (_logits(model, ids) - before).abs().max() < 1e-4
    with model.disable_adapter():  # the residual model: why the base score is taken before the adapter
        assert (_logits(model, ids) - before).abs().max() > 1e-3
    assert info.initial_state and all(".lora_" in k for k in info.initial_state)
    p = plan(cfg, build_skeleton(cfg.model))
    assert p.init_gb > 0 and "plan/init_gb" in p.metrics()


def test_loftq_start_is_closer_to_the_full_precision_model_than_the_4bit_base(tiny, monkeypatch, cpu_kind):
    """The CUDA-only step of peft's LoftQ (_loftq_init_new) replaced by the same algebra on the CPU, so
    lorasweep's part is tested here: the checkpoint it reads and the scaling it undoes."""
    import bitsandbytes as bnb
    import peft.utils.loftq_utils as loftq
    from lorasweep.run.model import resolve_source

    def cpu_init(qweight, weight, num_bits, reduced_rank):
        residual = weight.float() - bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        out = loftq._low_rank_decomposition(residual, reduced_rank=reduced_rank)
        return out["R"], out["L"]

    monkeypatch.setattr(loftq, "_loftq_init_new", cpu_init)
    cfg = tiny("lora.init=loftq", "precision=nf4", "lora.targets=[all_linear]", "lora.r=32", "lora.alpha=64")
    ids = _ids()
    full = _logits(_base(tiny()), ids)
    q_base = _base(cfg)
    err_4bit = (_logits(q_base, ids) - full).abs().mean()
    model, _ = adapter_stage.apply_adapter(q_base, cfg.lora, task="causal_lm", quantized=True,
                                           source=resolve_source(cfg.model))
    err_loftq = (_logits(model, ids) - full).abs().mean()
    assert err_loftq < 0.5 * err_4bit, (float(err_loftq), float(err_4bit))


def _perturb(model):
    """Stand-in for training: move every A and B."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_pissa_adapter_saves_as_plain_lora_that_reloads_and_merges_to_the_same_logits(tiny, tmp_path):
    from peft import PeftModel

    cfg = tiny("lora.init=pissa", "lora.r=4", "lora.alpha=8", "lora.dropout=0")
    model, info = _adapt(cfg)
    _perturb(model)
    ids = _ids(3)
    trained = _logits(model, ids)
    adapter_stage.save_adapter(model, info, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the start's folder is gone
    # on a fresh, unmodified base the saved plain LoRA gives the trained model's logits
    reloaded = PeftModel.from_pretrained(_base(cfg), str(tmp_path / "adapter"))
    assert (_logits(reloaded, ids) - trained).abs().max() < 1e-4
    merged = reloaded.merge_and_unload()
    assert (_logits(merged, ids) - trained).abs().max() < 1e-4
    assert (_logits(_base(cfg), ids) - trained).abs().max() > 1e-3  # the training did change the model


# ---------------------------------------------------------------- whole runs

VARIANTS = {
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "pissa": ["lora.init=pissa", "lora.dropout=0"],
    "olora": ["lora.init=olora"],
    "gaussian": ["lora.init=gaussian"],
    "loraplus_x16": ["lora.loraplus_lr_ratio=16"],
    "rank_pattern": ["lora.targets=[all_linear]", "++lora.rank_pattern={q_proj:16}"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_trains_tiny_llama_and_records_its_variant(tiny, name):
    cfg = tiny(*VARIANTS[name], "study=variants", "train.num_threads=1", "optimizer.lr=1e-3")
    out = job.run(cfg, show_progress=False)
    assert out.status == "completed", out.error
    m = read_record(out.run_dir)["metrics"]
    assert m["lora/variant"] == (name if name != "rank_pattern" else "lora")
    assert m["train/steps"] == 4 and math.isfinite(m["train/loss"]) and math.isfinite(m["val/loss"])
    assert m["params/trainable"] == m["plan/params_trainable"]
    assert (Path(out.run_dir) / "adapter" / "adapter_config.json").is_file()
    if name == "loraplus_x16":
        assert m["optimizer/scaled_lr_tensors"] == 4
    if name == "rslora":
        assert m["lora/scaling"] == pytest.approx(16 / math.sqrt(8))
    # the saved adapter on a fresh base, merged or not, reproduces the run's own validation loss
    r = merge.merge_run(out.run_dir, save=False)
    assert r["passed"] and r["score_before"]["val/loss"] == pytest.approx(m["val/loss"], abs=1e-5), r


@pytest.fixture(scope="module")
def pissa_run(tmp_path_factory):
    """A PiSSA run scored on lm-eval's arithmetic tasks before and after training, and a plain LoRA run of
    the same base in another study (so it computes its own base score: with B = 0 that is the base)."""
    root = tmp_path_factory.mktemp("pissa")
    common = ["model=tiny_llama", "logger=none", f"results_dir={root}", "train.max_steps=4", "train.batch_size=4",
              "train.max_seq_len=80", "data.n_train=64", "data.n_val=16", "data.n_test=16", "eval=arithmetic",
              "eval.limit=8", "train.num_threads=1", "optimizer.lr=1e-3", "lora.dropout=0"]
    pissa = job.run(compose(*common, "study=p", "lora.init=pissa"), show_progress=False)
    plain = job.run(compose(*common, "study=l"), show_progress=False)
    assert pissa.status == plain.status == "completed", (pissa.error, plain.error)
    return Path(pissa.run_dir), Path(plain.run_dir)


def test_pissa_base_score_is_the_unmodified_models(pissa_run):
    p, lora = (read_record(d)["metrics"] for d in pissa_run)
    key = "eval_base/lorasweep_arithmetic_ll/perplexity"  # continuous: equal only if the model is the same
    assert key in p and p[key] == lora[key]
    assert "eval_base/reused" not in p  # computed by the PiSSA run itself, before its adapter existed
    assert p["eval/lorasweep_arithmetic_ll/perplexity"] != p[key]  # and training moved it


def test_pissa_run_merges_and_reloads_to_its_recorded_score(pissa_run):
    r = merge.merge_run(pissa_run[0])
    assert r["passed"], r
    # base + saved plain LoRA reproduces the in-memory PiSSA model's validation loss
    rec = read_record(pissa_run[0])["metrics"]
    assert r["score_before"]["val/loss"] == pytest.approx(rec["val/loss"], abs=1e-5)
    assert r["score_after"]["val/loss"] == pytest.approx(rec["val/loss"], abs=1e-5)


def test_pissa_adapter_switches_beside_a_plain_one_on_one_base(pissa_run):
    res = switch.switch_eval(list(pissa_run))
    for row, d in zip(res["rows"], pissa_run):
        assert row["val/loss"] == pytest.approx(read_record(d)["metrics"]["val/loss"], abs=1e-5)


def test_an_unconverted_pissa_adapter_is_refused_on_load(pissa_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pissa_run[0], run)
    acfg = run / "adapter" / "adapter_config.json"
    acfg.write_text(json.dumps({**json.loads(acfg.read_text()), "init_lora_weights": "pissa"}))
    with pytest.raises(RunFolderError, match="saved without conversion"):
        merge.merge_run(run, save=False)


def test_pissa_on_a_classifier_keeps_its_trained_head_in_the_saved_adapter(tmp_path):
    from tiny_encoder import tiny_bert_dir, write_glue_folder

    bert, folder = tiny_bert_dir(tmp_path), write_glue_folder(tmp_path / "sst2", n_train=32, n_dev=16, n_test=8)
    cfg = compose("model=minilm_l6", f"model.name_or_path={bert}", "model.name=tiny_bert", "logger=none",
                  f"results_dir={tmp_path / 'results'}", "data=sst2", f"data.path={folder}", "train.batch_size=8",
                  "train.max_seq_len=32", "train.max_steps=4", "optimizer.lr=1e-2", "lora=r2_a4_qv",
                  "lora.init=pissa", "lora.dropout=0", "train.num_threads=1")
    out = job.run(cfg, show_progress=False)
    assert out.status == "completed", out.error
    from safetensors.torch import load_file

    saved = load_file(Path(out.run_dir) / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved) and any(".lora_A." in k for k in saved)
    r = merge.merge_run(out.run_dir, save=False)  # peft's conversion alone would drop the head
    assert r["passed"] and r["score_before"]["val/loss"] == pytest.approx(out.metrics["val/loss"], abs=1e-5)


# ---------------------------------------------------------------- refusals, before any weight loads

@pytest.mark.parametrize("overrides, field", [
    (["lora.init=pissa", "precision=nf4"], "lora.init"),
    (["lora.init=olora", "precision=fp4"], "lora.init"),
    (["lora.init=loftq"], "lora.init"),
    (["lora.init=svd"], "lora.init"),
    (["lora.init=pissa", "lora.use_dora=true"], "lora.use_dora"),
    (["lora.init=pissa", "lora.use_rslora=true", "++lora.rank_pattern={q_proj:4}"], "lora.use_rslora"),
    (["lora.loraplus_lr_ratio=0"], "lora.loraplus_lr_ratio"),
    (["++lora.rank_pattern={q_proj:0}"], "lora.rank_pattern[q_proj]"),
    (["lora.layers_to_transform=[-1]"], "lora.layers_to_transform"),
    (["lora=full", "lora.use_dora=true"], "lora.use_dora"),
])
def test_bad_combinations_are_refused_naming_the_field(tiny, overrides, field):
    with pytest.raises(ConfigError) as e:
        validate(tiny(*overrides))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(field + "="), msg


def test_a_rank_pattern_key_that_is_no_regex_is_refused(tiny):
    cfg = tiny()
    cfg.lora.rank_pattern = {"q_proj(": 4}  # brackets do not pass Hydra's override grammar; a YAML file can hold them
    with pytest.raises(ConfigError, match=r"^lora.rank_pattern='q_proj\(': not a regular expression"):
        validate(cfg)


def test_dora_with_pissa_is_fine_when_nothing_is_saved(tiny):
    validate(tiny("lora.init=pissa", "lora.use_dora=true", "train.save_adapter=false"))
    validate(tiny("lora.use_dora=true", "precision=nf4"))  # QDoRA: peft handles 4-bit DoRA (tested above)


@pytest.mark.parametrize("overrides, field", [
    (["++lora.rank_pattern={layers.7.self_attn.q_proj:16}"], "lora.rank_pattern"),
    (["++lora.alpha_pattern={gate_proj:16}"], "lora.alpha_pattern"),  # targets are q,v only
    (["lora.exclude_modules=[o_proj]"], "lora.exclude_modules"),
    (["lora.layers_to_transform=[0,5]"], "lora.layers_to_transform"),
    (["lora.exclude_modules=[q_proj,v_proj]"], "lora.exclude_modules / lora.layers_to_transform"),
])
def test_patterns_that_name_nothing_are_refused_before_weights_load(tiny, overrides, field, monkeypatch):
    import lorasweep.run.model as model_stage

    cfg = tiny(*overrides)
    validate(cfg)  # well-formed: only the model's module names show the mistake
    monkeypatch.setattr(model_stage, "build_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(pipeline.PreflightError) as e:
        pipeline.preflight(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(field), msg


# ---------------------------------------------------------------- the study

def test_planner_counts_dora_magnitudes_and_activations(tiny):
    sk = build_skeleton(tiny().model)
    lora, dora = plan(tiny(), sk), plan(tiny("lora.use_dora=true"), sk)
    assert dora.params_trainable - lora.params_trainable == 4 * 64  # one magnitude per output row
    assert dora.activations_gb > lora.activations_gb and dora.peak_gb > lora.peak_gb


@pytest.mark.slow
def test_lora_variants_study_runs_every_arm_and_reports_by_variant(tmp_path):
    from lorasweep.analysis.report import load_study, write_report

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "lorasweep.cli", "sweep=lora_variants", "model=tiny_llama", "seed=0",
           "train.max_steps=2", "eval=val", "logger=none", "train.batch_size=2", "train.max_seq_len=80",
           "data.n_train=32", "data.n_val=8", "data.n_test=8", "train.num_threads=1", f"results_dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = load_study(out / "lora_variants")
    assert len(df) == 10 and (df["status"] == "completed").all(), df[["run_id", "status", "error"]].to_string()
    assert set(df["variant"]) == {"lora", "rslora", "dora", "pissa", "loraplus_x16"}
    md = write_report(out / "lora_variants")["md"].read_text()
    assert "| variant | r | status |" in md  # one row per variant and rank (seed=0 only here)
    for col in ("train time", "peak RSS GB", "trainable", "val loss"):
        assert f"| {col} |" in md
    assert "## Verdicts" in md and "variant=dora > variant=lora" in md  # the study's claims are judged
