"""What a study's design does to its verdicts: each arm at its own lr (picked on validation, judged
on a held-out split), time claims only on runs that trained alone, claims that hold by
construction kept apart from findings, and the design's own artefacts said on the verdict line.
Synthetic records with known values; no model runs."""
from __future__ import annotations

import pytest

from test_report_stats import write_study


def _judge(folder):
    from lorasweep.analysis.report import evaluate_claims, load_study

    return evaluate_claims(load_study(folder))


def lr_grid_study(root, val, test, name="lrg"):
    """Two optimizers (sgd, adamw), each over lr_factor 0.3, 1, 3, seeds 0-2; val/test[opt][factor] is
    the score at that point (+0.01 x seed)."""
    runs = []
    for opt, base in (("sgd", 1e-2), ("adamw", 1e-3)):
        for f in (0.3, 1.0, 3.0):
            for s in range(3):
                runs.append(({"optimizer": {"name": opt, "lr": base, "lr_factor": f}, "seed": s},
                             {"val/loss": val[opt][f] + 0.01 * s, "test/loss": test[opt][f] + 0.013 * s,
                              "optimizer/lr": base * f}))
    ref = {"select": {"param": "optimizer.lr_factor", "by": "val/loss"},
           "claims": [{"metric": "test/loss", "compare": "optimizer=adamw < optimizer=sgd", "article": "x"}]}
    return write_study(root, runs, ref, name)


def test_each_arm_is_judged_at_its_own_best_lr_on_the_held_out_split(tmp_path):
    # At the shared factor 1 SGD loses by 0.5; at each arm's best factor (picked on val) AdamW still
    # wins on test, by 0.1: the claim must be judged at sgd x3, adamw x0.3, on test/loss.
    val = {"sgd": {0.3: 2.0, 1.0: 1.8, 3.0: 1.2}, "adamw": {0.3: 1.1, 1.0: 1.3, 3.0: 1.6}}
    test = {"sgd": {0.3: 2.1, 1.0: 1.9, 3.0: 1.3}, "adamw": {0.3: 1.2, 1.0: 1.4, 3.0: 1.7}}
    folder = lr_grid_study(tmp_path, val, test)
    (v,) = _judge(folder)
    assert v.verdict == "reproduced", v.line()
    assert "diff -0.1" in v.summary, v.summary  # 1.2 - 1.3 at the chosen factors, not 1.4 - 1.9
    from lorasweep.analysis.report import write_report

    md = write_report(folder)["md"].read_text()
    assert "optimizer.lr_factor=3 (lr 0.03)" in md and "optimizer.lr_factor=0.3 (lr 0.0003)" in md
    assert "at the grid's edge" in md  # both picks sit at an end of the grid: the best may lie beyond


def test_the_pick_is_made_on_validation_not_on_the_judged_split(tmp_path):
    # val prefers factor 1 for both; test alone would prefer factor 3 for sgd (where it would win).
    val = {"sgd": {0.3: 2.0, 1.0: 1.5, 3.0: 1.9}, "adamw": {0.3: 1.6, 1.0: 1.2, 3.0: 1.7}}
    test = {"sgd": {0.3: 2.0, 1.0: 1.6, 3.0: 0.5}, "adamw": {0.3: 1.6, 1.0: 1.3, 3.0: 1.7}}
    (v,) = _judge(lr_grid_study(tmp_path, val, test))
    assert v.verdict == "reproduced" and "diff -0.3" in v.summary, v.summary


def test_a_claim_judged_on_the_selection_metric_is_refused():
    from lorasweep.claims import claim_problems

    ref = {"select": {"param": "optimizer.lr_factor", "by": "val/loss"},
           "claims": [{"metric": "val/loss", "compare": "optimizer=adamw < optimizer=sgd"}]}
    (msg,) = claim_problems(ref)
    assert "reference.select.by" in msg and "test/loss" in msg


def test_best_lr_ratio_claim(tmp_path):
    runs = []
    # lora's best lr 1e-3, full's 1e-4: ratio 10
    for method, lrs, best in (("lora", (3e-4, 1e-3, 3e-3, 1e-2), 1e-3), ("full", (3e-5, 1e-4, 3e-4, 1e-3), 1e-4)):
        for lr in lrs:
            for s in range(2):
                loss = 1.0 + abs(__import__("math").log10(lr / best)) + 0.01 * s
                runs.append(({"lora": {"method": method, "r": 8 if method == "lora" else 0},
                              "optimizer": {"lr": lrs[1], "lr_factor": lr / lrs[1]}, "seed": s},
                             {"val/loss": loss, "optimizer/lr": lr}))
    ref = {"select": {"param": "optimizer.lr_factor", "by": "val/loss"},
           "claims": [{"metric": "val/loss", "best_lr": "method=lora r8/a16 qv / method=full", "ratio": 10,
                       "article": "10x"},
                      {"metric": "val/loss", "best_lr": "method=lora r8/a16 qv / method=full", "ratio": 1,
                       "article": "same"}]}
    ten, one = _judge(write_study(tmp_path, runs, ref, "lrr"))
    assert ten.verdict == "reproduced" and "ratio 10" in ten.summary, ten.line()
    assert one.verdict == "not reproduced", one.line()


def _timed(root, shares, name):
    """precision fp32 (10 s) vs nf4 (15 s), 3 seeds each, with the others' CPU share per run."""
    runs = []
    for i, (prec, t) in enumerate((("fp32", 10.0), ("nf4", 15.0))):
        for s in range(3):
            share = shares[i * 3 + s]
            m = {"time/train_s": t + 0.1 * s, "val/loss": 1.0}
            if share is not None:
                m["contention/others_share"] = share
            runs.append(({"precision": {"name": prec}, "seed": s}, m))
    ref = {"claims": [{"metric": "time/train_s", "compare": "precision=nf4 > precision=fp32", "article": "1.5x"}]}
    return write_study(root, runs, ref, name)


def test_a_time_claim_is_judged_only_on_runs_that_trained_alone(tmp_path):
    (quiet,) = _judge(_timed(tmp_path, [0.01] * 6, "quiet"))
    assert quiet.verdict == "reproduced", quiet.line()
    (loud,) = _judge(_timed(tmp_path, [0.01, 0.45, 0.5, 0.02, 0.6, 0.01], "loud"))
    assert loud.verdict == "shared cores", loud.line()
    assert "others took up to 60%" in loud.summary and "rerun alone" in loud.summary
    (old,) = _judge(_timed(tmp_path, [None] * 6, "old"))
    assert old.verdict == "shared cores" and "recorded no contention" in old.summary, old.line()


def test_claims_by_construction_are_kept_apart_from_findings(tmp_path):
    from lorasweep.analysis.report import write_report

    runs = [({"precision": {"name": p}, "seed": s}, {"params/trainable": n, "val/loss": 1.0 + 0.1 * s + d})
            for p, n, d in (("fp32", 100, 0.0), ("nf4", 100, 0.3)) for s in range(3)]
    ref = {"claims": [{"metric": "val/loss", "compare": "precision=nf4 > precision=fp32", "article": "a"},
                      {"metric": "params/trainable", "compare": "precision=nf4 ~ precision=fp32", "margin": 1,
                       "by_construction": True, "article": "b"}]}
    folder = write_study(tmp_path, runs, ref, "bc")
    finding, built = _judge(folder)
    assert built.claim.by_construction and built.powered is None and "(by construction)" in built.line()
    assert finding.powered is True
    md = write_report(folder)["md"].read_text()
    verdicts = md.split("## Verdicts")[1]
    assert verdicts.index("Hold by construction") < verdicts.index("`params/trainable`")
    assert verdicts.index("`val/loss`") < verdicts.index("Hold by construction")


def test_a_floor_score_and_a_long_warm_up_are_said_on_the_line(tmp_path):
    runs = [({"optimizer": {"name": o, "warmup_steps": 10}, "train": {"max_steps": 32}, "seed": s},
             {"eval/x/acc": 0.0, "train/steps": 32}) for o in ("adamw", "sgd") for s in range(3)]
    ref = {"claims": [{"metric": "eval/x/acc", "compare": "optimizer=adamw > optimizer=sgd", "article": "a",
                       "note": "the cosine arm decays from step 10"}]}
    (v,) = _judge(write_study(tmp_path, runs, ref, "floor"))
    assert "every run scores 0" in v.summary and "warm-up takes up to 31% of the steps" in v.summary
    assert "the cosine arm decays from step 10" in v.summary


@pytest.mark.parametrize("sel, message", [({"param": "optimizer.lr_factor"}, "reference.select"),
                                          ({"param": "x", "on": "val/loss"}, "reference.select")])
def test_a_bad_selection_names_the_field(sel, message):
    from lorasweep.claims import claim_problems

    (msg,) = claim_problems({"select": sel, "claims": []})
    assert msg.startswith(message) and "by:" in msg


# ----------------------------------------------------------------------------- through real runs

def test_the_record_says_how_busy_the_machine_was_while_it_trained(tiny):
    """A process burning a core beside the run shows in contention/others_cpu_s; the run's own
    threads do not count as others."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lorasweep import job

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = job.run(tiny("train.max_steps=12"), show_progress=False)
    finally:
        hog.kill()
        hog.wait()
    m = json.loads((Path(out.run_dir) / "record.json").read_text())["metrics"]
    assert out.status == "completed", out.error
    assert m["contention/others_cpu_s"] > 0.5 * m["time/train_s"], m  # the hog had a core throughout
    assert 0 < m["contention/others_share"] <= 1 and m["contention/cpus"] >= 1 and "contention/load_1m" in m


def test_the_held_out_test_split_is_scored_apart_and_the_lr_factor_scales_the_rate(tiny):
    import json
    from pathlib import Path

    from lorasweep import job

    base = job.run(tiny("train.max_steps=4", "optimizer.lr=1e-3"), show_progress=False)
    scaled = job.run(tiny("train.max_steps=4", "optimizer.lr=1e-3", "optimizer.lr_factor=3",
                          "eval.test_loss=true", "data.n_test=24"), show_progress=False)
    mb = json.loads((Path(base.run_dir) / "record.json").read_text())["metrics"]
    ms = json.loads((Path(scaled.run_dir) / "record.json").read_text())["metrics"]
    assert base.run_id != scaled.run_id
    assert mb["optimizer/lr"] == pytest.approx(1e-3) and ms["optimizer/lr"] == pytest.approx(3e-3)
    lrs = [json.loads(l).get("train/lr") for l in (Path(scaled.run_dir) / "steps.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(3e-3)
    assert "test/loss" not in mb and ms["test/loss"] > 0 and ms["test/tokens"] > 0
    assert ms["test/loss"] != ms["val/loss"]  # another split, not the validation one again


def test_a_test_loss_without_a_test_split_is_refused_before_loading(tiny):
    from lorasweep.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"eval\.test_loss.*data\.n_test"):
        validate(tiny("eval.test_loss=true", "data.n_test=0"))
    with pytest.raises(ConfigError, match=r"optimizer\.lr_factor"):
        validate(tiny("optimizer.lr_factor=0"))


def test_power_before_launch_from_the_pilot_and_from_finished_runs(tmp_path):
    import json

    from lorasweep.analysis.power import power_lines

    ref = {"claims": [{"metric": "val/loss", "compare": "precision=nf4 ~ precision=fp32", "margin": "5%"},
                      {"metric": "val/loss", "compare": "precision=nf4 ~ precision=fp32", "margin": "50%"}]}
    pilot = tmp_path / "pilot.json"
    pilot.write_text(json.dumps({"by_steps": [{"cell": "200 questions, step 32", "n_seeds": 4, "mean": 1.0, "sd": 0.1},
                                              {"cell": "200 questions, step 128", "n_seeds": 4, "mean": 0.7, "sd": 0.01}]}))
    lines = power_lines(tmp_path / "none", ref, 3, 40, pilot)
    assert "sd over seeds 0.1000" in lines[1]  # the pilot's step nearest the design's 40 steps
    assert "underpowered, needs ~" in lines[2] and lines[3].endswith("powered")
    folder = write_study(tmp_path, [({"precision": {"name": p}, "seed": s}, {"val/loss": 1.0 + 0.2 * s + d})
                                    for p, d in (("fp32", 0.0), ("nf4", 0.01)) for s in range(3)], ref, "fin")
    lines = power_lines(folder, ref, 3, 40, pilot)
    assert "from the finished runs" in lines[0] and all("mde " in l for l in lines[1:]), lines


def test_an_arm_at_a_floor_of_zero_is_named_on_its_comparison(tmp_path):
    runs = [({"optimizer": {"name": o}, "seed": s}, {"eval/x/acc": 0.0 if o == "sgd" else 0.2 + 0.01 * s})
            for o in ("adamw", "sgd") for s in range(3)]
    ref = {"claims": [{"metric": "eval/x/acc", "compare": "optimizer=adamw > optimizer=sgd", "article": "a"}]}
    (v,) = _judge(write_study(tmp_path, runs, ref, "floor0"))
    assert "floor: optimizer=sgd score 0 in every run" in v.summary, v.summary


def test_a_file_test_split_is_disjoint_and_leaves_val_as_it_was():
    from lorasweep.run.data import split_train_val

    rows = [{"instruction": str(i), "input": "", "output": "x"} for i in range(100)]
    plain = split_train_val(rows, 0.1, seed=3)
    held = split_train_val(rows, 0.1, seed=3, test_frac=0.2)
    assert plain["test"] == [] and held["val"] == plain["val"]  # the validation rows do not move
    ids = [{r["instruction"] for r in held[k]} for k in ("train", "val", "test")]
    assert len(held["test"]) == 20 and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(held["train"]) == 70


def test_lorasweep_plan_ends_with_each_claims_power(tmp_path, capsys):
    import json

    from lorasweep import plan_cli

    pilot = tmp_path / "pilot.json"
    pilot.write_text(json.dumps({"by_steps": [{"cell": "200 questions, step 16", "n_seeds": 4, "mean": 1.0, "sd": 0.1}]}))
    plan_cli.main(["--no-time", "--pilot", str(pilot), "sweep=qlora_vs_lora", "model=tiny_llama",
                   f"results_dir={tmp_path}"])
    out = capsys.readouterr().out
    tail = out.split("power of the claims, before any run of this study:")[1]
    assert "val/loss: precision=nf4 ~ precision=fp32|bf16_true: mde " in tail and "needs ~" in tail
