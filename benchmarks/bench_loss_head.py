"""The loss head: output head at labelled positions + chunked cross-entropy (train.loss_head=labelled,
the default) vs logits at every position (train.loss_head=full, the model's own forward).

One process; the two paths alternate (labelled first on even trials, full first on odd ones), each
trial resetting the LoRA weights, the optimizer and the RNG, so both see the same work and the
same machine state. A step is what the harness does: batch_loss_sum / loss tokens, backward, clip,
AdamW. Printed per shape: tokens/s (padding excluded; by process CPU time, the fair clock of a
one-thread run on shared cores, and by wall time), the train peak RSS (VmHWM over the steps, reset
before each trial after giving freed memory back), the part of it above the resident set before
the steps, and the ratios labelled / full. The losses of the two paths are compared step by step.

Shapes:
  quickstart    SmolLM2-135M, LoRA r=8 all linear (--rank, --dropout 0.05), the generated arithmetic data: 8 rows of ~48
                tokens with ~4 answer tokens (sweep=quickstart's batches)
  alpaca        SmolLM2-135M, LoRA r=8 all linear, ../shared/data/alpaca/alpaca_5000.json packed
                into 512-token rows (answers only in the loss)
  llama3_vocab  a 2-layer Llama (h=256) with Llama-3's 128,256-token vocabulary (random init),
                the alpaca rows' label layout with random ids: the logits' memory at Llama-3 scale
With --compile: eager vs train.compile (torch.compile of the decoder) on the quickstart shape,
labelled path: compile time, tokens/s after it, and the steps it takes to pay for itself.

  python benchmarks/bench_loss_head.py --threads 1
  python benchmarks/bench_loss_head.py --threads 1 --shapes quickstart --compile
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
from pathlib import Path

import torch

import benchutil as U
from lorasweep.run import adapter as adapter_stage
from lorasweep.run import data as data_stage
from lorasweep.config import DataConfig, LoraConfig
from lorasweep.run.loss import batch_loss_sum, describe

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"
PATHS = ("labelled", "full")
INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
LLAMA3_VOCAB = 128256


# ---------------------------------------------------------------- memory (CPU: the process RSS)

def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def _children_cpu_s() -> float:
    """CPU seconds of finished child processes (inductor compiles in worker processes)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _fresh_peak() -> float:
    """Freed memory back to the OS, the peak counter reset; the resident GB now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


# ---------------------------------------------------------------- shapes

def _lora(base, r: int, dropout: float):
    model, _ = adapter_stage.apply_adapter(base, LoraConfig(r=r, alpha=2 * r, dropout=dropout, targets=["all_linear"]),
                                           task="causal_lm", quantized=False)
    model.config.use_cache = False
    return model


def _batches(tok, dc: DataConfig, seq: int, batch: int, packing: bool, n: int) -> list[dict]:
    prepared = data_stage.prepare_data(dc, tok, max_seq_len=seq, batch_size=batch, seed=0, packing=packing)
    out = []
    for b in prepared.train.epoch(0):
        if b["input_ids"].shape[0] == batch:  # full micro-batches only
            out.append(b)
        if len(out) == n:
            break
    return out


def shape_quickstart(a, smol):
    model, tok = smol()
    dc = DataConfig(name="arithmetic", n_train=max(64, 8 * a.steps), n_val=8, n_test=8)
    return model, _batches(tok, dc, 128, a.batch or 8, False, a.steps)


def shape_alpaca(a, smol):
    model, tok = smol()
    dc = DataConfig(name="alpaca", path=str(a.data), template="alpaca", max_train_examples=a.alpaca_examples)
    return model, _batches(tok, dc, a.seq or 512, a.batch or 4, True, a.steps)


def shape_llama3_vocab(a, smol):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smol(load=False)
    dc = DataConfig(name="alpaca", path=str(a.data), template="alpaca", max_train_examples=a.alpaca_examples)
    layout = _batches(tok, dc, a.seq or 512, a.batch or 4, True, a.steps)
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in layout:  # the alpaca rows' label layout, Llama-3-sized ids
        ids = torch.randint(0, a.vocab, b["input_ids"].shape, generator=g)
        labels = torch.where(b["labels"] == -100, b["labels"], ids)
        batches.append({**b, "input_ids": ids, "labels": labels})
    h = a.hidden or 256
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=h, intermediate_size=int(h * 2.6875), num_hidden_layers=2,
                      num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 256),
                      max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return _lora(LlamaForCausalLM(cfg), a.rank, a.dropout), batches


SHAPES = {"quickstart": shape_quickstart, "alpaca": shape_alpaca, "llama3_vocab": shape_llama3_vocab}


# ---------------------------------------------------------------- one trial

def trial(model, batches, head: str, init: dict, device) -> dict:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    base_rss = _fresh_peak()
    losses, tokens = [], 0

    def steps():
        nonlocal tokens
        for b in batches:
            inputs = {k: b[k].to(device) for k in INPUTS if k in b}
            loss = batch_loss_sum(model, inputs, head) / max(b["n_loss_tokens"], 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += b["n_tokens"]

    wall, cpu = U.timed(steps, device)
    peak = _status("VmHWM")
    del opt
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "peak_gb": peak, "above_gb": peak - base_rss,
            "losses": losses}


def compare(name: str, model, batches, a, device) -> dict:
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    vocab = model.config.vocab_size
    B, T = batches[0]["input_ids"].shape
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) / len(batches)
    print(f"\n== {name}: {len(batches)} steps of {B} x {T} tokens, {labelled:.0f} labelled positions per "
          f"micro-batch, vocab {vocab:,}; fp32 logits of the full path {B * T * vocab * 4 / 1e9:.2f} GB; "
          f"labelled path: {describe(model, 'labelled', device)}", flush=True)
    trial(model, batches[:1], "labelled", init, device)  # warm-up: first-call costs for neither side
    trial(model, batches[:1], "full", init, device)
    runs = {p: [] for p in PATHS}
    for r in range(a.repeats):
        for head in (PATHS if r % 2 == 0 else PATHS[::-1]):
            res = trial(model, batches, head, init, device)
            runs[head].append(res)
            print(f"  trial {r + 1} {head:<8s} {res['tokens'] / res['cpu_s']:8.1f} tok/CPU-s  "
                  f"{res['tokens'] / res['wall_s']:8.1f} tok/s wall  peak {res['peak_gb']:.3f} GB "
                  f"(+{res['above_gb']:.3f} over the steps)", flush=True)
    diff = max(abs(x - y) for ra, rb in zip(runs["labelled"], runs["full"]) for x, y in zip(ra["losses"], rb["losses"]))
    out = {"shape": name, "batch": B, "seq": T, "vocab": vocab, "labelled_per_batch": labelled,
           "max_loss_diff": diff}
    for head in PATHS:
        rs = runs[head]
        out[head] = {"tok_per_cpu_s": U.med([r["tokens"] / r["cpu_s"] for r in rs]),
                     "tok_per_wall_s": U.med([r["tokens"] / r["wall_s"] for r in rs]),
                     "peak_gb": U.med([r["peak_gb"] for r in rs]), "above_gb": U.med([r["above_gb"] for r in rs])}
    n, f = out["labelled"], out["full"]
    out["ratio"] = {k: n[k] / f[k] if f[k] else float("nan") for k in n}
    return out


def compile_check(model, batches, a, device) -> dict:
    """Eager vs train.compile (the decoder compiled), labelled path, quickstart batches."""
    from lorasweep.run.compiling import compiled_part, uncompile

    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    print(f"\n== compile: {len(batches)} steps, eager vs torch.compile of the decoder (labelled path)", flush=True)
    trial(model, batches[:1], "labelled", init, device)
    eager = [trial(model, batches, "labelled", init, device) for _ in range(a.repeats)]
    t0, kids0 = time.perf_counter(), _children_cpu_s()
    compiled_part(model).compile()
    first = trial(model, batches, "labelled", init, device)  # compiles: every shape of these batches once
    compile_wall, compile_kids = time.perf_counter() - t0, _children_cpu_s() - kids0
    warm = [trial(model, batches, "labelled", init, device) for _ in range(a.repeats)]
    uncompile(model)
    e = U.med([r["cpu_s"] for r in eager]) / len(batches)
    c = U.med([r["cpu_s"] for r in warm]) / len(batches)
    # what the first pass cost beyond compiled steps: this process's CPU plus the compiler workers'
    extra = first["cpu_s"] - c * len(batches) + compile_kids
    out = {"eager_step_cpu_s": e, "compiled_step_cpu_s": c, "first_pass_cpu_s": first["cpu_s"],
           "compile_cpu_s": extra, "compile_wall_s": compile_wall, "speedup": e / c if c else float("nan"),
           "break_even_steps": extra / (e - c) if e > c else None,
           "max_loss_diff": max(abs(x - y) for x, y in zip(eager[0]["losses"], warm[0]["losses"]))}
    pays = "never" if out["break_even_steps"] is None else f"{out['break_even_steps']:.0f} steps"
    print(f"  eager {e:.3f} CPU-s/step, compiled {c:.3f} CPU-s/step ({out['speedup']:.2f}x); compiling cost "
          f"{extra:.1f} CPU-s ({compile_wall:.0f} s wall incl. the first pass, shared cores); pays for itself after {pays}",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="quickstart,alpaca,llama3_vocab")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per trial (one micro-batch each)")
    ap.add_argument("--repeats", type=int, default=3, help="trials per path (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default: 8 quickstart, 4 others)")
    ap.add_argument("--seq", type=int, default=None, help="alpaca / llama3_vocab row length (default 512)")
    ap.add_argument("--data", type=Path, default=ALPACA)
    ap.add_argument("--alpaca-examples", type=int, default=400, help="alpaca examples tokenized (enough for --steps)")
    ap.add_argument("--vocab", type=int, default=LLAMA3_VOCAB, help="llama3_vocab: vocabulary size")
    ap.add_argument("--hidden", type=int, default=None, help="llama3_vocab: width (default 256)")
    ap.add_argument("--model", default="smollm2_135m", help="quickstart/alpaca model: smollm2_135m | tiny_llama")
    ap.add_argument("--rank", type=int, default=8, help="LoRA r on all linear layers (alpha = 2r)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    ap.add_argument("--compile", action="store_true", help="also: eager vs train.compile on the quickstart shape")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    cache: dict = {}

    def smol(load: bool = True):
        """(LoRA model, tokenizer) of --model, built once and shared by the shapes that use it."""
        if "tok" not in cache:
            base, tok, _, _ = U.build(a.model, "fp32", device)
            cache["tok"], cache["base"] = tok, base
        if load and "model" not in cache:
            cache["model"] = _lora(cache.pop("base"), a.rank, a.dropout)
        return cache.get("model"), cache["tok"]

    results = []
    for name in a.shapes.split(","):
        model, batches = SHAPES[name](a, smol)
        results.append(compare(name, model, batches, a, device))
        if name == "quickstart" and a.compile:
            results.append({"shape": "compile", **compile_check(model, batches, a, device)})
    rows = [[r["shape"], f"{r['batch']}x{r['seq']}", f"{r['labelled_per_batch']:.0f}",
             r["labelled"]["tok_per_cpu_s"], r["full"]["tok_per_cpu_s"], f"{r['ratio']['tok_per_cpu_s']:.2f}x",
             f"{r['ratio']['tok_per_wall_s']:.2f}x", r["labelled"]["peak_gb"], r["full"]["peak_gb"],
             f"{r['ratio']['peak_gb']:.2f}x", f"{r['labelled']['above_gb']:.3f} / {r['full']['above_gb']:.3f}",
             f"{r['max_loss_diff']:.1e}"]
            for r in results if "ratio" in r]
    print("\n" + U.table(rows, ["shape", "rows", "labelled/mb", "labelled tok/CPU-s", "full tok/CPU-s",
                                "speed (CPU)", "speed (wall)", "labelled peak GB", "full peak GB", "peak",
                                "GB over steps (labelled / full)", "max |loss diff|"]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {a.repeats} alternating trials")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
