"""The report on real (tiny) studies: summary.csv/md, the chosen plots, the baseline, failed runs,
the reference block, the `lorasweep-report` command and the notebook."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, compose

TINY = ["model=tiny_llama", "logger=none", "eval=val", "train.max_steps=2", "train.batch_size=2",
        "train.max_seq_len=80", "data.n_train=16", "data.n_val=4", "data.n_test=4", "train.log_every=1",
        "train.save_adapter=false"]


def _run(root: Path, *overrides: str):
    from lorasweep import job

    return job.run(compose(*TINY, f"results_dir={root}", *overrides), show_progress=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Three tiny studies made by the real pipeline from the real study files."""
    root = tmp_path_factory.mktemp("results")
    for r in (2, 4):
        for arm in ("alpha_0p5r", "alpha_2r"):
            assert _run(root, "sweep=rank_alpha", f"lora.r={r}", f"+sweep/arms={arm}").status == "completed"
    bad = _run(root, "sweep=rank_alpha", "lora.r=8", "lora.targets=[nonexistent_proj]")
    assert bad.status == "failed"
    for p in ("fp32", "nf4"):
        assert _run(root, "sweep=qlora_vs_lora", f"precision={p}").status == "completed"
    for s in (0, 1):
        assert _run(root, "sweep=seeds", f"seed={s}").status == "completed"
    (root / "rank_alpha" / ".sweeps" / "x").mkdir(parents=True)  # hydra bookkeeping: ignored
    return root


def test_load_study_columns(studies):
    from lorasweep.analysis.report import load_study

    df = load_study(studies / "rank_alpha")
    assert len(df) == 5
    assert df.attrs["swept"][:2] == ["r", "alpha"]
    assert {"run_id", "label", "status", "r", "alpha", "val/loss", "train/loss", "mem/peak_rss_gb",
            "params/trainable"} <= set(df.columns)
    assert sorted(df["status"]) == ["completed"] * 4 + ["failed"]
    assert "r=4, alpha=8" in set(df["label"])
    assert df.attrs["reference"]["question"].startswith("Which rank")


def test_write_report_rank_alpha(studies):
    from lorasweep.analysis.report import write_report

    paths = write_report(studies / "rank_alpha", baseline="r=2, alpha=1")
    csv = pd.read_csv(paths["csv"])
    assert len(csv) == 5 and "val/loss" in csv.columns
    md = paths["md"].read_text()
    assert "| r | alpha | status |" in md and "2 (baseline) | 1 |" in md
    assert "1.00x" in md and "nonexistent_proj" in md  # ratio column; the failed run and its error
    assert "alpha = 2r" in md  # the article's finding from the study's reference block
    for name in ("heatmap_r_alpha", "loss_curves"):
        assert paths[name].stat().st_size > 5000
    assert "![heatmap_r_alpha](heatmap_r_alpha.png)" in md


def test_qlora_table_prints_article_figures(studies):
    from lorasweep.analysis.report import write_report

    paths = write_report(studies / "qlora_vs_lora")
    md = paths["md"].read_text()
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert "article peak RSS GB (GPU alloc)" in lines[0] and "article train time" in lines[0]
    fp32 = next(l for l in lines if l.startswith("| fp32 (baseline)"))
    nf4 = next(l for l in lines if l.startswith("| nf4 "))
    assert "21.33 (bf16_true)" in fp32 and "1.85 h" in fp32
    assert "14.18" in nf4 and "0.66x" in nf4  # the article's nf4 memory and its ratio to bf16
    assert "memory_vs_time" in paths and "score_by_run" in paths


def test_seeds_mean_std(studies):
    from lorasweep.analysis.report import write_report

    paths = write_report(studies / "seeds")
    md = paths["md"].read_text()
    assert "## Across seeds (mean ± half-width of the 95% t-interval; sd; n)" in md and "| all seeds | 2 |" in md
    assert "## Verdicts" in md and "std over seeds <= 2%" in md  # the study file's claim, judged
    assert "arms" in paths and paths["arms"].read_text().startswith("arm,metric,n,mean,std,ci_low,ci_high")
    assert paths["seed_spread"].stat().st_size > 5000


def test_bad_baseline_and_folder(studies, tmp_path):
    from lorasweep.analysis.report import ReportError, write_report

    with pytest.raises(ReportError, match="baseline='precision=bf16'.*precision=fp32"):
        write_report(studies / "qlora_vs_lora", baseline="precision=bf16")
    with pytest.raises(ReportError, match="no run records"):
        write_report(tmp_path)


def test_command(studies):
    out = subprocess.run([sys.executable, "-c", "from lorasweep.analysis.report import main; main()", str(studies / "seeds"),
                          "--baseline", "seed=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "seed_spread.png" in out.stdout and "| 1 (baseline) |" in out.stdout
    bad = subprocess.run([sys.executable, "-c", "from lorasweep.analysis.report import main; main()", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such folder" in bad.stderr


def test_notebook_runs_on_a_study(studies):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "explore_study.ipynb", as_version=4)
    os.environ["LORASWEEP_STUDY"] = str(studies / "rank_alpha")
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        os.environ.pop("LORASWEEP_STUDY", None)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # heatmap, loss curves, best run
