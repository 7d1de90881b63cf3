"""The pilot's answer: how the seed-to-seed spread of val loss falls with the validation size and the
steps trained, and what that means for a study's seeds (sweeps/pilot.yaml).

    lorasweep sweep=pilot results_dir=results
    python benchmarks/pilot.py results/pilot [--out results/reference/pilot]

For each validation size (16, 64, 200 and 1000 questions: prefixes of one split, so every seed sees
the same ones) at the last step, and for each step of the curve (32..128, on the first 200), it gives
the mean and sd of val loss over the seeds, and from that sd the minimum detectable effect (95%
confidence, 80% power; statsmodels) of an unpaired comparison of two arms with 3 and with 5 seeds,
and the seeds per arm that a 5% and a 2% difference need. Pairing arms by seed can only shrink the
spread of a difference; this pilot measures one arm, so its figures are the unpaired bound.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from statsmodels.stats.power import TTestIndPower

ALPHA, POWER = 0.05, 0.8


def mde(sd: float, n: int) -> float:
    return TTestIndPower().solve_power(effect_size=None, nobs1=n, ratio=1.0, alpha=ALPHA, power=POWER) * sd


def seeds_for(effect: float, sd: float) -> int:
    if sd == 0:
        return 2
    n = TTestIndPower().solve_power(effect_size=effect / sd, nobs1=None, ratio=1.0, alpha=ALPHA, power=POWER)
    return max(2, int(math.ceil(n)))


def read_runs(folder: Path) -> list[dict]:
    runs = []
    for d in sorted(folder.iterdir()):
        rec = d / "record.json"
        if not rec.is_file():
            continue
        r = json.loads(rec.read_text())
        if r.get("status") != "completed":
            continue
        curve = [json.loads(l) for l in (d / "val_curve.jsonl").read_text().splitlines() if l.strip()] \
            if (d / "val_curve.jsonl").is_file() else []
        runs.append({"seed": r["config"]["seed"], "metrics": r["metrics"], "curve": curve,
                     "env": r.get("env", {}), "config": r["config"]})
    return runs


def row(label: str, values: list[float]) -> dict:
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return {"cell": label, "n_seeds": len(values), "mean": mean, "sd": sd, "cv": sd / mean,
            "mde_3": mde(sd, 3), "mde_5": mde(sd, 5), "seeds_5pct": seeds_for(0.05 * mean, sd),
            "seeds_2pct": seeds_for(0.02 * mean, sd)}


def analyse(runs: list[dict]) -> dict:
    last = max(p["step"] for p in runs[0]["curve"])
    by_size = []
    for size, key in ((16, "val/first16/loss"), (64, "val/first64/loss")):
        by_size.append(row(f"{size} questions, step {last}", [r["metrics"][key] for r in runs]))
    by_size.append(row(f"200 questions, step {last}",
                       [next(p["val/loss"] for p in r["curve"] if p["step"] == last) for r in runs]))
    n_val = runs[0]["metrics"].get("val/tokens")
    by_size.append(row(f"1000 questions, step {last}", [r["metrics"]["val/loss"] for r in runs]))
    steps = sorted({p["step"] for p in runs[0]["curve"]})
    by_steps = [row(f"200 questions, step {s}", [next(p["val/loss"] for p in r["curve"] if p["step"] == s)
                                                  for r in runs]) for s in steps]
    return {"by_size": by_size, "by_steps": by_steps, "seeds": sorted(r["seed"] for r in runs),
            "val_tokens_1000": n_val}


def table(rows: list[dict]) -> str:
    out = ["| design | seeds | mean val loss | sd | sd/mean | mde, 3 seeds/arm | mde, 5 seeds/arm | seeds/arm for 5% | seeds/arm for 2% |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['cell']} | {r['n_seeds']} | {r['mean']:.4f} | {r['sd']:.4f} | {100 * r['cv']:.1f}% | "
                   f"{r['mde_3']:.4f} ({100 * r['mde_3'] / r['mean']:.1f}%) | {r['mde_5']:.4f} "
                   f"({100 * r['mde_5'] / r['mean']:.1f}%) | {r['seeds_5pct']} | {r['seeds_2pct']} |")
    return "\n".join(out)


def decision(res: dict) -> str:
    """The design the measurements point to, in words computed from them."""
    size, steps = res["by_size"], res["by_steps"]
    small, big = size[0], size[-1]
    first, last = steps[0], steps[-1]
    falls_size = big["sd"] < 0.7 * small["sd"]
    falls_steps = last["cv"] < 0.7 * first["cv"]
    best = min(size + steps, key=lambda r: r["seeds_5pct"])
    return (f"The seed spread {'falls' if falls_size else 'does not fall'} with the validation size "
            f"(sd {small['sd']:.3f} on {small['cell'].split(',')[0]}, {big['sd']:.3f} on {big['cell'].split(',')[0]}) "
            f"and {'falls' if falls_steps else 'does not fall'} with the steps (sd/mean {100 * first['cv']:.1f}% at "
            f"{first['cell'].split(', ')[1]}, {100 * last['cv']:.1f}% at {last['cell'].split(', ')[1]}): "
            + ("the seed itself (data order, initialisation), not the validation set, sets the noise. "
               if not falls_size else "a larger validation set pays. ")
            + f"The cheapest cell here still needs {best['seeds_5pct']} seeds per arm for a 5% difference "
            f"({best['cell']}), unpaired. So at this scale no affordable design powers a claim of a few percent: "
            "the studies keep 3 seeds and pair their arms by seed (same data order and initialisation, the one "
            "lever left), use 100-200 validation questions (cheap, and clear of the 0-or-1 floors of 16-32), "
            "give each arm its own lr where the lr is a confound, and report every claim's mde with the seeds it "
            "would need; only claims of large effects (memory, parameters, tens of percent in loss) can be powered.")


def markdown(res: dict, runs: list[dict], source: str) -> str:
    times = [r["metrics"].get("time/train_s", 0) for r in runs]
    shares = [r["metrics"].get("contention/others_share") for r in runs]
    env = runs[0]["env"]
    lines = ["# Pilot: how large must a CPU-scale study be?", "",
             f"`{source}`: the seeds study's configuration (SmolLM2-135M-Instruct, arithmetic, LoRA r=8 alpha=16 "
             f"on q,v, AdamW 1e-3 constant, 4 sequences a step), seeds {res['seeds']}; every 32 steps the first "
             "200 validation questions, at the end the first 16, 64 and all 1000. Made with "
             "`lorasweep sweep=pilot` and `python benchmarks/pilot.py <folder>`.", "",
             "## Spread against validation size (last step)", "", table(res["by_size"]), "",
             "## Spread against steps trained (first 200 questions)", "", table(res["by_steps"]), "",
             "`mde`: the smallest difference of two arms' means an unpaired t-test finds at 95% confidence with "
             "80% power, from this sd (statsmodels `TTestIndPower`). `seeds/arm for 5%`: seeds each arm needs to "
             "detect a difference of 5% of the mean. The sd comes from "
             f"{len(runs)} seeds, so it is itself known only to about ±{100 / math.sqrt(2 * (len(runs) - 1)):.0f}%; "
             "pairing the arms by seed (same data order and initialisation) can only lower the spread of a "
             "difference, so these are the unpaired bound.", "",
             "## What it decides", "", decision(res), "",
             f"Machine: {env.get('cpu', '?')}, torch {env.get('torch', '?')}; train time per run "
             f"{min(times):.0f}-{max(times):.0f} s, two runs at a time on one thread each "
             + (f"(others' CPU share {min(s for s in shares if s is not None):.2f}-"
                f"{max(s for s in shares if s is not None):.2f})" if any(s is not None for s in shares) else
                "(contention not recorded)") + ": times are not a finding here."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="the pilot's study folder, e.g. results/pilot")
    ap.add_argument("--out", default=None, help="where summary.md and pilot.json go (default: the folder)")
    a = ap.parse_args(argv)
    runs = read_runs(Path(a.folder))
    if len(runs) < 2:
        raise SystemExit(f"pilot: {a.folder} has {len(runs)} completed runs; it needs 2 seeds at least")
    res = analyse(runs)
    out = Path(a.out or a.folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pilot.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(res, runs, "sweeps/pilot.yaml"))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
