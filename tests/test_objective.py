"""One optimizer step, one objective: the split into micro-batches changes nothing; lr and decay as logged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import compose
from lorasweep import job


def _alpaca_file(path: Path) -> str:
    """Answers of 1 to ~60 characters: per-micro-batch means would weight them very differently."""
    rows = [{"instruction": f"Repeat the letter {c} {n} times.", "input": "", "output": c * n}
            for c, n in zip("abcdefghijklmnopqrstuvwx", [1, 60, 2, 45, 3, 30, 1, 55, 4, 20, 2, 50, 1, 40, 5, 35,
                                                         1, 25, 3, 60, 2, 10, 1, 50])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _run(tmp_path, data_path, batch, accum, *extra):
    cfg = compose("model=tiny_llama", "logger=none", "eval=val", "data=jsonl", f"data.path={data_path}",
                  "data.template=alpaca", "data.val_fraction=0.1", "lora.dropout=0", "lora.targets=[all_linear]",
                  "train.max_seq_len=256", "train.max_steps=3", "train.log_every=1", "optimizer.lr=1e-2",
                  f"train.batch_size={batch}", f"train.grad_accum={accum}", f"results_dir={tmp_path / 'r'}",
                  f"study=b{batch}x{accum}", *extra)
    out = job.run(cfg, show_progress=False)
    assert out.status == "completed", out.error
    steps = [json.loads(l) for l in (Path(out.run_dir) / "steps.jsonl").read_text().splitlines()]
    weights = load_file(str(Path(out.run_dir) / "adapter" / "adapter_model.safetensors"))
    return out, steps, weights


def test_batch_8x1_2x4_1x8_train_identically(tmp_path):
    data = _alpaca_file(tmp_path / "d.jsonl")
    runs = [_run(tmp_path, data, b, a) for b, a in ((8, 1), (2, 4), (1, 8))]
    ref_out, ref_steps, ref_w = runs[0]
    assert len(ref_steps) == 3
    for out, steps, w in runs[1:]:
        for s, r in zip(steps, ref_steps):
            assert s["train/loss"] == pytest.approx(r["train/loss"], abs=1e-5)
            assert s["train/grad_norm"] == pytest.approx(r["train/grad_norm"], rel=1e-4)
        assert w.keys() == ref_w.keys()
        for k in w:
            torch.testing.assert_close(w[k], ref_w[k], atol=1e-5, rtol=0)
        assert out.metrics["val/loss"] == pytest.approx(ref_out.metrics["val/loss"], abs=1e-5)


def test_epoch_is_one_pass_and_its_last_step_takes_the_leftovers(tmp_path):
    data = _alpaca_file(tmp_path / "d.jsonl")  # 24 rows: 22 train, 2 val
    out, steps, _ = _run(tmp_path, data, 4, 4, "train.max_steps=null", "train.epochs=1")
    # 22 examples = 6 micro-batches of 4: one step of 4 and one of the 2 left over, then stop.
    assert out.metrics["train/steps"] == 2
    assert out.metrics["train/epochs"] == pytest.approx(1.0)
    assert [s["train/epoch"] for s in steps] == pytest.approx([4 / 6, 1.0])


def test_logged_lr_is_the_rate_the_optimizer_used(tmp_path):
    used: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        cfg = compose("model=tiny_llama", "logger=none", "eval=none", "train.max_steps=8", "train.log_every=1",
                      "train.batch_size=2", "train.max_seq_len=80", "data.n_train=32", "optimizer=adamw_cosine",
                      "optimizer.warmup_steps=3", "optimizer.lr=1e-3", f"results_dir={tmp_path}", "study=lr")
        out = job.run(cfg, show_progress=False)
    finally:
        handle.remove()
    assert out.status == "completed", out.error
    logged = [json.loads(l)["train/lr"] for l in (Path(out.run_dir) / "steps.jsonl").read_text().splitlines()]
    assert logged == used and len(used) == 8
    assert logged[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warmup: lr * (step + 1) / warmup_steps


def test_biases_and_norms_do_not_decay(tmp_path):
    cfg = compose("model=tiny_llama", "logger=none", "eval=none", "lora=full", "optimizer.weight_decay=0.1",
                  "train.max_steps=1", "train.max_seq_len=80", "data.n_train=8", f"results_dir={tmp_path}")
    from lorasweep.run import model as model_stage
    from lorasweep.run.train import decay_groups

    loaded = model_stage.build_model(cfg.model, cfg.precision, torch.device("cpu"))
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    decay, no_decay = decay_groups(loaded.model)
    assert no_decay and all("norm" in n or n.endswith("bias") for n, _ in no_decay)
    assert not any("norm" in n for n, _ in decay)
    out = job.run(cfg, show_progress=False)
    assert out.metrics["optimizer/no_decay_tensors"] == len(no_decay)
    assert out.metrics["optimizer/decay_tensors"] == len(decay)
