"""Installed like any other tool: configs ship in the package, users add their own, the log is quiet."""
import json
import logging
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from conftest import REPO, compose

TINY = ["logger=none", "eval=none", "train.max_steps=2", "train.batch_size=4", "train.max_seq_len=128",
        "data.n_train=16", "data.n_val=8", "data.n_test=8"]

MY_STUDY = """\
# @package _global_
# A user's study: their own model file plus lorasweep's alpha arms (sweep/arms/ of the package).
defaults:
  - override /model: my_tiny
study: my_study
train:
  max_steps: 2
hydra:
  mode: MULTIRUN
  sweeper:
    params:
      lora.r: 2,4
      +sweep/arms: alpha_1r,alpha_2r
"""


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LORASWEEP_CONF", "LORASWEEP_CONFIG_DIR")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd: list, cwd, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def user_conf(tmp_path) -> Path:
    """A user's config folder: model/my_tiny.yaml (tiny_llama renamed) and sweep/my_study.yaml."""
    d = tmp_path / "my_configs"
    (d / "model").mkdir(parents=True)
    (d / "sweep").mkdir()
    text = (REPO / "conf" / "model" / "tiny_llama.yaml").read_text()
    (d / "model" / "my_tiny.yaml").write_text(text.replace("name: tiny_llama", "name: my_tiny"))
    (d / "sweep" / "my_study.yaml").write_text(MY_STUDY)
    return d


# ----------------------------------------------------------------------------- the package's configs
def test_conf_dir_is_the_package_lorasweep_conf():
    import lorasweep
    from lorasweep.cli import conf_dir

    conf = Path(conf_dir())
    assert conf == Path(str(resources.files("lorasweep.conf")))
    for f in ("config.yaml", "model/tiny_llama.yaml", "sweep/rank_alpha.yaml", "sweep/arms/alpha_1r.yaml"):
        assert (conf / f).is_file(), f
    if Path(lorasweep.__file__).resolve().is_relative_to(REPO / "src"):  # editable: the repository's own files
        assert conf.resolve() == (REPO / "conf").resolve()


def test_lorasweep_conf_env_still_replaces_the_folder(tmp_path, monkeypatch):
    from lorasweep.cli import conf_dir

    monkeypatch.setenv("LORASWEEP_CONF", str(tmp_path))
    assert conf_dir() == str(tmp_path.resolve())


# ----------------------------------------------------------------------------- user config folders
def test_user_dir_adds_a_model_to_compose(user_conf, monkeypatch):
    monkeypatch.setenv("LORASWEEP_CONFIG_DIR", str(user_conf))
    rc = compose("model=my_tiny")
    assert rc.model.name == "my_tiny" and rc.model.name_or_path == "builtin:tiny_llama"
    monkeypatch.delenv("LORASWEEP_CONFIG_DIR")
    with pytest.raises(Exception, match="my_tiny"):
        compose("model=my_tiny")


def test_user_study_from_env_and_config_dir(user_conf, tmp_path):
    cli = [sys.executable, "-m", "lorasweep.cli"]
    for how, args, env in [("env", [], _clean_env(LORASWEEP_CONFIG_DIR=str(user_conf))),
                           ("--config-dir", ["--config-dir", user_conf], None)]:
        p = _run([*cli, *args, "sweep=my_study", "--cfg", "job"], cwd=tmp_path, env=env)
        assert p.returncode == 0, (how, p.stderr)
        assert "name: my_tiny" in p.stdout and "study: my_study" in p.stdout, how
        p = _run([*cli, *args, "sweep=my_study", "--cfg", "hydra"], cwd=tmp_path, env=env)
        assert "+sweep/arms: alpha_1r,alpha_2r" in p.stdout, (how, p.stderr)
    p = _run([*cli, "model=my_tiny"], cwd=tmp_path, env=_clean_env(LORASWEEP_CONFIG_DIR=str(tmp_path / "nope")))
    assert p.returncode == 2 and "no such config folder" in p.stderr and "Traceback" not in p.stderr
    p = _run([sys.executable, "-m", "lorasweep.plan_cli", "--config-dir", user_conf, "model=my_tiny"], cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("my_tiny_"), p.stderr


def test_user_model_runs(user_conf, tmp_path):
    env = _clean_env(LORASWEEP_CONFIG_DIR=str(user_conf))
    p = _run([sys.executable, "-m", "lorasweep.cli", "model=my_tiny", *TINY, f"results_dir={tmp_path / 'r'}",
              "study=mine"], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = (tmp_path / "r" / "mine").glob("my_tiny_*/record.json")
    assert json.loads(rec.read_text())["status"] == "completed"


# ----------------------------------------------------------------------------- quiet log
def test_known_third_party_chatter_is_debug_only(caplog):
    from lorasweep import quiet

    quiet.install()
    hf = logging.getLogger("lm_eval.models.huggingface")
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.INFO):
        hf.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
        hf.warning("Passed an already-initialized model through `pretrained`, assuming single-process call")
        logging.getLogger("lm_eval.evaluator").warning("generation_kwargs: %s specified through cli", {})
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "x")
        hf.warning("a warning that matters")
    assert [r.getMessage() for r in caplog.records] == ["a warning that matters"]
    with caplog.at_level(logging.DEBUG, logger="lm_eval.models.huggingface"):
        hf.warning("Passed an already-initialized model through `pretrained`")
    assert caplog.records[-1].levelname == "DEBUG"


def test_lm_eval_prints_become_debug(capsys, caplog):
    pytest.importorskip("lm_eval")
    from lorasweep import quiet

    with caplog.at_level(logging.DEBUG, logger="lm_eval"), quiet.lm_eval_call():
        print("bootstrapping for stddev: perplexity")
    assert "bootstrapping" not in capsys.readouterr().out
    assert any(r.getMessage() == "bootstrapping for stddev: perplexity" and r.levelno == logging.DEBUG
               for r in caplog.records)


# ----------------------------------------------------------------------------- a built wheel
@pytest.mark.slow
def test_wheel_installs_and_runs_from_anywhere(tmp_path):
    """pip wheel -> a fresh venv (the test interpreter's torch etc., not this checkout's editable lorasweep)
    -> the commands work from an unrelated folder."""
    src = tmp_path / "checkout"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    for d in ("conf", "sweeps", "src"):
        shutil.copytree(REPO / d, src / d, symlinks=True, ignore=skip)
    dist = tmp_path / "dist"
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
              "-w", dist, src], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = dist.glob("lorasweep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lorasweep/conf/config.yaml", "lorasweep/conf/model/tiny_llama.yaml", "lorasweep/conf/sweep/rank_alpha.yaml",
            "lorasweep/conf/sweep/arms/alpha_1r.yaml", "lorasweep/cli.py",
            "lorasweep/conf/hydra/sweeper/search.yaml", "hydra_plugins/lorasweep_search/search_sweeper.py"} <= names

    venv = tmp_path / "venv"
    p = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    py, bin_ = venv / "bin" / "python", venv / "bin"
    # torch & co. come from the interpreter running the tests (a venv or the system's): its site
    # folders as plain path lines, after the new venv's own. (--system-site-packages would reach the
    # base interpreter's, not a venv's.) Path lines run no .pth files there, so this checkout's
    # editable lorasweep stays out; --ignore-installed installs the wheel despite it.
    (site_dir,) = (venv / "lib").glob("python*/site-packages")
    (site_dir / "test_parent_env.pth").write_text("\n".join(dict.fromkeys(site.getsitepackages())) + "\n")
    p = _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(PATH=f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}")
    p = _run([py, "-c", "import lorasweep, lorasweep.cli as c; print(lorasweep.__file__); print(c.conf_dir())"],
             cwd=work, env=env)
    assert p.returncode == 0, p.stderr
    pkg_file, conf = (Path(line).resolve() for line in p.stdout.split())
    venv_lib = Path(venv).resolve() / "lib"
    assert pkg_file.is_relative_to(venv_lib) and conf == pkg_file.parent / "conf", p.stdout
    assert not pkg_file.is_relative_to(REPO) and not conf.is_relative_to(REPO)

    results = work / "results"
    p = _run([bin_ / "lorasweep", "model=tiny_llama", *TINY, f"results_dir={results}", "study=w"], cwd=work, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = (results / "w").glob("*/record.json")
    assert json.loads(rec.read_text())["status"] == "completed"

    p = _run([bin_ / "lorasweep", "sweep=rank_alpha", "model=tiny_llama", "--cfg", "job"], cwd=work, env=env)
    assert p.returncode == 0 and "study: rank_alpha" in p.stdout, p.stderr[-3000:]

    p = _run([bin_ / "lorasweep-report", results / "w"], cwd=work, env=env)
    assert p.returncode == 0, p.stderr[-3000:]

    p = _run([bin_ / "lorasweep-plan", "model=tiny_llama"], cwd=work, env=env)
    assert p.returncode == 0 and p.stdout.startswith("tiny_llama_"), p.stderr[-3000:]
