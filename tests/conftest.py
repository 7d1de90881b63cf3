"""Shared fixtures: an isolated cache/W&B dir per session, and a helper to compose run configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# This process's view of the GPUs is fixed now (CUDA reads CUDA_VISIBLE_DEVICES once), before the
# fixture below hides them from the subprocesses of CPU tests.
GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_marked(request, monkeypatch):
    """Tests pin CPU values (losses to 1e-5, RSS, run ids), so on a GPU machine they must not run on
    the GPU: compose() pins train.device=cpu in this process; their `lorasweep` subprocesses see no GPU.
    Tests marked gpu see the machine as it is."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "wandb_home"
    d.mkdir(exist_ok=True)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(d / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(d / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(d / "data"))


def compose(*overrides: str):
    """The RunConfig the `lorasweep` command would build from these overrides."""
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lorasweep.cli import conf_dir, register_schema, to_run_config

    register_schema()
    GlobalHydra.instance().clear()
    if not any(o.lstrip("+~").startswith("train.device=") for o in overrides):
        overrides = (*overrides, "train.device=cpu")  # CPU values stay CPU values on a GPU machine
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = hcompose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)


@pytest.fixture
def tiny(tmp_path):
    """Compose a tiny_llama run writing under tmp_path, quiet, a few steps."""
    def make(*overrides: str):
        base = ["model=tiny_llama", "logger=none", f"results_dir={tmp_path / 'results'}", "study=t",
                "train.max_steps=4", "train.batch_size=4", "train.max_seq_len=80", "data.n_train=64",
                "data.n_val=16", "data.n_test=16"]
        return compose(*base, *overrides)
    return make


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["plain_cpu", "avx512bf16_cpu"])
def cpu_kind(request, monkeypatch):
    """The two kinds of CPU bitsandbytes tells apart. On ``avx512bf16_cpu`` every 4-bit layer built in
    the test believes the CPU has AVX512-BF16 (bitsandbytes' fused, weight-packing inference path),
    whatever this machine has: a test with this fixture holds on both kinds wherever it runs."""
    if request.param == "avx512bf16_cpu":
        import bitsandbytes.nn.modules as bnb_modules

        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    return request.param
