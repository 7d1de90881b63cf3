"""Plain-text tables printed at the end of a run or a sweep."""
from __future__ import annotations

from pathlib import Path

COLUMNS = [("train/loss", "train loss", "{:.4f}"), ("val/loss", "val loss", "{:.4f}"),
           ("mem/peak_rss_gb", "peak RSS GB", "{:.3f}"), ("mem/peak_allocated_gb", "peak alloc GB", "{:.3f}"),
           ("time/train_s", "train s", "{:.1f}"), ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
           ("params/trainable", "trainable", "{:,}")]


def _fmt(metrics: dict | None, key: str, fmt: str) -> str:
    v = (metrics or {}).get(key)
    return "-" if v is None else fmt.format(v)


def _score_columns(outcomes: list[dict]) -> list[tuple[str, str, str]]:
    """Benchmark scores (base and tuned side by side) and classifier accuracy, when present."""
    keys = sorted({k for o in outcomes for k in (o.get("metrics") or {})
                   if k.startswith(("eval/", "eval_base/")) and not k.endswith(("_stderr", "perplexity", "reused"))
                   or k in ("val/accuracy", "val/f1")})
    keys.sort(key=lambda k: (k.split("/", 1)[-1], not k.startswith("eval_base/")))
    return [(k, ("base " if k.startswith("eval_base/") else "") + k.split("/", 1)[1].replace("lorasweep_", ""), "{:.3f}")
            for k in keys]


def format_table(outcomes: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in (o.get("metrics") or {}) for o in outcomes)]
    cols += _score_columns(outcomes)
    header = ["run", "status"] + [c[1] for c in cols]
    rows = [[o["run_id"], o["status"]] + [_fmt(o.get("metrics"), k, f) for k, _, f in cols] for o in outcomes]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def print_run(outcome) -> None:
    print(format_table([outcome.__dict__]))
    print(f"record: {outcome.run_dir}/record.json")


def print_sweep(outcomes: list[dict], results_dir: Path, expected: int | None = None) -> int:
    """Print the sweep's table, its tally and each failure; return the number of runs that
    failed, counting runs that never reported (their job was killed) as failed."""
    n = {s: sum(o["status"] == s for o in outcomes)
         for s in ("completed", "failed", "skipped", "elsewhere", "interrupted", "pruned")}
    missing = max(0, (expected or 0) - len(outcomes))
    print()
    if outcomes:
        print(format_table(outcomes))
    print(f"\nsweep: {n['completed']} completed, "
          + (f"{n['pruned']} pruned, " if n["pruned"] else "")
          + f"{n['failed']} failed, {n['skipped']} skipped"
          + (f", {n['interrupted']} interrupted" if n["interrupted"] else "")
          + (f", {n['elsewhere']} running elsewhere" if n["elsewhere"] else "")
          + (f", {missing} did not report" if missing else "")
          + f" ({len(outcomes) + missing} runs) -> {results_dir}")
    done_before = [o["run_id"] for o in outcomes if o["status"] == "skipped" and not o.get("error")]
    if done_before:
        print(f"  skipped (already completed; rerun=true to redo): {', '.join(done_before)}")
    for o in outcomes:
        if o["status"] == "skipped" and o.get("error"):  # e.g. over planner.budget_gb: the reason it gave
            print(f"  skipped {o['run_id']}: {o['error']}")
    elsewhere = [f"{o['run_id']} ({o['error'].removeprefix('running elsewhere (')}" for o in outcomes
                 if o["status"] == "elsewhere"]
    if elsewhere:
        print(f"  running elsewhere (another launch holds the lease; see lease.json): {', '.join(elsewhere)}")
    interrupted = [o["run_id"] for o in outcomes if o["status"] == "interrupted"]
    if interrupted:
        print(f"  interrupted (checkpoint saved; relaunch the same command to resume): {', '.join(interrupted)}")
    for o in outcomes:
        if o["status"] == "pruned":  # stopped early by the pruner: the rule and its numbers
            print(f"  pruned {o['run_id']}: {o['error']}")
    for o in outcomes:
        if o["status"] == "failed":
            where = f" [{' '.join(o['overrides'])}]" if o.get("overrides") else ""
            print(f"  FAILED {o['run_id']}{where}: {o['error']}")
    if missing:
        print(f"  {missing} run(s) ended without a word (killed?); re-launch the same command to redo them")
    return n["failed"] + missing
