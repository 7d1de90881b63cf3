"""Benchmark 3: a sweep's fixed cost per run (start-up, model load, data, record, W&B) vs its train time.

Three ways a sweep runs its jobs, measured side by side in one invocation:

  fresh process   what submitit_local does: `lorasweep ... train.max_steps=0 eval=none` in a new
                  process, so everything but training and evaluation (interpreter and imports,
                  Hydra, model load, data, record, W&B)
  in-process      Hydra's basic launcher: runs after the first in one process, base reloaded each run
  in-process+reuse  the same with train.reuse_base=true: the loaded base is kept between runs
                    (adapter unloaded, base weights hash-checked after every run)

Fixed cost = a run's wall time - its train time - its validation time. The verdict is for a
1-minute run (--run-s): fixed cost / run-s <= 10%.

  python benchmarks/bench_sweep_overhead.py --model smollm2_135m --logger wandb_offline
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil as U  # noqa: F401  (puts src/ on the path)

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lorasweep.cli import conf_dir, register_schema, to_run_config

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return to_run_config(hcompose(config_name="config", overrides=overrides))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--logger", default="wandb_offline", help="wandb_offline | none")
    ap.add_argument("--data", default="arithmetic", help="arithmetic, or a path to alpaca-format json")
    ap.add_argument("--steps", type=int, default=4, help="train steps per run (the train time is excluded)")
    ap.add_argument("--runs", type=int, default=3, help="runs per in-process mode (after one warm-up run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--run-s", type=float, default=60.0, help="train time of the run the verdict is for")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_MODE", "offline")
    data = ["data=arithmetic"] if a.data == "arithmetic" else ["data=alpaca", f"data.path={a.data}"]
    common = [f"model={a.model}", f"logger={a.logger}", *data, f"results_dir={out}", "study=overhead",
              f"train.num_threads={a.threads}", "train.batch_size=4", "train.max_seq_len=128",
              "data.max_val_examples=16", "data.n_val=16", "rerun=true"]

    # 1. a fresh process per run: everything except training and evaluation
    fresh = []
    for i in range(2):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "lorasweep.cli", *common, "train.max_steps=0", "eval=none",
                            f"lora.r={4 + i}"], cwd=REPO, capture_output=True, text=True)
        fresh.append(time.perf_counter() - t)
        if p.returncode != 0:
            raise SystemExit(f"fresh-process run failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    print(f"fresh process, no training: {', '.join(f'{s:.1f}' for s in fresh)} s", flush=True)

    # 2./3. in one process, the basic launcher's way; the first run pays imports and is not counted
    from lorasweep import job
    from lorasweep.run import basecache, pipeline

    # Count the CPU time spent training/validating, to take it out of the run's CPU time as well:
    # on a shared machine wall time also counts other jobs' turns on the cores.
    busy = {"cpu": 0.0}

    def clocked(fn):
        def wrapper(*args, **kw):
            c = time.process_time()
            try:
                return fn(*args, **kw)
            finally:
                busy["cpu"] += time.process_time() - c
        return wrapper

    pipeline.train_stage.train = clocked(pipeline.train_stage.train)
    pipeline.eval_stage.validation_loss = clocked(pipeline.eval_stage.validation_loss)
    modes: dict[str, list[dict]] = {"in-process": [], "in-process+reuse": []}
    job.run(compose(common + [f"train.max_steps={a.steps}", "lora.r=2"]), show_progress=False)
    for mode, reuse in (("in-process", False), ("in-process+reuse", True)):
        if reuse:  # the block's first run loads the base it then keeps; it is not counted
            job.run(compose(common + [f"train.max_steps={a.steps}", "lora.r=2", "train.reuse_base=true"]),
                         show_progress=False)
        for i in range(a.runs):
            cfg = compose(common + [f"train.max_steps={a.steps}", f"lora.r={4 * (i + 1)}",
                                    f"train.reuse_base={str(reuse).lower()}", f"seed={i}"])
            busy["cpu"] = 0.0
            t, c = time.perf_counter(), time.process_time()
            o = job.run(cfg, show_progress=False)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if o.status != "completed":
                raise SystemExit(f"{mode} run failed: {o.error}")
            m = o.metrics
            fixed = wall - m["time/train_s"] - m.get("time/val_s", 0.0)
            fixed_cpu = cpu - busy["cpu"]
            modes[mode].append({"wall_s": wall, "fixed_s": fixed, "fixed_cpu_s": fixed_cpu, "load_s": m["time/load_s"],
                                "train_s": m["time/train_s"], "reused": m.get("model/base_reused", 0)})
            print(f"  {mode:17s} run {i + 1}: wall {wall:5.1f} s, train {m['time/train_s']:5.1f} s, "
                  f"fixed {fixed:5.2f} s, {fixed_cpu:5.2f} CPU-s (load {m['time/load_s']:.2f} s, reused={m.get('model/base_reused', 0)})",
                  flush=True)
    basecache.drop()

    fresh_fixed = U.med(fresh)
    rows = [["fresh process per run", fresh_fixed, float("nan"), float("nan"), 100 * fresh_fixed / a.run_s]]
    result = {"fresh_process_fixed_s": fresh_fixed}
    for mode, runs in modes.items():
        f, ld = U.med([r["fixed_s"] for r in runs]), U.med([r["load_s"] for r in runs])
        fc = U.med([r["fixed_cpu_s"] for r in runs])
        rows.append([mode, f, ld, fc, 100 * f / a.run_s])
        result[mode] = {"fixed_s": f, "fixed_cpu_s": fc, "load_s": ld, "runs": runs}
    print(U.table(rows, ["mode", "fixed s/run (median)", "of which load s", "fixed CPU-s",
                         f"% of a {a.run_s:.0f} s run (wall)"]))
    for r in rows[1:]:
        print(f"{r[0]}: fixed cost {r[4]:.1f}% of a {a.run_s:.0f} s run by wall time, "
              f"{100 * r[3] / a.run_s:.1f}% by CPU time")
    best = min(min(r[4], 100 * r[3] / a.run_s) for r in rows[1:])
    print(f"goal <= 10% for an in-process sweep: {'met' if best <= 10 else 'MISSED'} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wall time counts other jobs' turns)")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
