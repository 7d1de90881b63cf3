"""The report's statistics and verdicts on synthetic records with known means and spreads: the
t-interval and Welch interval against independent formulas, arms grouped over seeds, every verdict
state, claim syntax errors, and the files (arms.csv, verdicts in summary.md, plots with error bars).
No model runs: each record is written the way record.py writes it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats

from conftest import REPO, compose


def write_study(root: Path, runs: list[tuple[dict, dict]], reference: dict | None = None, name: str = "syn") -> Path:
    """runs: (config overrides, metrics) per run; config keys are nested groups as in a record."""
    folder = root / name
    for i, (cfg, metrics) in enumerate(runs):
        d = folder / f"run{i:03d}"
        d.mkdir(parents=True)
        config = {"model": {"name": "m"}, "lora": {"method": "lora", "r": 8, "alpha": 16, "targets": ["qv"]},
                  "precision": {"name": "fp32"}, "optimizer": {"name": "adamw", "schedule": "constant"},
                  "data": {"name": "d"}, "train": {"max_steps": 4}, "seed": 0, "study": name, "reference": reference}
        for k, v in cfg.items():
            if isinstance(v, dict):
                config[k] = {**config[k], **v}
            else:
                config[k] = v
        rec = {"run_id": f"run{i:03d}", "study": name, "status": metrics.pop("_status", "completed"),
               "config": config, "metrics": metrics, "started_at": f"2026-01-01T00:00:{i:02d}"}
        (d / "record.json").write_text(json.dumps(rec))
        steps = [{"step": s, "train/loss": 2.0 - 0.1 * s + 0.01 * cfg.get("seed", 0)} for s in range(1, 5)]
        (d / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    return folder


def two_arms(root, fp32, nf4, reference=None, metric="val/loss", name="syn"):
    """precision=fp32 and precision=nf4, one run per value (seed = position)."""
    runs = [({"precision": {"name": "fp32"}, "seed": s}, {metric: v, "time/train_s": 10.0 + s, "mem/peak_rss_gb": 1.4})
            for s, v in enumerate(fp32)]
    runs += [({"precision": {"name": "nf4"}, "seed": s}, {metric: v, "time/train_s": 15.0 + s, "mem/peak_rss_gb": 1.2})
             for s, v in enumerate(nf4)]
    return write_study(root, runs, reference, name)


# ----------------------------------------------------------------------------- intervals

def test_t_interval_known_values():
    from lorasweep.analysis.report_stats import t_interval

    e = t_interval([1, 2, 3, 4, 5])
    assert e.n == 5 and e.mean == 3 and e.std == pytest.approx(math.sqrt(2.5))
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) from tables
    assert (e.low, e.high) == pytest.approx((3 - half, 3 + half))
    one = t_interval([7.0, float("nan"), None])  # missing values are not runs
    assert one.n == 1 and one.mean == 7 and math.isnan(one.low) and math.isnan(one.std)
    flat = t_interval([4, 4, 4])
    assert (flat.low, flat.high) == (4, 4)


def test_welch_interval_matches_scipy():
    from lorasweep.analysis.report_stats import welch_interval

    a, b = [1.0, 2.0, 3.5], [4.0, 6.5, 8.0, 9.0]
    d = welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d.diff == pytest.approx(sum(a) / 3 - sum(b) / 4)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert welch_interval([5, 5, 5], [3, 3]).low == 2  # never varies: exact difference
    assert not welch_interval([1.0], [2.0, 3.0]).known  # one run: no interval


def test_std_interval_brackets_the_sd():
    from lorasweep.analysis.report_stats import std_interval

    lo, hi = std_interval([1, 2, 3, 4, 5])
    s = math.sqrt(2.5)
    assert lo == pytest.approx(s * math.sqrt(4 / stats.chi2.ppf(0.975, 4)))
    assert hi == pytest.approx(s * math.sqrt(4 / stats.chi2.ppf(0.025, 4)))


def test_arms_group_seeds_and_diff_against_baseline(tmp_path):
    from lorasweep.analysis.report import arm_stats, load_study

    folder = two_arms(tmp_path, [1.0, 2.0, 3.0], [4.0, 6.0, 8.0], {"baseline": "precision=fp32"})
    df = load_study(folder)
    assert df.attrs["swept"] == ["precision", "seed"]
    st = arm_stats(df)
    row = st[(st["arm"] == "precision=nf4") & (st["metric"] == "val/loss")].iloc[0]
    assert row["n"] == 3 and row["mean"] == 6 and row["std"] == 2
    assert row["ci_high"] - row["mean"] == pytest.approx(stats.t.ppf(0.975, 2) * 2 / math.sqrt(3))
    ref = stats.ttest_ind([4, 6, 8], [1, 2, 3], equal_var=False).confidence_interval(0.95)
    assert row["diff"] == 4 and (row["diff_low"], row["diff_high"]) == pytest.approx((ref.low, ref.high))
    base = st[(st["arm"] == "precision=fp32") & (st["metric"] == "time/train_s")].iloc[0]
    assert base["mean"] == 11 and math.isnan(base["diff"])  # the baseline arm has no difference to itself
    assert set(st["metric"]) == {"val/loss", "time/train_s", "mem/peak_rss_gb"}


# ----------------------------------------------------------------------------- verdicts

def verdict(tmp_path, fp32, nf4, claim, metric="val/loss"):
    from lorasweep.analysis.report import evaluate_claims, load_study

    folder = two_arms(tmp_path, fp32, nf4, {"claims": [claim]}, metric=metric, name=f"s{len(list(tmp_path.iterdir()))}")
    (v,) = evaluate_claims(load_study(folder))
    return v


LESS = {"metric": "val/loss", "compare": "precision=nf4 < precision=fp32", "article": "14.18 vs 21.33 GB"}


def test_verdict_reproduced(tmp_path):
    v = verdict(tmp_path, [2.0, 2.1, 2.2], [1.0, 1.1, 1.2], LESS)
    assert v.verdict == "reproduced"
    line = v.line()
    assert "precision=nf4 1.1 ± 0.25 (n=3)" in line and "(n=3) vs precision=fp32 2.1" in line and "diff -1 [" in line
    assert "0.52x" in line and line.endswith("article: 14.18 vs 21.33 GB")


def test_verdict_opposite(tmp_path):
    assert verdict(tmp_path, [1.0, 1.1, 1.2], [2.0, 2.1, 2.2], LESS).verdict == "opposite"


def test_verdict_underpowered_when_the_design_cannot_see_the_difference(tmp_path):
    """The interval crosses zero because 3 seeds could not have told: the minimum detectable effect
    (95% confidence, 80% power) is larger than the difference seen; the line says how many seeds would."""
    from lorasweep.analysis.report_stats import mde, seeds_needed, t_interval

    v = verdict(tmp_path, [1.0, 2.0, 3.0], [1.5, 2.5, 1.0], LESS)
    assert v.verdict == "underpowered" and "diff" in v.summary and "(paired t)" in v.summary
    sd = t_interval([0.5, 0.5, -2.0]).std  # the per-seed differences nf4 - fp32
    assert f"mde {mde(sd, 3, paired=True):.4g} (paired t)" in v.summary
    assert f"needs ~{seeds_needed(1 / 3, sd, paired=True)} seeds per arm" in v.summary


def test_verdict_inconclusive_only_when_the_design_could_have_told(tmp_path):
    """A tight design (mde well below the margin) whose interval still straddles the margin."""
    claim = {**LESS, "margin": 0.1}
    v = verdict(tmp_path, [2.0, 2.0, 2.0], [1.90, 1.89, 1.91], claim)
    assert v.verdict == "inconclusive" and "margin 0.1" in v.summary and "(paired t)" in v.summary


def test_arms_that_share_no_seeds_are_compared_by_welch(tmp_path):
    from lorasweep.analysis.report import evaluate_claims, load_study

    runs = [({"precision": {"name": "fp32"}, "seed": s}, {"val/loss": v}) for s, v in zip((0, 1, 2), (2.0, 2.1, 2.2))]
    runs += [({"precision": {"name": "nf4"}, "seed": s}, {"val/loss": v}) for s, v in zip((5, 6, 7), (1.0, 1.1, 1.2))]
    (v,) = evaluate_claims(load_study(write_study(tmp_path, runs, {"claims": [LESS]}, "w")))
    assert v.verdict == "reproduced" and "(Welch)" in v.summary and "mde " in v.summary


def test_verdict_inconclusive_with_one_run(tmp_path):
    v = verdict(tmp_path, [2.0], [1.0], LESS)
    assert v.verdict == "inconclusive" and "one run" in v.summary


def test_verdict_not_reproduced_when_effect_below_margin(tmp_path):
    # nf4 is lower by 0.01 +- ~0.005: a real difference, but under the 5% (0.1) margin that counts
    v = verdict(tmp_path, [2.0, 2.001, 2.002], [1.99, 1.991, 1.992], {**LESS, "margin": "5%"})
    assert v.verdict == "not reproduced" and "margin 0.1" in v.summary


def test_verdict_equivalence(tmp_path):
    same = {"metric": "val/loss", "compare": "precision=nf4 ~ precision=fp32", "margin": 0.1}
    assert verdict(tmp_path, [2.0, 2.01, 2.02], [2.0, 2.02, 2.01], same).verdict == "reproduced"
    assert verdict(tmp_path, [2.0, 2.01, 2.02], [3.0, 3.02, 3.01], same).verdict == "not reproduced"
    assert verdict(tmp_path, [2.0, 2.5, 1.5], [2.0, 2.02, 2.01], same).verdict == "underpowered"


def test_verdict_unmeasured_metric_or_unknown_arm(tmp_path):
    assert "not measured" in verdict(tmp_path, [1, 2], [1, 2], {**LESS, "metric": "eval/x/acc"}).summary
    v = verdict(tmp_path, [1, 2], [1, 2], {**LESS, "compare": "precision=fp4 < precision=fp32"})
    assert v.verdict == "inconclusive" and "no completed run has precision=fp4" in v.summary


def test_verdict_against_a_number_is_a_one_sample_interval(tmp_path):
    below = {"metric": "eval_delta/t/acc", "compare": "precision=nf4 < 0", "article": "forgets"}
    v = verdict(tmp_path, [0.0, 0.0, 0.0], [-0.10, -0.12, -0.08], below, metric="eval_delta/t/acc")
    ref = stats.ttest_1samp([-0.10, -0.12, -0.08], 0.0).confidence_interval(0.95)
    assert v.verdict == "reproduced" and "vs 0:" in v.summary
    assert f"[{ref.low:.4g}, {ref.high:.4g}]" in v.summary
    assert verdict(tmp_path, [0, 0, 0], [-0.1, 0.1, 0.05], below, metric="eval_delta/t/acc").verdict == "underpowered"
    assert verdict(tmp_path, [0, 0, 0], [0.1, 0.12, 0.08], below, metric="eval_delta/t/acc").verdict == "opposite"


def rank_alpha_study(root, loss):
    """r in (4, 16) x alpha/r in (0.5, 2), 3 seeds; loss(r, ratio, seed) gives val/loss."""
    runs = [({"lora": {"r": r, "alpha": r * k}, "seed": s}, {"val/loss": loss(r, k, s), "mem/peak_rss_gb": 1 + r / 100})
            for r in (4, 16) for k in (0.5, 2) for s in range(3)]
    ref = {"claims": [{"metric": "val/loss", "best": "alpha/r=2", "per": "r", "article": "alpha = 2r"},
                      {"metric": "memory", "compare": "r=16 > r=4", "per": "alpha/r"}]}
    return write_study(root, runs, ref, "rank_alpha")


def test_best_claim_per_group(tmp_path):
    from lorasweep.analysis.report import evaluate_claims, load_study

    good = rank_alpha_study(tmp_path / "a", lambda r, k, s: (1.0 if k == 2 else 1.5) + 0.01 * s)
    best, mem = evaluate_claims(load_study(good))
    assert best.verdict == "reproduced" and len(best.details) == 2 and "2 comparisons: 2 reproduced" in best.summary
    assert best.details[0].startswith("reproduced: r=4: r=4, alpha=8 1.01 ± ")
    assert mem.verdict == "reproduced" and "[mem/peak_rss_gb]" in mem.summary  # `memory` resolves to the CPU figure
    mixed = rank_alpha_study(tmp_path / "b", lambda r, k, s: (1.0 if (k == 2) == (r == 4) else 1.5) + 0.01 * s)
    assert evaluate_claims(load_study(mixed))[0].verdict == "opposite"  # at r=16 alpha=r/2 wins


def test_spread_claim(tmp_path):
    from lorasweep.analysis.report import evaluate_claims, load_study

    claim = {"claims": [{"metric": "val/loss", "max_std": "2%"}]}
    calm = write_study(tmp_path, [({"seed": s}, {"val/loss": 2.0 + 0.001 * s}) for s in range(5)], claim, "calm")
    wild = write_study(tmp_path, [({"seed": s}, {"val/loss": 2.0 + 0.5 * s}) for s in range(5)], claim, "wild")
    assert evaluate_claims(load_study(calm))[0].verdict == "reproduced"
    assert evaluate_claims(load_study(wild))[0].verdict == "not reproduced"


@pytest.mark.parametrize("claim, message", [
    ({"metric": "val/loss", "compare": "precision=nf4 << fp32"}, "compare='precision=nf4 << fp32': must read 'A < B'"),
    ({"metric": "val/loss", "compare": "nf4 < fp32"}, "each arm is param=value"),
    ({"metric": "val/loss", "compare": "precision=nf4 ~ precision=fp32"}, "needs a margin > 0"),
    ({"metric": "val/loss", "best": "r=4", "compare": "r=4 < r=8"}, "exactly one of"),
    ({"compare": "r=4 < r=8"}, "needs metric"),
    ({"metric": "val/loss", "best": "r=4", "margn": 1}, "unknown field"),
    ({"metric": "val/loss", "best": "r=4", "margin": "lots"}, "margin='lots'"),
])
def test_bad_claims_name_the_field(tmp_path, claim, message):
    from lorasweep.analysis.report import ReportError, write_report

    folder = two_arms(tmp_path, [1, 2], [1, 2], {"claims": [claim]})
    with pytest.raises(ReportError, match=r"reference\.claims\[0\]") as e:
        write_report(folder)
    assert message in str(e.value)
    assert not (folder / "summary.md").exists()


@pytest.mark.parametrize("study", ["rank_alpha", "qlora_vs_lora", "optimizers", "epochs", "targets", "alpha_scan",
                                   "finetune_methods", "seeds", "sst2_classification", "data_quality",
                                   "forgetting", "lr_rank"])
def test_study_claims_name_real_arms(study, tmp_path):
    """Every claim of every study file, on records made from the study's own grid (2 seeds each):
    each selector names an existing arm and each metric a column, so no verdict is a typo."""
    from lorasweep.config import to_dict
    from lorasweep.analysis.report import evaluate_claims, load_study
    from lorasweep.analysis.report_claims import parse_claims
    from test_studies import grid

    ref = yaml.safe_load((REPO / "sweeps" / f"{study}.yaml").read_text())["reference"]
    claims = parse_claims(ref)
    assert claims and all(c.article for c in claims), f"{study}: claims, each with the article's figure"
    metrics = {("mem/peak_rss_gb" if c.metric == "memory" else c.metric) for c in claims}
    metrics |= {ref["select"]["by"]} if ref.get("select") else set()  # what each arm's lr is picked on
    runs = []
    for i, combo in enumerate(grid(REPO / "sweeps" / f"{study}.yaml")):
        cfg = to_dict(compose(f"sweep={study}", *combo))
        seeds = [cfg["seed"]] if any(o.startswith("seed=") for o in combo) else [0, 1]
        for s in seeds:
            cfg = {**cfg, "seed": s, "train": {**cfg["train"], "seed": s}}
            runs.append((cfg, {m: 1.0 + i + 0.01 * len(runs) for m in metrics}))
    folder = tmp_path / study
    for j, (cfg, metrics_) in enumerate(runs):
        d = folder / f"run{j:03d}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps({"run_id": d.name, "study": study, "status": "completed",
                                                   "config": cfg, "metrics": metrics_}, default=str))
    verdicts = evaluate_claims(load_study(folder))
    assert len(verdicts) == len(claims)
    for v in verdicts:
        text = v.summary + " ".join(v.details)
        for broken in ("no completed run has", "no swept parameter", "arms (", "not measured", "no other arm"):
            assert broken not in text, f"{study}: {v.line()}"


# ----------------------------------------------------------------------------- the files

def test_report_files_show_intervals_and_verdicts(tmp_path):
    from lorasweep.analysis.report import write_report

    folder = two_arms(tmp_path, [2.0, 2.1, 2.2], [1.0, 1.1, 1.2],
                      {"question": "q?", "baseline": "precision=fp32", "claims": [LESS, {**LESS, "compare": "precision=nf4 > precision=fp32"}]})
    paths = write_report(folder)
    md = paths["md"].read_text()
    assert "## Verdicts" in md
    assert "- **reproduced** `val/loss`: precision=nf4 < precision=fp32 -- " in md
    assert "- **opposite** `val/loss`: precision=nf4 > precision=fp32 -- " in md and "Article: 14.18 vs 21.33 GB." in md
    assert "## Across seeds (mean ± half-width of the 95% t-interval; sd; n)" in md
    assert "| precision=fp32 | 3 | 11.0 s ± " in md  # train time 10, 11, 12 s
    assert "## Differences from the baseline arm" in md and "| precision=nf4 | 5.0 s [" in md
    arms = pd.read_csv(paths["arms"])
    nf4 = arms[(arms["arm"] == "precision=nf4") & (arms["metric"] == "val/loss")].iloc[0]
    assert nf4["mean"] == pytest.approx(1.1) and nf4["std"] == pytest.approx(0.1) and nf4["n"] == 3
    for name in ("memory_vs_time", "score_by_run", "seed_spread", "loss_curves"):
        assert paths[name].stat().st_size > 5000, name


def test_heatmap_cells_show_mean_and_interval(tmp_path, monkeypatch):
    from lorasweep.analysis import report_plots
    from lorasweep.analysis.report import load_study, write_report

    texts = []
    real = report_plots._save

    def keep_text(fig, path):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return real(fig, path)

    monkeypatch.setattr(report_plots, "_save", keep_text)
    folder = rank_alpha_study(tmp_path, lambda r, k, s: (1.0 if k == 2 else 1.5) + 0.01 * s)
    paths = write_report(folder)
    assert "heatmap_r_alpha" in paths
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert f"1.010\n± {half:.3f}" in texts  # the alpha = 2r cells: mean over 3 seeds and CI half-width
    assert load_study(folder).attrs["swept"] == ["r", "alpha", "seed"]


def test_bad_claim_stops_the_run_at_launch():
    from lorasweep.config import ConfigError, validate

    cfg = compose("sweep=qlora_vs_lora", "model=tiny_llama")
    validate(cfg)  # the study's own claims are fine
    cfg.reference = {**cfg.reference, "claims": [{"metric": "memory", "compare": "precision=nf4 << precision=fp32"}]}
    with pytest.raises(ConfigError, match=r"reference\.claims\[0\]\.compare='precision=nf4 << precision=fp32': must read"):
        validate(cfg)
