"""data.mix (more training sources) and eval.val_sets (further validation sets)."""
import json

import pytest

from lorasweep.run import data
from lorasweep import job
from lorasweep.config import ConfigError, validate


def _instructions(path, n=40):
    rows = [{"instruction": f"Name a colour number {i}.", "input": "", "output": ["red", "blue", "green"][i % 3]}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def test_mix_adds_the_first_n_train_rows_of_each_source_and_never_its_held_out_rows(tiny, tmp_path):
    own = _instructions(tmp_path / "colours.json")
    cfg = tiny("data=jsonl", f"data.path={own}", "data.mix=[{name:arithmetic,n:20}]")
    rows = data.training_rows(cfg.data)
    own_train = data.load_raw(cfg.data)["train"]
    arith = data.arithmetic_splits(data.DataConfig(name="arithmetic"))
    assert rows[: len(own_train)] == own_train
    assert rows[len(own_train):] == arith["train"][:20]
    held_out = {r["instruction"] for r in arith["val"] + arith["test"]}
    assert not held_out & {r["instruction"] for r in rows}  # lm-eval's arithmetic test split stays unseen


def test_val_set_equal_to_the_runs_own_split_scores_the_same_loss(tiny, tmp_path):
    other = _instructions(tmp_path / "colours.json")
    cfg = tiny("train.max_steps=3", "++eval.val_sets={own:{name:arithmetic,n_train:64,n_val:16,n_test:16},colours:{name:jsonl,path:" + other + "}}")
    out = job.run(cfg, show_progress=False)
    assert out.status == "completed", out.error
    m = out.metrics
    assert m["val/own/loss"] == pytest.approx(m["val/loss"], abs=1e-6)  # same rows, template and objective
    assert m["val/own/tokens"] == m["val/tokens"]
    assert m["val/colours/loss"] != pytest.approx(m["val/loss"], abs=1e-3)
    assert m["val/colours/perplexity"] > 1


@pytest.mark.parametrize("override, field", [
    ("data.mix=[{name:arithmetic}]", "data.mix[0].n"),
    ("data.mix=[{name:arithmetic,n:0}]", "data.mix[0].n"),
    ("data.mix=[{name:csv,n:3}]", "data.mix[0].name"),
    ("data.mix=[{name:jsonl,n:3}]", "data.mix[0].path"),
    ("data.mix=[{name:jsonl,path:/no/such.json,n:3}]", "data.mix[0].path"),
    ("data.mix=[{name:arithmetic,n:3,colour:red}]", "data.mix[0]: unknown key"),
    ("++eval.val_sets={lima:{name:alpaca}}", "eval.val_sets.lima.path"),
    ("++eval.val_sets={x:{name:arithmetic,n:-1}}", "eval.val_sets.x.n"),
])
def test_bad_sources_are_refused_naming_the_field(tiny, override, field):
    with pytest.raises(ConfigError) as e:
        validate(tiny(override))
    assert field in str(e.value)


def test_run_ids_of_existing_settings_do_not_move():
    """Fields added later (data.mix, eval.val_sets, ...) at their defaults leave every run id as it was:
    a moved id makes a sweep retrain runs it already has. Pinned ids of this release's configs."""
    from conftest import compose
    from lorasweep.config import run_id

    assert run_id(compose("model=tiny_llama", "train.device=cpu")) == PINNED_TINY
    assert run_id(compose("sweep=qlora_vs_lora", "precision=fp32", "seed=0", "train.device=cpu")) == "smollm2_135m_r8a16-qv_fp32_adamw_s0-d57aa490"
    assert run_id(compose("model=tiny_llama", "data.mix=[{name:arithmetic,n:20}]")) != PINNED_TINY


PINNED_TINY = "tiny_llama_r8a16-qv_fp32_adamw_s0-05480ef4"


def test_a_malformed_source_file_is_refused_before_weights_load(tiny, tmp_path, monkeypatch):
    from lorasweep.run import model as model_stage

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    monkeypatch.setattr(model_stage, "build_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = job.run(tiny("data.mix=[{name:jsonl,path:" + str(bad) + ",n:1}]"), show_progress=False)
    assert out.status == "failed" and "data.mix[0]:" in out.error and "line 2 is not valid JSON" in out.error
