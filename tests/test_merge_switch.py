"""After training: merge a LoRA adapter into its base (parity), and switch adapters on one base."""
import json
from pathlib import Path

import pytest

from conftest import compose
from lorasweep import merge, switch
from lorasweep import job
from lorasweep.run.record import read_record
from lorasweep.run.reload import RunFolderError
from tiny_encoder import tiny_bert_dir, write_glue_folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two LoRA runs (different r and seed) and one full run of a tiny BERT on toy sentiment data."""
    root = tmp_path_factory.mktemp("ms")
    bert, folder = tiny_bert_dir(root), write_glue_folder(root / "sst2", n_train=48, n_dev=16, n_test=8)
    base = ["model=minilm_l6", f"model.name_or_path={bert}", "model.name=tiny_bert", "logger=none",
            f"results_dir={root / 'results'}", "study=ms", "data=sst2", f"data.path={folder}",
            "train.batch_size=8", "train.max_seq_len=32", "train.max_steps=8", "optimizer.lr=1e-2"]
    out = {}
    for key, extra in (("a", ["lora=r2_a4_qv"]), ("b", ["lora=r8_a16_attention", "seed=1"]), ("full", ["lora=full"])):
        o = job.run(compose(*base, *extra), show_progress=False)
        assert o.status == "completed", o.error
        out[key] = Path(o.run_dir)
    return out


def test_merge_parity_and_unchanged_score(runs, capsys):
    r = merge.merge_run(runs["a"])
    assert r["passed"] and r["dtype"] == "float32" and r["tolerance"] == 1e-4
    assert r["max_abs_logit_diff"] <= 1e-4
    assert r["score_before"]["val/loss"] == pytest.approx(r["score_after"]["val/loss"], abs=1e-5)
    assert r["score_before"]["val/accuracy"] == r["score_after"]["val/accuracy"]
    # the merged eval reproduces the run's own recorded score
    rec = read_record(runs["a"])["metrics"]
    assert r["score_after"]["val/loss"] == pytest.approx(rec["val/loss"], abs=1e-5)
    merged = runs["a"] / "merged"
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    assert r["reload_ok"] and json.loads((runs["a"] / "merge.json").read_text())["passed"]
    with pytest.raises(SystemExit) as e:
        merge.main([str(runs["a"]), "--no-save"])
    assert e.value.code == 0 and "merge parity OK" in capsys.readouterr().out


def test_merge_refuses_a_run_without_adapter(runs, capsys):
    with pytest.raises(SystemExit) as e:
        merge.main([str(runs["full"])])
    assert e.value.code == 2 and "only LoRA runs have an adapter" in capsys.readouterr().err


def test_switch_adapters_on_one_base_reproduces_each_run(runs, capsys):
    res = switch.switch_eval([runs["a"], runs["b"]], include_base=True)
    rows = {r["run"]: r for r in res["rows"]}
    assert res["n_adapters"] == 2 and len(rows) == 3
    for key in ("a", "b"):
        rec = read_record(runs[key])["metrics"]
        assert rows[runs[key].name]["val/loss"] == pytest.approx(rec["val/loss"], abs=1e-5)
        assert rows[runs[key].name]["val/accuracy"] == pytest.approx(rec["val/accuracy"])
    assert rows[runs["a"].name]["val/loss"] != rows[runs["b"].name]["val/loss"]
    switch.main([str(runs["a"]), str(runs["b"]), "data.val_split=test", "eval.batch_size=4"])
    out = capsys.readouterr().out
    assert runs["b"].name in out and "loaded once" in out


def test_switch_rejects_training_overrides(runs, capsys):
    with pytest.raises(SystemExit) as e:
        switch.main([str(runs["a"]), "lora.r=4"])
    assert e.value.code == 2 and "lora.r" in capsys.readouterr().err
    with pytest.raises(RunFolderError):
        switch.switch_eval([runs["a"].parent])
