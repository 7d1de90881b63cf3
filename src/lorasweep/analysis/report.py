"""A study folder (<results_dir>/<study>/) -> summary.csv, summary.md and plots.

    load_study(folder)                 one row per run: swept parameters, status, every metric
    write_report(folder, baseline=..)  writes summary.csv, arms.csv, summary.md and the study's plots
    lorasweep-report <folder> [--baseline 'precision=fp32']

Which parameters were swept is read from the records themselves (the config values that differ
between runs), so the report needs no study file and works for any `-m` grid. A study file's
`reference:` block (kept in every record's config) adds the question, the article's finding and
its figures, printed beside the measured ones.

Runs that differ only in `seed` form an arm; the report gives each arm's mean, sd, n and 95%
t-interval, each arm's Welch interval against the baseline arm, and a verdict per claim in the
study's `reference.claims`.

The work is split by job: report_data (the study as a DataFrame), report_stats (intervals over
seeds), report_claims (verdicts), report_tables (summary.md), report_plots (plots); this module
writes the files and is the command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The public API stays importable from lorasweep.analysis.report (notebooks, tests, users' scripts).
from .report_data import (HEADERS, ReportError, find_baseline, has_records, load_steps, load_study,  # noqa: F401
                          load_summary_csv, memory_key, primary_score, score_keys)
from .report_plots import (make_plots, plot_heatmap, plot_loss_curves, plot_mem_vs_time,  # noqa: F401
                           plot_score_by_run, plot_score_vs_param, plot_seed_spread)
from .report_tables import diff_table, seed_table, summary_markdown, summary_table  # noqa: F401
from .report_claims import evaluate_claims, parse_claims  # noqa: F401
from .report_stats import arm_stats, t_interval, welch_interval  # noqa: F401


# ----------------------------------------------------------------------------- entry points

def study_reference(study: str, study_file: str | Path | None = None) -> dict:
    """The reference block (question, claims) of a study file: the one given, else lorasweep's own
    sweeps/<study>.yaml."""
    import yaml

    from ..compose import conf_dir

    path = Path(study_file) if study_file else Path(conf_dir()) / "sweep" / f"{study}.yaml"
    if not path.is_file():
        raise ReportError(f"--study-file {str(path)!r}: no such study file to take the claims from")
    return (yaml.safe_load(path.read_text()) or {}).get("reference") or {}


def write_report(folder: str | Path, baseline: str | dict | None = None,
                 study_file: str | Path | None = None) -> dict[str, Path]:
    """Write summary.csv, arms.csv (per arm and metric: n, mean, std, 95% t-interval, difference from
    the baseline arm with its Welch interval), summary.md (with the verdicts on the study's claims)
    and the plots into the study folder; return their paths.

    baseline: the row the `x base` columns divide by, as a label ('precision=fp32'), a run id or a
    {param: value} dict; default the study's reference.baseline, else the first completed run.
    """
    folder = Path(folder)
    # A folder whose run records are gone (an archived reference) is judged again from its summary.csv,
    # with the study file's current claims; its plots are the ones already there.
    archived = not has_records(folder) and (folder / "summary.csv").is_file()
    df = load_summary_csv(folder, study_reference(folder.name, study_file)) if archived else load_study(folder)
    if baseline is not None:
        find_baseline(df, baseline)  # a wrong --baseline fails before any file is written
    parse_claims(df.attrs.get("reference"))  # so does a malformed claim
    csv = folder / "summary.csv"
    if not archived:
        df.drop(columns=["run_dir"]).to_csv(csv, index=False)
    arms_csv = folder / "arms.csv"
    arm_stats(df, baseline).to_csv(arms_csv, index=False)
    plots = sorted(folder.glob("*.png")) if archived else make_plots(df, folder)
    md = folder / "summary.md"
    md.write_text(summary_markdown(df, baseline, [str(p) for p in plots]))
    return {"csv": csv, "arms": arms_csv, "md": md, **{p.stem: p for p in plots}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lorasweep-report",
                                 description="Turn a study folder (<results_dir>/<study>) into summary.csv, summary.md and plots.")
    ap.add_argument("folder", help="the study folder, e.g. results/rank_alpha")
    ap.add_argument("--study-file", default=None,
                    help="where the claims come from when the folder holds only an earlier summary.csv "
                         "(default: lorasweep's sweeps/<study>.yaml)")
    ap.add_argument("--baseline", default=None,
                    help="row the ratio columns divide by, e.g. 'precision=fp32' or 'r=16, alpha=32' (default: the study's)")
    a = ap.parse_args(argv)
    try:
        paths = write_report(a.folder, a.baseline, a.study_file)
    except ReportError as e:
        print(f"lorasweep-report: {e}", file=sys.stderr)
        sys.exit(2)
    print(Path(paths["md"]).read_text().split("\n## Plots")[0])
    from .search_report import applies, write_trials_report

    if applies(a.folder):  # a search, or a sweep with a pruner: trials, best, curves, compute
        trials = write_trials_report(a.folder)
        print(Path(trials["trials_md"]).read_text().split("\n## Parameter importance")[0].split("\n## Trials")[0])
        paths.update(trials)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
