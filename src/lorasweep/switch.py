"""`lorasweep-eval <run> <run> ... [key=value ...]`: several runs' adapters on ONE base model.

The base loads once; each run's LoRA adapter is added with peft's multi-adapter API
(load_adapter) and selected with set_adapter, then scored on that run's validation data.
Overrides (eval.*, data.*, train.max_seq_len, train.device) apply to every run, e.g.
data.val_split=test. Prints a table; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .run import model as model_stage
from .run.reload import RunFolderError, adapter_dir, load_config, score, val_batches

log = logging.getLogger("lorasweep")



def _base_key(cfg) -> str:
    d = {"model": vars(cfg.model), "precision": vars(cfg.precision)}
    return json.dumps(d, sort_keys=True, default=str)


def switch_eval(run_dirs: list[str | Path], overrides: list[str] | None = None, *, include_base: bool = False,
                device: str | None = None) -> dict:
    """Score each run's adapter on one shared base; returns {"rows": [...], "base_load_s": ...}."""
    from peft import PeftModel

    if not run_dirs:
        raise RunFolderError("give at least one run folder")
    cfgs = [load_config(d, overrides) for d in run_dirs]
    adirs = [adapter_dir(d, c) for d, c in zip(run_dirs, cfgs)]
    key0 = _base_key(cfgs[0])
    for d, c in zip(run_dirs[1:], cfgs[1:]):
        if _base_key(c) != key0:
            raise RunFolderError(f"{d}: model/precision differ from {run_dirs[0]} "
                                 f"({c.model.name}/{c.precision.name} vs {cfgs[0].model.name}/{cfgs[0].precision.name}); "
                                 f"adapters switch only on the same base")
    dev = model_stage.pick_device(device or cfgs[0].train.device)
    if cfgs[0].train.num_threads > 0:
        import torch

        torch.set_num_threads(cfgs[0].train.num_threads)
    t0 = time.perf_counter()
    loaded = model_stage.build_model(cfgs[0].model, cfgs[0].precision, dev)
    base_load_s = time.perf_counter() - t0

    names = [f"run{i}" for i in range(len(run_dirs))]  # adapter names must be valid module keys
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(loaded.model, str(adirs[0]), adapter_name=names[0])
    for name, adir in zip(names[1:], adirs[1:]):
        model.load_adapter(str(adir), adapter_name=name)
    model.to(dev)
    adapters_load_s = time.perf_counter() - t0
    base_id = id(model.get_base_model())

    data_cache: dict[str, object] = {}

    def data_for(cfg):
        k = json.dumps([vars(cfg.data), cfg.train.max_seq_len, cfg.eval.batch_size], sort_keys=True, default=str)
        if k not in data_cache:
            data_cache[k] = val_batches(cfg, loaded.tokenizer)
        return data_cache[k]

    rows = []
    if include_base:
        with model.disable_adapter():
            m = score(model, cfgs[0], data_for(cfgs[0]), dev)
        rows.append({"run": "(base, no adapter)", "adapter": "-", **m})
    for name, d, cfg in zip(names, run_dirs, cfgs):
        model.set_adapter(name)
        m = score(model, cfg, data_for(cfg), dev)
        rows.append({"run": Path(d).name, "adapter": name, "run_dir": str(d), **m})
    assert id(model.get_base_model()) == base_id  # one base throughout: nothing was reloaded
    return {"rows": rows, "base": cfgs[0].model.name, "base_load_s": base_load_s,
            "adapters_load_s": adapters_load_s, "n_adapters": len(names)}


def format_table(res: dict) -> str:
    rows = res["rows"]
    keys = [k for k in ("val/loss", "val/accuracy", "val/f1", "val/perplexity") if any(k in r for r in rows)]
    head = ["run", *keys, "eval s"]
    body = [[r["run"], *(f"{r[k]:.4f}" if k in r else "-" for k in keys), f"{r.get('time/val_s', 0):.1f}"]
            for r in rows]
    w = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(n) for x, n in zip(line, w)) for line in [head, ["-" * n for n in w], *body]]
    lines.append(f"base {res['base']} loaded once in {res['base_load_s']:.1f} s; "
                 f"{res['n_adapters']} adapters added in {res['adapters_load_s']:.1f} s (peft load_adapter/set_adapter)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lorasweep-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("args", nargs="+", help="run folders, then key=value overrides (eval.*, data.*, ...)")
    ap.add_argument("--base", action="store_true", help="also score the base model with no adapter")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the first run's train.device)")
    ap.add_argument("--json", default=None, help="write the result rows to this file")
    a = ap.parse_args(argv)
    runs = [x for x in a.args if "=" not in x]
    overrides = [x for x in a.args if "=" in x]
    logging.basicConfig(level=logging.WARNING, format="[lorasweep] %(message)s")
    try:
        res = switch_eval(runs, overrides, include_base=a.base, device=a.device)
    except (RunFolderError, OSError, ValueError) as e:
        print(f"lorasweep-eval: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
