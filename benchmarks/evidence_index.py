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

Scores are what these studies measure; times were taken with two runs sharing the two cores (and
development work beside them) unless `how.md` says otherwise, so read time ratios as indicative.
A verdict is judged on the interval, so **inconclusive** means the seeds' spread is wider than the
effect at this scale, not that the article is wrong.
"""


def verdicts(md: str) -> list[str]:
    out = []
    for line in md.splitlines():
        m = re.match(r"- \*\*(reproduced|not reproduced|opposite|inconclusive)\*\* (.*)", line)
        if m:
            claim = m.group(2).split(" -- ")[0]
            nums = m.group(2).split(" -- ", 1)[1] if " -- " in m.group(2) else ""
            nums = nums.split(". Article:")[0]
            out.append(f"- **{m.group(1)}** {claim}: {nums}")
    return out


def main() -> None:
    parts = [HEAD]
    for d in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        md = (d / "summary.md").read_text() if (d / "summary.md").exists() else ""
        how = (d / "how.md").read_text() if (d / "how.md").exists() else ""
        wall = re.search(r"wall time (\d+ min(?: \d+ s)?)", how)
        runs = re.search(r"^(\d+ runs?: [^\n]+)", md, re.M)
        parts.append(f"## [{d.name}]({d.name}/summary.md)\n")
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
