"""Every config option composes; bad fields are refused together, each named, before weights load."""
from pathlib import Path

import pytest

from conftest import REPO, compose
from lorasweep.config import ConfigError, config_hash, run_id, validate


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "lora", "precision", "optimizer", "data", "eval", "logger", "launcher"])
def test_every_option_composes(group):
    opts = group_options(group)
    assert opts, f"conf/{group} is empty"
    for opt in opts:
        extra = [f"data.path={REPO / 'pyproject.toml'}"] if group == "data" and opt in ("jsonl", "text_classification") else []
        cfg = compose(f"{group}={opt}", *extra)
        validate(cfg)
        if group in ("model", "precision", "eval", "logger"):
            assert getattr(cfg, group).name == opt


def test_precision_options_map_to_quantization():
    assert compose("precision=nf4").precision.quant == "nf4"
    dq = compose("precision=nf4_dq").precision
    assert dq.quant == "nf4" and dq.double_quant
    assert compose("precision=fp4").precision.quant == "fp4"
    assert compose("precision=bf16_true").precision.weights_dtype == "bfloat16"
    assert compose("precision=bf16_mixed").precision.autocast == "bfloat16"


def test_optimizer_and_quantization_are_independent():
    cfg = compose("precision=nf4", "optimizer=sgd_cosine")
    validate(cfg)
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.schedule == "cosine" and cfg.precision.quant == "nf4"


def test_seed_override_reaches_train_and_changes_run_id():
    a, b = compose("seed=0"), compose("seed=1")
    assert a.train.seed == 0 and b.train.seed == 1
    assert run_id(a) != run_id(b)


def test_run_id_ignores_logger_and_paths():
    a = compose("logger=none", "results_dir=/tmp/a")
    b = compose("logger=wandb_offline", "results_dir=/tmp/b", "study=x")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(compose("lora.r=4"))


def test_all_problems_reported_together_each_naming_its_field():
    cfg = compose("lora.r=0", "lora.alpha=-1", "lora.dropout=1.5", "optimizer.lr=0", "train.max_steps=-3")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for field in ("lora.r=0", "lora.alpha=-1", "lora.dropout=1.5", "optimizer.lr=0", "train.max_steps=-3"):
        assert field in msg
    assert len(e.value.problems) == 5


def test_missing_data_file_and_model_folder_are_named():
    cfg = compose("data=jsonl", "data.path=/nope/x.jsonl", "model.name_or_path=./no/such/model")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "data.path='/nope/x.jsonl'" in str(e.value)
    assert "model.name_or_path='./no/such/model'" in str(e.value)


def test_hub_id_is_accepted_without_a_hub():
    validate(compose("model=llama2_7b"))


def test_type_errors_name_the_field():
    with pytest.raises(Exception) as e:
        compose("lora.r=abc")
    assert "lora.r" in str(e.value)
