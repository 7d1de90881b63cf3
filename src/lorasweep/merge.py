"""`lorasweep-merge <run folder>`: fold a run's LoRA adapter into its base weights, and prove it.

Parity: the max |logit difference| between base+adapter and the merged model over one fixed
validation batch must stay below a tolerance for the precision (fp32: 1e-4), and the run's
validation score must not change. Writes <run>/merged (a plain HF model, no peft needed to
load it) and <run>/merge.json; prints one parity line; exits 1 when parity fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .run import model as model_stage
from .run.reload import RunFolderError, adapter_dir, load_config, logits_on, score, val_batches

log = logging.getLogger("lorasweep")

# Max |logit diff| allowed per forward dtype; half precisions scale with the logits' size.
LOGIT_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SCORE_KEYS = ("val/loss", "val/accuracy", "val/f1")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def merge_run(run_dir: str | Path, *, tol: float | None = None, device: str | None = None,
              save: bool = True, overrides: list[str] | None = None) -> dict:
    """Merge, check parity and score, save; returns the parity report (also written to merge.json)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = load_config(run_dir, overrides)
    adir = adapter_dir(run_dir, cfg)
    notes = []
    pc = cfg.precision
    if pc.quant != "none":
        # Merging into 4-bit weights would re-quantize the sum; merge into the unquantized base instead.
        pc = dataclasses.replace(pc, quant="none", weights_dtype=pc.weights_dtype)
        notes.append(f"trained on a {cfg.precision.quant} base; merged into the {pc.weights_dtype} base weights")
    dev = model_stage.pick_device(device or cfg.train.device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    t0 = time.perf_counter()
    loaded = model_stage.build_model(cfg.model, pc, dev)
    model = PeftModel.from_pretrained(loaded.model, str(adir)).to(dev)
    model.eval()
    val = val_batches(cfg, loaded.tokenizer)
    batch = next(val.epoch(0))  # the fixed batch: the first validation batch, unshuffled
    autocast = model_stage.DTYPES[pc.autocast] if pc.autocast != "none" else None
    fwd_dtype = autocast or model_stage.DTYPES[pc.weights_dtype]

    before_logits = logits_on(model, batch, dev, autocast)
    before = score(model, cfg, val, dev)
    merged = model.merge_and_unload()
    after_logits = logits_on(merged, batch, dev, autocast)
    after = score(merged, cfg, val, dev)

    base_tol = LOGIT_TOL.get(fwd_dtype, 1e-2)
    if tol is None:
        scale = 1.0 if fwd_dtype == torch.float32 else max(1.0, float(before_logits.abs().max()))
        tol = base_tol * scale
    diff = float((after_logits - before_logits).abs().max())
    loss_tol = tol if fwd_dtype == torch.float32 else 1e-2
    n = before.get("val/examples") or before.get("val/tokens") or 1
    score_ok = abs(after["val/loss"] - before["val/loss"]) <= loss_tol
    if "val/accuracy" in before:  # a near-tie example may flip under rounding: allow one
        score_ok = score_ok and abs(after["val/accuracy"] - before["val/accuracy"]) <= 1.0 / n + 1e-12
    report = {
        "run_dir": str(run_dir), "adapter": str(adir), "dtype": _dtype_name(fwd_dtype),
        "fixed_batch": {"examples": int(batch["input_ids"].shape[0]), "tokens": int(batch["n_tokens"])},
        "max_abs_logit_diff": diff, "tolerance": tol, "logits_ok": diff <= tol,
        "score_before": {k: before[k] for k in SCORE_KEYS if k in before},
        "score_after": {k: after[k] for k in SCORE_KEYS if k in after},
        "score_ok": score_ok, "notes": notes,
    }
    if save:
        out = run_dir / "merged"
        merged.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        report["merged_dir"] = str(out)
        # the saved folder must load without peft and give the same logits
        reloaded = model_stage._auto_class(cfg.model).from_pretrained(out, dtype=model_stage.DTYPES[pc.weights_dtype]).to(dev)
        report["reload_max_abs_logit_diff"] = float((logits_on(reloaded, batch, dev, autocast) - after_logits).abs().max())
        report["reload_ok"] = report["reload_max_abs_logit_diff"] <= tol
        del reloaded
    report["passed"] = bool(report["logits_ok"] and score_ok and report.get("reload_ok", True))
    report["time_s"] = time.perf_counter() - t0
    (run_dir / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parity_line(r: dict) -> str:
    sb, sa = r["score_before"], r["score_after"]
    scores = ", ".join(f"{k} {sb[k]:.4f} -> {sa[k]:.4f}" for k in sb)
    verdict = "OK" if r["passed"] else "FAILED"
    return (f"merge parity {verdict}: max |logit diff| {r['max_abs_logit_diff']:.2e} "
            f"({'<=' if r['logits_ok'] else '>'} {r['tolerance']:.0e}, {r['dtype']}, "
            f"{r['fixed_batch']['examples']} examples); {scores}"
            + (f"; merged model: {r['merged_dir']}" if r.get("merged_dir") else ""))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lorasweep-merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run folder: <results_dir>/<study>/<run_id> with adapter/")
    ap.add_argument("overrides", nargs="*", help="eval-time overrides, e.g. data.max_val_examples=200")
    ap.add_argument("--tol", type=float, default=None, help="max |logit diff| allowed (default by precision; fp32 1e-4)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    ap.add_argument("--no-save", action="store_true", help="check parity only; do not write <run>/merged")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[lorasweep] %(message)s")
    try:
        r = merge_run(a.run_dir, tol=a.tol, device=a.device, save=not a.no_save, overrides=a.overrides)
    except (RunFolderError, OSError, ValueError) as e:
        print(f"lorasweep-merge: {e}", file=sys.stderr)
        sys.exit(2)
    print(parity_line(r))
    sys.exit(0 if r["passed"] else 1)


if __name__ == "__main__":
    main()
