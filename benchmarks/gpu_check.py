"""One command that checks lorasweep's GPU paths on a machine with one NVIDIA GPU (issue 11).

    benchmarks/gpu_wheels.sh WHEELS                            # where pip reaches PyPI (~44 MB)
    python benchmarks/gpu_check.py --wheels WHEELS --out DIR   # on the GPU machine, no network
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR   # the same steps on a CPU (CI)

Steps, each timed:
 1. setup: the packages the machine lacks (bitsandbytes, Hydra, submitit) are installed from the
    wheels into DIR/site; lorasweep runs from this checkout (src/ and conf/), nothing else is installed.
 2. device: GPU model, torch/CUDA versions, bf16 support, TF32 default, the CUDA context's size.
 3. tests: the gpu-marked tests (tests/test_gpu_cuda.py: every precision x {adamw, sgd,
    paged_adamw_8bit} on tiny_llama, per-run peak reset, planner vs measured, ...); they skip on a CPU.
 4. a Llama-2-7B-architecture model with random weights, built from its config on the device and
    saved once (bf16, no hub); each arm is a real `lorasweep` run in a fresh process: LoRA r=8
    alpha=16 on q,v, micro-batch 1, 512 tokens, 30 steps, validation loss only, logger=none.
    Arms: bf16_true, nf4, nf4_dq, fp4, nf4 + SGD (the article's), and bf16_mixed and fp32 (the
    no-second-copy and load-straight-onto-the-device fixes). Per arm: peak allocated and reserved GB,
    peak host RSS while loading, step time, tokens/s, MFU against the device's dense bf16 peak,
    the planner's prediction and its error, the activation dtype and TF32 state the run recorded.
 5. DIR/gpu_check.json and DIR/gpu_check.md, with the article's 21.33 / 14.18 GB and 1.85 h /
    2.79 h beside the measured ratios. Exit status 0 when every check holds.

--tiny shrinks the model (2 layers, 256 wide) and the run (64 tokens, 3 steps) and quantizes in the
run's process (LORASWEEP_QUANT_CACHE=0) so the whole check takes a few minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution, for what the GPU image may lack (see gpu_wheels.sh)
NEEDED = {"bitsandbytes": "bitsandbytes", "hydra": "hydra_core", "omegaconf": "omegaconf",
          "antlr4": "antlr4_python3_runtime", "submitit": "submitit",
          "hydra_plugins.hydra_submitit_launcher": "hydra_submitit_launcher"}
# Llama-2-7B's architecture (config.json of meta-llama/Llama-2-7b-hf)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_SHAPE = dict(LLAMA2_7B, vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2)  # the layout, shrunk (CPU bf16 is slow)
# (precision, optimizer): the article's arms, then the fixes' own
ARMS = ["bf16_true:adamw", "nf4:adamw", "nf4_dq:adamw", "fp4:adamw", "nf4:sgd", "bf16_mixed:adamw", "fp32:adamw"]
# The article (Llama-2-7B, LoRA r=8 on q,v, lit-gpt): bf16-true LoRA vs QLoRA nf4
ARTICLE = {"bf16_peak_gb": 21.33, "nf4_peak_gb": 14.18, "bf16_hours": 1.85, "nf4_hours": 2.79}
# Dense bf16 tensor-core peaks (no sparsity), for MFU; longer names first where they overlap.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12,
                   "GH200": 989.4e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# ------------------------------------------------------------------ 1. setup

def setup(args, out: Path) -> dict:
    """The environment of every child: missing packages from the wheels, lorasweep from this checkout."""
    missing = [m for m in NEEDED if not _importable(m)]
    site = args.work / "site"
    if missing:
        if not args.wheels:
            raise SystemExit(f"missing {', '.join(missing)}: prepare wheels with `benchmarks/gpu_wheels.sh DIR` "
                             "where pip reaches PyPI, then pass --wheels DIR")
        wanted = {NEEDED[m] for m in missing}
        wheels = [w for w in Path(args.wheels).glob("*.whl") if w.name.split("-")[0].lower() in wanted]
        log(f"installing {', '.join(sorted(w.name for w in wheels))} into {site}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               LORASWEEP_CACHE=str(Path(args.cache or args.work / "cache").resolve()))
    paths = ([str(site)] if missing else []) + [str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if not _importable("lorasweep.conf"):
        env["LORASWEEP_CONF"] = str(REPO / "conf")  # a checkout that is not pip-installed
    if args.tiny:
        env["LORASWEEP_QUANT_CACHE"] = "0"
    return env


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def py(env: dict, code: str, timeout: float) -> dict:
    """Run python code in a fresh process; it prints one JSON line last."""
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError((p.stderr or p.stdout).strip()[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ 2. device

PROBE = r"""
import json, platform, torch
from lorasweep.run.model import tf32_enabled
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
     "tf32_default": tf32_enabled()}
for pkg in ("transformers", "peft", "accelerate", "bitsandbytes", "hydra-core"):
    try:
        from importlib.metadata import version
        d[pkg] = version(pkg)
    except Exception:
        d[pkg] = None
if torch.cuda.is_available() and DEVICE == "cuda":
    p = torch.cuda.get_device_properties(0)
    d.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
             memory_gb=p.total_memory / 1e9, bf16=torch.cuda.is_bf16_supported(), gpu_count=torch.cuda.device_count())
    x = torch.randn(2048, 2048, device="cuda")
    (x @ x).sum().item()  # cuBLAS loaded: the context as a run sees it
    free, total = torch.cuda.mem_get_info()
    d["cuda_context_gb"] = (total - free - torch.cuda.memory_reserved()) / 1e9
else:
    d.update(device=platform.processor() or platform.machine(), bf16=False, gpu_count=0)
print(json.dumps(d))
"""


def peak_flops(device_name: str) -> float | None:
    for k, v in PEAK_BF16_FLOPS.items():
        if k in device_name:
            return v
    return None


# ------------------------------------------------------------------ 3. tests

def run_tests(env: dict, out: Path, timeout: float) -> dict:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO / "tests" / "test_gpu_cuda.py"),
           "-p", "no:cacheprovider", f"--junitxml={xml}", "-o", "addopts="]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=timeout)
        tail, rc = (p.stdout + p.stderr)[-4000:], p.returncode
    except subprocess.TimeoutExpired as e:
        tail, rc = f"timed out after {timeout:.0f} s: {str(e.stdout or '')[-2000:]}", -1
    (out / "gpu_tests.log").write_text(tail)
    res = {"returncode": rc, "seconds": round(time.time() - t0, 1), "tests": 0, "failures": 0, "errors": 0,
           "skipped": 0, "failed": []}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for k in ("tests", "failures", "errors", "skipped"):
            res[k] = int(suite.get(k, 0))
        res["failed"] = [c.get("name") for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    res["ok"] = rc in (0, 5) and not res["failed"]  # 5: nothing collected/selected
    return res


# ------------------------------------------------------------------ 4. the 7B arms

BUILD = r"""
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lorasweep.run.model import char_tokenizer
tok = char_tokenizer()
cfg = LlamaConfig(**SHAPE, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
with torch.device(DEVICE):  # built on the device from its config: no hub, no host copy
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # checkpoints of 7B models ship in 16 bits
model.save_pretrained(FOLDER)
tok.save_pretrained(FOLDER)
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"params": n}))
"""


def build_model(env: dict, folder: Path, shape: dict, device: str, timeout: float) -> dict:
    marker = folder / "gpu_check_model.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == shape:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    code = f"SHAPE = {shape!r}\nDEVICE = {device!r}\nFOLDER = {str(folder)!r}\n" + BUILD
    info = {**py(env, code, timeout), "shape": shape}
    marker.write_text(json.dumps(info))
    return info


def long_records(path: Path, n: int, words_per: int) -> Path:
    """Instruction records long enough to fill every row (the plan's worst case is then the real one)."""
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an be this are which or".split()
    path.write_text("".join(json.dumps({"instruction": "Continue the text.", "input": "",
                                        "output": " ".join(rng.choice(words) for _ in range(words_per))}) + "\n"
                            for _ in range(n)))
    return path


def flops_per_token(shape: dict, seq: int) -> tuple[float, float]:
    """(6N + 12·L·d·s: the usual MFU convention; 4N + 12·L·d·s: what LoRA computes, no weight
    gradients for the frozen base). N excludes the input embedding table."""
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    n = L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h + v * h  # layers, final norm, lm_head
    attn = 12 * L * h * seq
    return 6 * n + attn, 4 * n + attn


def run_arm(env: dict, arm: str, args, folder: Path, data: Path, out: Path) -> dict:
    precision, optimizer = arm.split(":")
    study = f"gpu_check_{precision}_{optimizer}"
    overrides = [f"model=llama2_7b", f"model.name_or_path={folder}", f"precision={precision}", f"optimizer={optimizer}",
                 "lora=r8_a16_qv", "train.batch_size=1", "train.grad_accum=1", f"train.max_seq_len={args.seq}",
                 f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", "data=jsonl",
                 f"data.path={data}", "data.max_val_examples=4", "eval=val", "logger=none",
                 "train.save_adapter=false", f"train.device={args.device}", f"results_dir={out / 'runs'}",
                 f"study={study}", "rerun=true"]
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    t0 = time.time()
    log(f"arm {arm}: lorasweep {' '.join(overrides[2:4])} ... (fresh process)")
    try:
        p = subprocess.run([sys.executable, "-m", "lorasweep.cli", *overrides], env=env, cwd=out,
                           capture_output=True, text=True, timeout=args.arm_timeout)
        (out / "runs" / f"{study}.log").write_text(p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        return {"arm": arm, "status": "timeout", "error": f"over {args.arm_timeout} s", "wall_s": args.arm_timeout}
    recs = list((out / "runs" / study).glob("*/record.json"))
    if not recs:
        return {"arm": arm, "status": "failed", "error": (p.stderr or p.stdout).strip()[-800:],
                "wall_s": round(time.time() - t0, 1)}
    rec = json.loads(recs[0].read_text())
    m, env_rec = rec["metrics"], rec["env"]
    steps = [json.loads(l) for l in (recs[0].parent / "steps.jsonl").read_text().splitlines() if l.strip()]
    # steady state: the logging windows after the first (which holds warm-up and cuBLAS autotuning)
    steady = [s["throughput/tokens_per_s"] for s in steps if s["step"] > args.log_every] or \
             [s["throughput/tokens_per_s"] for s in steps]
    tps = sum(steady) / len(steady) if steady else 0.0
    tokens_per_step = m.get("train/tokens", 0) / max(m.get("train/steps", 1), 1)
    res = {"arm": arm, "precision": precision, "optimizer": optimizer, "status": rec["status"],
           "error": rec.get("error"), "wall_s": round(time.time() - t0, 1),
           "peak_allocated_gb": m.get("mem/peak_allocated_gb"), "peak_reserved_gb": m.get("mem/peak_reserved_gb"),
           "train_peak_allocated_gb": m.get("mem/train_peak_allocated_gb"),
           "peak_rss_gb": m.get("mem/peak_rss_gb"), "load_peak_rss_gb": m.get("mem/load_peak_rss_gb"),
           "plan_peak_gb": m.get("plan/peak_gb"), "plan_device_gb": m.get("plan/device_gb"),
           "tokens_per_s": tps, "step_s": tokens_per_step / tps if tps else None,
           "tokens_per_step": tokens_per_step, "train_loss": m.get("train/loss"), "val_loss": m.get("val/loss"),
           "load_s": m.get("time/load_s"), "train_s": m.get("time/train_s"),
           **{k: env_rec.get(k) for k in ("device", "compute_dtype", "activation_dtype", "attn_implementation", "tf32")}}
    measured = res["peak_allocated_gb"] if args.device == "cuda" else res["peak_rss_gb"]
    if measured and res["plan_peak_gb"]:
        res["measured_for_plan_gb"] = measured
        res["plan_error"] = (res["plan_peak_gb"] - measured) / measured
    if res["peak_allocated_gb"] and res["peak_reserved_gb"]:
        res["allocator_slack"] = res["peak_reserved_gb"] / res["peak_allocated_gb"] - 1
    return res


# ------------------------------------------------------------------ checks and report

def checks(arms: dict, tests: dict, device: str, weights_fp32_gb: float) -> list[dict]:
    out = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append({"check": name, "ok": bool(ok), "detail": detail})

    check("gpu-marked tests", tests.get("ok", False),
          f"{tests.get('passed', 0)} passed, {tests.get('skipped', 0)} skipped, failed: {tests.get('failed') or 'none'}")
    for a in arms.values():
        check(f"{a['arm']} completed", a["status"] == "completed", a.get("error") or "")
    done = {k: a for k, a in arms.items() if a["status"] == "completed"}
    expect = {"fp32": "float32", "bf16_mixed": "float32", "bf16_true": "bfloat16"}
    for k, a in done.items():
        want = expect.get(a["precision"], a.get("compute_dtype"))  # 4-bit: the compute dtype
        check(f"{k}: activations in {want}", a.get("activation_dtype") == want,
              f"recorded activation_dtype={a.get('activation_dtype')}, compute_dtype={a.get('compute_dtype')}")
    if device == "cuda":
        for k, a in done.items():
            check(f"{k}: TF32 on", a.get("tf32") is True, f"env.tf32={a.get('tf32')}")
        if "fp32:adamw" in done:
            rss = done["fp32:adamw"]["load_peak_rss_gb"] or 0
            check("fp32 load goes straight onto the GPU", rss < 0.6 * weights_fp32_gb,
                  f"peak host RSS while loading {rss:.1f} GB vs {weights_fp32_gb:.1f} GB of fp32 weights")
        if "bf16_mixed:adamw" in done and "bf16_true:adamw" in done:
            r = done["bf16_mixed:adamw"]["peak_allocated_gb"] / done["bf16_true:adamw"]["peak_allocated_gb"]
            check("bf16_mixed holds no second weight copy", r < 1.3,
                  f"peak allocated bf16_mixed / bf16_true = {r:.2f} (a fp32 copy + 16-bit copy would be ~3x)")
        if "nf4:adamw" in done and "bf16_true:adamw" in done:
            r = done["nf4:adamw"]["peak_allocated_gb"] / done["bf16_true:adamw"]["peak_allocated_gb"]
            check("QLoRA saves memory", r < 0.75, f"peak allocated nf4 / bf16_true = {r:.2f}")
    return out


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(result: dict) -> str:
    d, arms = result["device"], result["arms"]
    cuda = result["device_type"] == "cuda"
    mem = "peak alloc GB | peak reserved GB" if cuda else "peak RSS GB | -"
    lines = [f"# gpu_check — {d.get('device')} ({result['mode']}{'' if cuda else ', CPU: memory is peak RSS'})", "",
             f"torch {d.get('torch')} (CUDA {d.get('cuda')}), transformers {d.get('transformers')}, peft {d.get('peft')}, "
             f"bitsandbytes {d.get('bitsandbytes')}, Python {d.get('python')}; "
             f"CUDA context {fmt(d.get('cuda_context_gb'))} GB; TF32 default {d.get('tf32_default')}.",
             f"Model: Llama-2-7B architecture{' (shrunk: --tiny)' if result['mode'] != 'full' else ''}, "
             f"random weights, {result['model']['params'] / 1e6:,.0f} M parameters; LoRA r=8 alpha=16 on q,v, "
             f"micro-batch 1 x {result['seq']} tokens, {result['steps']} steps, each arm a fresh `lorasweep` process.",
             "", f"| arm | status | {mem} | plan GB | plan error | load RSS GB | step s "
             "| tokens/s | MFU (6N) | MFU (LoRA 4N) | activations | TF32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms.values():
        m1, m2 = (a.get("peak_allocated_gb"), a.get("peak_reserved_gb")) if cuda else (a.get("peak_rss_gb"), None)
        lines.append(f"| {a['arm']} | {a['status']} | {fmt(m1)} | {fmt(m2)} "
                     f"| {fmt(a.get('plan_peak_gb'))} | {fmt(a.get('plan_error'), '+.1%')} | {fmt(a.get('load_peak_rss_gb'), '.1f')} "
                     f"| {fmt(a.get('step_s'), '.3f')} | {fmt(a.get('tokens_per_s'), '.0f')} | {fmt(a.get('mfu_6n'), '.1%')} "
                     f"| {fmt(a.get('mfu_lora'), '.1%')} | {a.get('activation_dtype') or '-'} | {a.get('tf32')} |")
    c = result.get("article")
    if c:
        lines += ["", "Against the article (bf16-true LoRA vs QLoRA nf4, Llama-2-7B):", "",
                  "| | article | measured here |", "|---|---|---|",
                  f"| peak memory bf16 → nf4 | {ARTICLE['bf16_peak_gb']} → {ARTICLE['nf4_peak_gb']} GB "
                  f"({ARTICLE['nf4_peak_gb'] / ARTICLE['bf16_peak_gb']:.2f}x) | {fmt(c['bf16_peak_gb'])} → "
                  f"{fmt(c['nf4_peak_gb'])} GB ({fmt(c['memory_ratio'])}x) |",
                  f"| training time bf16 → nf4 | {ARTICLE['bf16_hours']} → {ARTICLE['nf4_hours']} h "
                  f"({ARTICLE['nf4_hours'] / ARTICLE['bf16_hours']:.2f}x) | step {fmt(c['bf16_step_s'], '.3f')} → "
                  f"{fmt(c['nf4_step_s'], '.3f')} s ({fmt(c['time_ratio'])}x) |",
                  "", "The article's figures are whole fine-tuning runs (Alpaca, longer sequences); compare ratios."]
    t = result["tests"]
    lines += ["", f"gpu-marked tests: {t.get('passed', 0)} passed, {t.get('skipped', 0)} skipped, "
                  f"{t.get('failures', 0) + t.get('errors', 0)} failed {t.get('failed') or ''} ({t.get('seconds')} s)",
              "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in result["checks"]]
    lines += ["", "Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()),
              f"Planner constants to compare: CUDA_CONTEXT_GB=0.6 vs measured {fmt(d.get('cuda_context_gb'))}; "
              f"CUDA_ALLOCATOR_SLACK=0.10 vs measured "
              + ", ".join(f"{a['arm']} {a['allocator_slack']:.2f}" for a in arms.values() if a.get("allocator_slack") is not None),
              "", f"Overall: {'PASS' if result['ok'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json / .md, the runs and the logs")
    ap.add_argument("--wheels", help="folder made by benchmarks/gpu_wheels.sh (for what the machine lacks)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a shrunk model and run (CI on a CPU)")
    ap.add_argument("--arms", default=",".join(ARMS), help="precision:optimizer,... (default: all seven)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 30; --tiny 3)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; --tiny 64)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lorasweep_gpu_check"),
                    help="big files outside --out: the random model (13.5 GB at 7B), quantized checkpoints, "
                         "installed wheels (default: %(default)s)")
    ap.add_argument("--model-dir", help="where the random model is saved (default WORK/model[_tiny]; reused "
                                        "when its shape matches)")
    ap.add_argument("--cache", help="LORASWEEP_CACHE for the runs (quantized checkpoints); default WORK/cache")
    ap.add_argument("--threads", type=int, default=0, help="train.num_threads of each arm (0: torch's default)")
    ap.add_argument("--arm-timeout", type=float, default=420)
    ap.add_argument("--tests-timeout", type=float, default=420)
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 30)
    args.seq = args.seq or (64 if args.tiny else 512)
    args.log_every = 1 if args.steps < 10 else 10
    out = Path(args.out).resolve()
    args.work = Path(args.work).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.time()

    env = setup(args, out)
    seconds["setup"] = time.time() - t
    t = time.time()
    device = py(env, f"DEVICE = {args.device!r}\n" + PROBE, 300)
    if args.device == "cuda" and device.get("gpu_count", 0) == 0:
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu --tiny on a CPU)")
    log(f"device: {device.get('device')}, torch {device.get('torch')}, CUDA {device.get('cuda')}")
    seconds["device"] = time.time() - t

    t = time.time()
    tests = {"ok": True, "skipped_by_flag": True} if args.skip_tests else run_tests(env, out, args.tests_timeout)
    if not args.skip_tests:
        log(f"gpu-marked tests: {tests['passed']} passed, {tests['skipped']} skipped, failed: {tests['failed'] or 'none'}")
    seconds["tests"] = time.time() - t

    t = time.time()
    shape = TINY_SHAPE if args.tiny else LLAMA2_7B
    folder = Path(args.model_dir).resolve() if args.model_dir else args.work / ("model_tiny" if args.tiny else "model")
    model = build_model(env, folder, shape, args.device, 900)
    data = long_records(out / "long.jsonl", n=args.steps + 24, words_per=max(80, args.seq // 2))
    seconds["model"] = time.time() - t
    log(f"model: {model['params'] / 1e6:,.0f} M parameters in {folder}")

    t = time.time()
    f6, f4 = flops_per_token(shape, args.seq)
    peak = peak_flops(device.get("device", "")) if args.device == "cuda" else None
    arms = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        a = run_arm(env, arm, args, folder, data, out)
        if a.get("tokens_per_s") and peak:
            a["mfu_6n"], a["mfu_lora"] = a["tokens_per_s"] * f6 / peak, a["tokens_per_s"] * f4 / peak
        arms[arm] = a
        log(f"  {arm}: {a['status']}, peak allocated {fmt(a.get('peak_allocated_gb'))} GB, plan {fmt(a.get('plan_peak_gb'))} GB, "
            f"step {fmt(a.get('step_s'), '.3f')} s, activations {a.get('activation_dtype')} ({a['wall_s']} s)")
    seconds["arms"] = time.time() - t

    article = None
    bf, nf = arms.get("bf16_true:adamw", {}), arms.get("nf4:adamw", {})
    key = "peak_allocated_gb" if args.device == "cuda" else "peak_rss_gb"
    if bf.get("status") == nf.get("status") == "completed" and bf.get(key) and nf.get(key):
        article = {"bf16_peak_gb": bf[key], "nf4_peak_gb": nf[key], "memory_ratio": nf[key] / bf[key],
                   "bf16_step_s": bf.get("step_s"), "nf4_step_s": nf.get("step_s"),
                   "time_ratio": nf["step_s"] / bf["step_s"] if bf.get("step_s") and nf.get("step_s") else None,
                   "article_memory_ratio": ARTICLE["nf4_peak_gb"] / ARTICLE["bf16_peak_gb"],
                   "article_time_ratio": ARTICLE["nf4_hours"] / ARTICLE["bf16_hours"]}
    weights_fp32_gb = model["params"] * 4 / 1e9
    result = {"mode": "tiny" if args.tiny else "full", "device_type": args.device, "device": device, "model": model, "seq": args.seq,
              "steps": args.steps, "tests": tests, "arms": arms, "article": article,
              "flops_per_token": {"6n": f6, "lora_4n": f4}, "peak_bf16_flops": peak,
              "checks": checks(arms, tests, args.device, weights_fp32_gb),
              "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    result["ok"] = all(c["ok"] for c in result["checks"])
    result["seconds"]["total"] = round(sum(seconds.values()), 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(report(result))
    log(f"{'PASS' if result['ok'] else 'FAIL'}: {out / 'gpu_check.md'} ({result['seconds']['total']:.0f} s)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
