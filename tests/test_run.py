"""One run end to end on tiny_llama: it trains, evaluates and records the truth."""
import json
from pathlib import Path

import pytest
import torch

from lorasweep import job
from lorasweep.run.record import read_record

REQUIRED_METRICS = ["train/loss", "val/loss", "val/perplexity", "mem/peak_rss_gb", "time/train_s", "time/total_s",
                    "throughput/tokens_per_s", "params/trainable", "params/total"]


def test_run_trains_and_records_every_figure(tiny):
    cfg = tiny("train.max_steps=30", "optimizer.lr=3e-3", "train.log_every=5", "lora=r16_a32_all_linear")
    out = job.run(cfg, show_progress=False)
    assert out.status == "completed", out.error
    rec = read_record(Path(out.run_dir))
    assert rec["status"] == "completed" and rec["error"] is None
    assert rec["run_id"] == out.run_id and rec["study"] == "t"
    m = rec["metrics"]
    for k in REQUIRED_METRICS:
        assert k in m, k
    assert m["train/loss"] < m["train/first_loss"] - 0.2  # the loss goes down
    assert 0 < m["params/trainable"] < m["params/total"]
    assert m["mem/peak_rss_gb"] > 0.1
    assert m["throughput/tokens_per_s"] > 0
    assert m["train/steps"] == 30
    for k in ("python", "torch", "transformers", "peft", "bitsandbytes", "lm_eval", "git_commit", "cpu", "gpu_count"):
        assert k in rec["env"]
    assert rec["config"]["lora"]["r"] == 16
    steps = [json.loads(l) for l in (Path(out.run_dir) / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 5, 10, 15, 20, 25, 30]
    assert all("train/loss" in s for s in steps)
    assert (Path(out.run_dir) / "config.yaml").read_text().startswith("model:")
    assert (Path(out.run_dir) / "adapter" / "adapter_model.safetensors").exists()
    assert "trainable" in (Path(out.run_dir) / "params.tsv").read_text()


def test_pinned_losses_on_a_fixed_seed(tiny):
    """Same seed -> the same numbers, and they match the values pinned here (torch==2.13.0 CPU)."""
    a = job.run(tiny("train.max_steps=6", "optimizer.lr=1e-2", "study=a"), show_progress=False)
    b = job.run(tiny("train.max_steps=6", "optimizer.lr=1e-2", "study=b"), show_progress=False)
    la, lb = a.metrics["train/loss"], b.metrics["train/loss"]
    assert la == lb
    assert a.metrics["train/first_loss"] == pytest.approx(PINNED_FIRST, abs=2e-3)
    assert la == pytest.approx(PINNED_LAST, abs=2e-3)
    assert la < a.metrics["train/first_loss"]


PINNED_FIRST = 4.6697
PINNED_LAST = 4.4153


def test_lora_trains_only_the_adapter(tiny):
    from lorasweep.run import adapter as ad, model as mo

    cfg = tiny()
    loaded = mo.build_model(cfg.model, cfg.precision, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    model, info = ad.apply_adapter(loaded.model, cfg.lora, task="causal_lm", quantized=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    assert info.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    from lorasweep.run.data import prepare_data
    from lorasweep.run.train import train

    data = prepare_data(cfg.data, loaded.tokenizer, max_seq_len=80, batch_size=4, seed=0)
    train(model, data.train, cfg.optimizer, cfg.train, device=torch.device("cpu"), autocast_dtype=None,
          log=lambda s, m: None, show_progress=False)
    base = model.get_base_model()
    for n, p in base.named_parameters():
        if "lora_" in n:
            continue
        key = n.replace(".base_layer", "")
        assert torch.equal(p, before[key]), f"{n} changed but is frozen"


def test_full_and_partial_methods_choose_what_trains(tiny):
    from lorasweep.run import adapter as ad, model as mo

    for method, check in (("full", lambda n: True), ("partial_qv", lambda n: "q_proj" in n or "v_proj" in n)):
        cfg = tiny(f"lora={method}")
        loaded = mo.build_model(cfg.model, cfg.precision, torch.device("cpu"))
        model, info = ad.apply_adapter(loaded.model, cfg.lora, task="causal_lm", quantized=False)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(check(n) for n in trainable)
        if method == "full":
            assert info.trainable == info.total


def test_failed_run_closes_wandb_and_records_failure(tiny, monkeypatch):
    import wandb
    from lorasweep.run import train as train_stage

    def boom(*a, **k):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(train_stage, "train", boom)
    out = job.run(tiny("logger=wandb_offline"), show_progress=False)
    assert out.status == "failed" and "simulated crash" in out.error
    assert wandb.run is None  # finished in `finally`
    rec = read_record(Path(out.run_dir))
    assert rec["status"] == "failed" and "simulated crash" in rec["error"]
    assert "mem/peak_rss_gb" in rec["metrics"]
    assert list((Path(out.run_dir) / "wandb").glob("offline-run-*"))
    assert (Path(out.run_dir) / "error.log").read_text().count("Traceback") == 1


def test_wandb_offline_run_lives_in_the_run_folder(tiny):
    out = job.run(tiny("logger=wandb_offline"), show_progress=False)
    assert out.status == "completed", out.error
    runs = list((Path(out.run_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_max_steps_zero_evaluates_the_model_as_loaded(tiny):
    out = job.run(tiny("train.max_steps=0"), show_progress=False)
    assert out.status == "completed", out.error
    assert out.metrics["train/steps"] == 0 and "val/loss" in out.metrics
    assert "train/loss" not in out.metrics


def test_diverging_run_is_recorded_with_its_step(tiny):
    # An infinite SGD step makes every weight inf: the loss of step 2 is NaN, found at the log of step 5.
    out = job.run(tiny("optimizer=sgd", "optimizer.lr=inf", "optimizer.max_grad_norm=null",
                            "train.max_steps=20", "train.log_every=5"), show_progress=False)
    assert out.status == "failed"
    assert "diverged at step 2" in out.error


def test_completed_run_is_skipped_on_relaunch(tiny):
    first = job.run(tiny(), show_progress=False)
    again = job.run(tiny(), show_progress=False)
    assert first.status == "completed" and again.status == "skipped" and again.run_id == first.run_id
    forced = job.run(tiny("rerun=true"), show_progress=False)
    assert forced.status == "completed"
