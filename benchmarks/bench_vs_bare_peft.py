"""Benchmark 1: lorasweep's training loop vs a bare PEFT loop, same model and batch shapes.

Both train the same PEFT-wrapped model (LoRA r=8, alpha=16, q/v; AdamW lr 2e-4, clip 1.0) on
fixed-length random tokens (every token trained; --answer-tokens N: only each row's last N, the
rest masked like a prompt, where the harness's loss head skips the masked positions). The harness side is lorasweep.run.train.train with
its real per-step machinery (batch collation from token lists, step records written to
steps.jsonl, memory readings, schedule); the bare side reuses pre-built tensors. Trials alternate
harness/bare and the LoRA weights are reset before each, so both see the same work and the
same machine state. Goal: harness tokens/s >= 0.97 x bare.

  python benchmarks/bench_vs_bare_peft.py --model smollm2_135m --seq 128 --batch 4 --steps 24
  python benchmarks/bench_vs_bare_peft.py --model llama2_7b_shape --device cuda --precision nf4 --seq 512
  python benchmarks/bench_vs_bare_peft.py --model smollm2_135m --seq 48 --batch 8 --answer-tokens 4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import benchutil as U
from lorasweep.run import adapter as adapter_stage
from lorasweep.run import train as train_stage
from lorasweep.config import LoraConfig, OptimizerConfig, TrainConfig
from lorasweep.run.data import Batches
from lorasweep.run.memory import PeakTracker
from lorasweep.run.record import RunRecord


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m", help="tiny_llama | smollm2_135m | llama2_7b_shape")
    ap.add_argument("--precision", default="fp32", choices=sorted(U.PRECISIONS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per trial")
    ap.add_argument("--repeats", type=int, default=3, help="trials per side (alternating)")
    ap.add_argument("--targets", default="qv", help="lora targets preset: qv | attention | all_linear")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--layers", type=int, default=None, help="shape models: override the layer count")
    ap.add_argument("--hidden", type=int, default=None, help="shape models: override the width (smoke tests)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--answer-tokens", type=int, default=0,
                    help="train on the last N tokens of each row only, the rest masked like a prompt "
                         "(both sides; 0 = every token)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    base, tok, n_layers, hidden = U.build(a.model, a.precision, device, a.layers, a.hidden)
    if a.grad_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    quant = a.precision == "nf4"
    model, info = adapter_stage.apply_adapter(base, LoraConfig(r=8, alpha=16, dropout=0.05, targets=[a.targets]),
                                              task="causal_lm", quantized=quant,
                                              grad_checkpointing=a.grad_checkpointing)
    model.config.use_cache = False  # both sides: no KV cache while training
    autocast = torch.bfloat16 if a.precision == "nf4" and device.type == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def reset() -> None:
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(init[n])
        torch.manual_seed(0)

    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n_ex = a.batch * a.steps
    ids = torch.randint(4, vocab, (n_ex, a.seq), generator=g)
    labels = ids.clone()
    if a.answer_tokens:  # a prompt-masked shape: the loss on each row's last answer_tokens tokens
        labels[:, : a.seq - a.answer_tokens] = -100
    examples = [{"input_ids": r.tolist(), "labels": l.tolist()} for r, l in zip(ids, labels)]
    batches = Batches(examples, a.batch, pad_id=0, shuffle=True, seed=0)
    oc = OptimizerConfig(name="adamw", lr=2e-4, max_grad_norm=1.0)
    tokens = a.steps * a.batch * a.seq
    rundir = Path(tempfile.mkdtemp(prefix="bench_bare_"))

    def harness(steps: int) -> None:
        tc = TrainConfig(max_steps=steps, batch_size=a.batch, max_seq_len=a.seq, log_every=10)
        record = RunRecord(rundir, "bench", "bench", {})
        mem = PeakTracker(device)
        mem.start("train")
        train_stage.train(model, batches, oc, tc, device=device, autocast_dtype=autocast,
                          log=record.log_step, memory=mem, show_progress=False)
        mem.close()

    bare_batches = [(ids[s:s + a.batch].to(device), torch.ones(a.batch, a.seq, dtype=torch.long, device=device),
                     labels[s:s + a.batch].to(device)) for s in range(0, n_ex, a.batch)]

    def bare(steps: int) -> None:
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        for x, m, y in bare_batches[:steps]:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = model(input_ids=x, attention_mask=m, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    print(f"model {a.model} ({info.summary_line}), precision {a.precision}, device {device}, "
          f"batch {a.batch} x seq {a.seq}" + (f" ({a.answer_tokens} answer tokens/row)" if a.answer_tokens else "")
          + f", {a.steps} steps/trial, {a.repeats} trials/side, "
          f"threads {torch.get_num_threads()}", flush=True)
    for fn in (harness, bare):  # warm-up: allocator, kernels, lazy imports
        reset()
        fn(2)
    res: dict[str, list[float]] = {"harness": [], "bare": []}
    res_cpu: dict[str, list[float]] = {"harness": [], "bare": []}
    peaks: dict[str, dict] = {}
    for i in range(a.repeats):
        order = (("harness", harness), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("harness", harness))
        for name, fn in order:
            reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu = U.timed(lambda: fn(a.steps), device)
            res[name].append(tokens / wall)
            res_cpu[name].append(tokens / cpu)
            if device.type == "cuda":
                peaks[name] = {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                               "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
            print(f"  trial {i + 1} {name:8s} {tokens / wall:10.1f} tokens/s wall, {tokens / cpu:10.1f} per CPU-s",
                  flush=True)
    # A CPU run with one thread is judged on CPU time (other jobs' share of the core is not ours).
    by_cpu = device.type == "cpu" and torch.get_num_threads() == 1
    h, b = U.med(res["harness"]), U.med(res["bare"])
    hc, bc = U.med(res_cpu["harness"]), U.med(res_cpu["bare"])
    ratio = hc / bc if by_cpu else h / b
    out = {"model": a.model, "precision": a.precision, "device": str(device), "seq": a.seq, "batch": a.batch,
           "steps": a.steps, "repeats": a.repeats, "threads": torch.get_num_threads(),
           "harness_tokens_per_s": h, "bare_tokens_per_s": b, "wall_ratio": h / b,
           "harness_tokens_per_cpu_s": hc, "bare_tokens_per_cpu_s": bc, "cpu_ratio": hc / bc, "ratio": ratio}
    rows = [["harness (lorasweep.run.train)", h, hc], ["bare PEFT loop", b, bc]]
    header = ["loop", "tokens/s wall (median)", "tokens/CPU-s (median)"]
    peak = U.peak_flops(device)
    if device.type == "cuda":
        f6, f4 = U.train_flops_per_token(model, n_layers, hidden, a.seq)
        header += ["peak alloc GB", "peak reserved GB", "MFU (6N)", "MFU (LoRA 4N)"]
        for r, name in zip(rows, ("harness", "bare")):
            tps = r[1]
            r += [peaks[name]["peak_allocated_gb"], peaks[name]["peak_reserved_gb"],
                  tps * f6 / peak if peak else float("nan"), tps * f4 / peak if peak else float("nan")]
            out[name] = dict(peaks[name], mfu_6n=r[-2], mfu_lora=r[-1])
        out["gpu"] = torch.cuda.get_device_name(device)
    print(U.table(rows, header))
    print(f"ratio harness/bare = {ratio:.3f} by {'CPU time' if by_cpu else 'wall time'} "
          f"(wall {h / b:.3f}, CPU {hc / bc:.3f}); goal >= 0.97: {'met' if ratio >= 0.97 else 'MISSED'}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
