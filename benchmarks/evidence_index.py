"""results/reference/README.md: every reference study's verdicts at a glance, from the reports
benchmarks/run_evidence.sh committed (each study's summary.md and how.md).

    python benchmarks/evidence_index.py
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "results" / "reference"
HEAD = """# Reference reports (CPU scale)

Each folder is one study of `sweeps/` run at the scale its file's header states (SmolLM2-135M-Instruct,
or all-MiniLM-L6-v2 for SST-2, on a 2-core CPU with no GPU), every arm over 3 seeds (5 for `seeds`),
reported by `lorasweep-report`: `summary.md` (verdicts, across-seeds tables with 95% t-intervals,
Welch intervals against the baseline arm, every run), `summary.csv`, `arms.csv`, the plots, and
`how.md` (the exact command, wall time, machine, git commit, package versions). Made with
`benchmarks/run_evidence.sh <study> ...`; this page with `python benchmarks/evidence_index.py`.

Scores are what these studies measure. Every verdict line states its design's minimum detectable
effect (`mde`, 95% confidence, 80% power): **underpowered** means the design could not have detected
the effect the claim needs (the line says how many seeds would), **inconclusive** that it could and
the interval still spans the margin. Time claims are judged only on runs that trained alone (their
record's `contention/others_share` under 10%), else **shared cores**; the older studies' records
predate that figure, and their runs shared the two cores. Claims that hold by construction are
marked so and are not findings. The older folders were judged again from their `summary.csv`
(see each `how.md`); the pilot (`pilot/`) measured how the seed spread falls with validation size
and steps.
"""


VERDICT = re.compile(r"- \*\*(reproduced|not reproduced|opposite|underpowered|inconclusive|shared cores)\*\* (.*)")
QUALITY = ("val/", "test/", "eval/", "eval_delta/")


def parsed(md: str) -> list[dict]:
    """Each verdict line of a summary.md: verdict, metric, text, numbers, by construction or not."""
    out, built = [], False
    for line in md.splitlines():
        if line.startswith("_Hold by construction"):
            built = True
        elif line.startswith("## ") and "Verdicts" not in line:
            built = False
        m = VERDICT.match(line)
        if m:
            claim = m.group(2).split(" -- ")[0]
            nums = m.group(2).split(" -- ", 1)[1] if " -- " in m.group(2) else ""
            metric = re.match(r"`([^`]+)`", claim)
            out.append({"verdict": m.group(1), "claim": claim, "nums": nums.split(". Article:")[0],
                        "metric": metric.group(1) if metric else "", "by_construction": built})
    return out


def verdicts(md: str) -> list[str]:
    return [f"- **{v['verdict']}**{' (by construction)' if v['by_construction'] else ''} {v['claim']}: {v['nums']}"
            for v in parsed(md)]


def quality_tally(mds: list[str]) -> str:
    """The quality verdicts (scores and losses, not by construction): how many state their mde and how
    many the design could answer (any verdict but underpowered)."""
    q = [v for md in mds for v in parsed(md) if v["metric"].startswith(QUALITY) and not v["by_construction"]]
    with_mde = [v for v in q if "mde " in v["nums"] or "mde " in v["claim"]]
    powered = [v for v in with_mde if v["verdict"] != "underpowered"]
    if not q:
        return ""
    return (f"**Quality verdicts** (val/, test/, eval/ metrics; by-construction claims excluded): {len(q)} lines, "
            f"{len(with_mde)} state their mde, {len(powered)} were powered ({100 * len(powered) / len(q):.0f}%: "
            f"every verdict but underpowered); by verdict: "
            + ", ".join(f"{sum(v['verdict'] == k for v in q)} {k}" for k in
                        ("reproduced", "not reproduced", "opposite", "inconclusive", "underpowered")
                        if any(v["verdict"] == k for v in q)) + ".\n")


def cell(md: str) -> str:
    """A study's verdicts as one README table cell: each claim, its verdict, its diff and mde."""
    out = []
    for v in parsed(md):
        claim = re.sub(r"^`([^`]+)`: ", r"\1: ", v["claim"])
        mde = re.findall(r"mde ([-\d.,e]+(?:\.\.[-\d.,e]+)?)", v["nums"])
        diff = re.search(r"diff (-?[\d.,e]+) ", v["nums"])
        extra = []
        if diff and "comparisons" not in v["nums"]:
            extra.append(f"diff {diff.group(1)}")
        if mde:
            extra.append(f"mde {mde[0]}")
        if v["verdict"] == "shared cores":
            extra.append("runs shared the cores")
        tag = " (by construction)" if v["by_construction"] else ""
        out.append(f"{claim}{tag}: **{v['verdict']}**" + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(out)


def main() -> None:
    import sys

    if sys.argv[1:] == ["--cells"]:  # the README findings table's verdict cells
        for d in sorted(p for p in ROOT.iterdir() if p.is_dir() and (p / "summary.md").exists()):
            print(f"{d.name}\t{cell((d / 'summary.md').read_text())}")
        return
    parts = [HEAD]
    dirs = sorted(p for p in ROOT.iterdir() if p.is_dir())
    tally = quality_tally([(d / "summary.md").read_text() for d in dirs if (d / "summary.md").exists()])
    if tally:
        parts.append(tally)
    for d in dirs:
        md = (d / "summary.md").read_text() if (d / "summary.md").exists() else ""
        how = (d / "how.md").read_text() if (d / "how.md").exists() else ""
        wall = re.search(r"wall time (\d+ min(?: \d+ s)?)", how)
        runs = re.search(r"^(\d+ runs?: [^\n]+)", md, re.M)
        parts.append(f"## [{d.name}]({d.name}/summary.md)\n")
        pilot = re.search(r"^## What it decides\n\n(.+)$", md, re.M)
        if pilot:  # the pilot has no claims: its decision is the line to read
            parts.append(f"{len([p for p in d.iterdir() if (p / 'record.json').is_file()])} runs"
                         + (f"; wall time {wall.group(1)}" if wall else "") + ".\n")
            parts.append(pilot.group(1).split(". So ")[0] + ".\n")
            continue
        parts.append(f"{runs.group(1).rstrip('.') if runs else 'no summary'}"
                     + (f"; wall time {wall.group(1)}" if wall else "") + ".\n")
        parts.extend(verdicts(md) or ["- (no claims judged)"])
        parts.append("")
    studies = sorted(p.stem for p in (ROOT.parents[1] / "sweeps").glob("*.yaml"))
    missing = [s for s in studies if not (ROOT / s / "summary.md").exists() and s not in ("quickstart", "smoke")]
    if missing:
        parts.append("## Not yet run at evidence scale\n")
        parts.append(", ".join(f"`{m}`" for m in missing) + ": `benchmarks/run_evidence.sh " + " ".join(missing) + "`.\n")
    (ROOT / "README.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
