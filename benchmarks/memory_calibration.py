"""Planner vs measured peak memory, each run in a FRESH `lorasweep` process.

CPU (default): a grid over tiny_llama / smollm2_135m, fp32 vs nf4, LoRA r, batch and sequence
length; compares plan/peak_gb with the recorded mem/peak_rss_gb.
    python benchmarks/memory_calibration.py [--quick] [--steps 2] [--out /tmp/calib]
CUDA: `--gpu-7b` builds a random-init Llama-2-7B-shaped model (LlamaConfig, no download), saves it
once as bf16, and compares bf16 LoRA vs nf4 QLoRA (r=8 on q,v, micro-batch 1) with
mem/peak_allocated_gb (decimal GB). The seed reported 21.33 GB vs 14.18 GB for these settings.
    python benchmarks/memory_calibration.py --gpu-7b [--seq 512] [--steps 3]

Every training sequence is filled to train.max_seq_len (generated long records, truncated), so
the plan's worst-case activation figure is also the real one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

CPU_GRID = [  # (model, precision, r, batch, seq, targets)
    ("tiny_llama", "fp32", 8, 1, 128, "qv"),
    ("tiny_llama", "nf4", 8, 1, 128, "qv"),
    ("tiny_llama", "fp32", 64, 8, 512, "all_linear"),
    ("tiny_llama", "nf4", 64, 8, 512, "all_linear"),
    ("smollm2_135m", "fp32", 8, 1, 128, "qv"),
    ("smollm2_135m", "nf4", 8, 1, 128, "qv"),
    ("smollm2_135m", "fp32", 8, 4, 256, "qv"),
    ("smollm2_135m", "nf4", 32, 4, 256, "qv"),
]
QUICK = [g for g in CPU_GRID if g[0] == "tiny_llama"]


def long_records(path: Path, n: int = 64) -> Path:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an be this are which or".split()
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": "Continue the text.", "input": "",
                                "output": " ".join(rng.choice(words) for _ in range(1500))}) + "\n")
    return path


def overrides(model: str, prec: str, r: int, batch: int, seq: int, targets: str, data: Path, steps: int) -> list[str]:
    return [f"model={model}", f"precision={prec}", f"lora.r={r}", f"lora.alpha={2 * r}", f"lora.targets=[{targets}]",
            f"train.batch_size={batch}", f"train.max_seq_len={seq}", f"train.max_steps={steps}",
            "data=jsonl", f"data.path={data}", "eval=none", "logger=none", "train.save_adapter=false"]


def predicted(ovr: list[str], device_type: str) -> float:
    from lorasweep.plan_cli import compose_run_config
    from lorasweep.run.planner import plan_run

    return plan_run(compose_run_config(ovr), device_type=device_type).peak_gb


def measure(ovr: list[str], out: Path, key: str) -> dict:
    """One run in a fresh process; its record's metrics (or the error)."""
    study = f"calib{int(time.time() * 1000) % 10**9}"
    cmd = ["lorasweep", *ovr, f"results_dir={out}", f"study={study}", "rerun=true"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    recs = list((out / study).glob("*/record.json"))
    if not recs:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no record"]}
    rec = json.loads(recs[0].read_text())
    if rec["status"] != "completed":
        return {"error": rec.get("error")}
    return rec["metrics"]


def report(rows: list[tuple[str, float, float]], unit: str) -> None:
    print(f"\n{'config':<52s} {'plan GB':>8s} {unit:>14s} {'error':>8s}")
    worst = 0.0
    for name, plan_gb, meas in rows:
        err = 100.0 * (plan_gb - meas) / meas
        worst = max(worst, abs(err))
        print(f"{name:<52s} {plan_gb:8.3f} {meas:14.3f} {err:+7.1f}%")
    print(f"worst |error|: {worst:.1f}% (goal: within 15%)")


def cpu(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = long_records(out / "long.jsonl")
    rows = []
    for g in (QUICK if args.quick else CPU_GRID):
        model, prec, r, b, s, t = g
        name = f"{model} {prec} r{r} {t} b{b} s{s}"
        ovr = overrides(model, prec, r, b, s, t, data, args.steps)
        plan_gb = predicted(ovr, "cpu")
        m = measure(ovr, out, name)
        if "error" in m:
            print(f"{name}: run failed: {m['error']}", flush=True)
            continue
        meas = m["mem/peak_rss_gb"]
        print(f"{name}: plan {plan_gb:.3f} GB, measured {meas:.3f} GB "
              f"(load {m.get('mem/load_peak_rss_gb', 0):.3f}, train {m.get('mem/train_peak_rss_gb', 0):.3f})", flush=True)
        rows.append((name, plan_gb, meas))
    report(rows, "measured RSS")


def llama7b_dir(root: Path) -> Path:
    """A random-init Llama-2-7B-shaped model saved once in bf16 (no download)."""
    folder = root / "llama2_7b_random"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorasweep.run.model import char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def gpu_7b(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = long_records(out / "long.jsonl")
    folder = llama7b_dir(Path(args.model_root))
    seed = {"bf16_true": 21.33, "nf4": 14.18}
    rows = []
    for prec in ("bf16_true", "nf4"):
        ovr = overrides("llama2_7b", prec, 8, 1, args.seq, "qv", data, args.steps)
        ovr += [f"model.name_or_path={folder}", "train.device=cuda"]
        plan_gb = predicted(ovr, "cuda")
        t0 = time.time()
        m = measure(ovr, out, prec)
        if "error" in m:
            print(f"{prec}: run failed: {m['error']}", flush=True)
            continue
        meas = m["mem/peak_allocated_gb"]
        print(f"{prec}: plan {plan_gb:.2f} GB, measured allocated {meas:.2f} GB, reserved "
              f"{m.get('mem/peak_reserved_gb', 0):.2f} GB, seed {seed[prec]} GB ({time.time() - t0:.0f} s)", flush=True)
        rows.append((f"llama2-7b-shape {prec} r8 qv b1 s{args.seq}", plan_gb, meas))
    report(rows, "allocated GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-7b", action="store_true", help="CUDA: Llama-2-7B-shaped bf16 LoRA vs nf4 QLoRA")
    ap.add_argument("--quick", action="store_true", help="CPU: tiny_llama rows only")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512, help="--gpu-7b sequence length")
    ap.add_argument("--out", default="/tmp/lorasweep_calibration")
    ap.add_argument("--model-root", default=os.path.expanduser("~/.cache/lorasweep/models"))
    args = ap.parse_args()
    gpu_7b(args) if args.gpu_7b else cpu(args)


if __name__ == "__main__":
    sys.exit(main())
