"""Every study in sweeps/ composes, validates and (slow test) runs to completion at smoke size.

Fast: each study's whole grid is expanded the way Hydra's basic sweeper does it and every
combination is composed into a RunConfig and validated (no weights). Slow: every study runs
through the `lorasweep` command with model=tiny_llama train.max_steps=2 eval=none logger=none,
and every run of its grid must end completed; the report is then written for each folder.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose
from tiny_encoder import tiny_bert_dir, write_glue_folder

STUDIES = ["rank_alpha", "qlora_vs_lora", "optimizers", "epochs", "targets", "alpha_scan",
           "finetune_methods", "seeds", "sst2_classification", "data_quality", "forgetting", "lr_rank"]
SMOKE = ["train.max_steps=2", "eval=none", "logger=none", "train.batch_size=2", "train.max_seq_len=80",
         "data.n_train=32", "data.n_val=8", "data.n_test=8"]


def study_files() -> list[Path]:
    return sorted(p for p in (REPO / "sweeps").glob("*.yaml"))


def grid(path: Path) -> list[list[str]]:
    """The study's sweep as override lists, expanded like Hydra's basic sweeper (cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = (yaml.safe_load(path.read_text()).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        ov = parser.parse_overrides([f"{key}={value}"])[0]
        vals = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in vals])
    return [list(c) for c in itertools.product(*axes)]


@pytest.fixture(scope="module", autouse=True)
def instruction_files(tmp_path_factory):
    """LORASWEEP_DATA with small generated stand-ins for lima/lima.json and alpaca/alpaca_5000.json
    (the data_quality and forgetting studies read the user's copies from there)."""
    import json
    import os

    root = tmp_path_factory.mktemp("data")
    for name, n in (("lima/lima.json", 60), ("alpaca/alpaca_5000.json", 80)):
        (root / name).parent.mkdir(parents=True)
        rows = [{"instruction": f"Say word {i}.", "input": "", "output": f"word {i} " * (1 + i % 5)} for i in range(n)]
        (root / name).write_text(json.dumps(rows))
    old = os.environ.get("LORASWEEP_DATA")
    os.environ["LORASWEEP_DATA"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LORASWEEP_DATA", None)
    else:
        os.environ["LORASWEEP_DATA"] = old


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return tiny_bert_dir(root), write_glue_folder(root / "sst2", n_train=32, n_dev=8, n_test=8)


def model_overrides(name: str, request) -> list[str]:
    """tiny_llama for the causal-LM studies; a tiny BERT and a tiny GLUE folder for SST-2."""
    cfg = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())
    if any("minilm" in str(d) for d in cfg.get("defaults") or []):
        bert, folder = request.getfixturevalue("encoder")
        return [f"model.name_or_path={bert}", "model.name=tiny_bert", f"data.path={folder}"]
    return ["model=tiny_llama"]


def test_the_studies_exist():
    names = {p.stem for p in study_files()}
    missing = set(STUDIES) - names
    assert not missing, f"missing study files: {missing}"
    for name in STUDIES:
        text = (REPO / "sweeps" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        cfg = yaml.safe_load(text)
        assert cfg["study"] == name and cfg["hydra"]["mode"] == "MULTIRUN", name
        assert "GPU scale" in text and "Reference" in text, f"{name}: header must give the reference and GPU overrides"
        assert cfg.get("reference", {}).get("question"), f"{name}: reference.question"


@pytest.mark.parametrize("path", study_files(), ids=lambda p: p.stem)
def test_every_grid_point_composes_and_validates(path, request, tmp_path):
    from lorasweep.config import run_id, validate

    combos = grid(path)
    assert combos, f"{path.name}: no sweep params"
    # a study with a pruner stops runs on their validation curve: it keeps its validation split
    smoke = [("eval=val" if o == "eval=none" else o) for o in SMOKE] if "/pruner:" in path.read_text() else SMOKE
    ids = set()
    for combo in combos:
        cfg = compose(f"sweep={path.stem}", *model_overrides(path.stem, request), *smoke,
                      f"results_dir={tmp_path}", *combo)
        validate(cfg)
        assert cfg.study == yaml.safe_load(path.read_text())["study"]
        ids.add(run_id(cfg))
    assert len(ids) == len(combos), f"{path.name}: two grid points share a run id"


def test_rank_alpha_sets_alpha_relative_to_r():
    got = {(c.lora.r, c.lora.alpha) for c in
           (compose("sweep=rank_alpha", "model=tiny_llama", f"lora.r={r}", f"+sweep/arms={a}")
            for r in (4, 64) for a in ("alpha_0p5r", "alpha_1r", "alpha_2r"))}
    assert got == {(4, 2.0), (4, 4.0), (4, 8.0), (64, 32.0), (64, 64.0), (64, 128.0)}


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_smoke_run_completes(name, request, tmp_path):
    """The real command on the whole grid: every run completed, and the report writes."""
    from lorasweep.analysis.report import load_study, write_report

    out = tmp_path / "r"
    # one seed of each arm: the seeds a study repeats its arms over only multiply the same check
    seeded = any(c.startswith("seed=") for c in grid(REPO / "sweeps" / f"{name}.yaml")[0])
    cmd = [sys.executable, "-m", "lorasweep.cli", f"sweep={name}", *model_overrides(name, request), *SMOKE,
           f"results_dir={out}", *(["seed=0"] if seeded and name != "seeds" else [])]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = load_study(out / name)
    combos = grid(REPO / "sweeps" / f"{name}.yaml")
    if seeded and name != "seeds":
        combos = [c for c in combos if "seed=0" in c]
    assert len(df) == len(combos)
    assert (df["status"] == "completed").all(), df[["run_id", "status", "error"]].to_string()
    paths = write_report(out / name)
    md = paths["md"].read_text()
    assert md.startswith(f"# Study: {name}") and "## Verdicts" in md  # every study's claims are judged


def gpu_commands(path: Path) -> list[list[str]]:
    """The `lorasweep ...` commands of a study header's GPU-scale section, as override lists."""
    import re
    import shlex

    lines, out, on = path.read_text().splitlines(), [], False
    cmd = ""
    for line in lines:
        if not line.startswith("#"):
            break
        if line.startswith("# GPU scale"):
            on = True
            continue
        if on and not line.startswith("#   "):
            on = False
        if on:
            body = line[1:].strip()
            if body.startswith("lorasweep ") or cmd:
                cmd += " " + body.rstrip("\\").strip()
                if not body.endswith("\\"):
                    out.append(shlex.split(re.sub(r"<([^>]+)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", cmd))[1:])
                    cmd = ""
    return out


@pytest.mark.parametrize("path", [p for p in study_files()
                                  if p.stem not in ("smoke", "quickstart", "pilot") and not p.stem.startswith("search_")],
                         ids=lambda p: p.stem)
def test_every_gpu_command_in_a_study_header_composes_its_arms(path, tmp_path):
    """Copy-paste complete: each header's GPU command, with its own value lists, composes and
    validates at every grid point (placeholders <...> stand for a real file), and keeps the study's
    arms (a single value on the command line replaces a swept axis: then the header must say so)."""
    from lorasweep.config import validate
    from lorasweep.study.sweep import sweep_jobs

    cmds = gpu_commands(path)
    assert cmds, f"{path.name}: no 'lorasweep ...' command under '# GPU scale'"
    stand_in = tmp_path / "data.json"
    stand_in.write_text('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}]')
    folder = tmp_path / "glue"
    write_glue_folder(folder, n_train=8, n_dev=4, n_test=4)
    for cmd in cmds:
        cmd = [o.split("=", 1)[0] + "=" + (str(folder) if "GLUE" in o or "SST" in o else str(stand_in))
               if "=<" in o else o for o in cmd]
        jobs = sweep_jobs(cmd)
        assert len(jobs) > 1, f"{path.name}: {' '.join(cmd)} runs a single job"
        for job in jobs:
            validate(compose(*job, f"results_dir={tmp_path}"))


def test_every_gpu_command_in_the_readme_composes_its_arms(tmp_path):
    """The README's findings table: each GPU command (4th column) composes and validates at every
    grid point and runs more than one job."""
    import re
    import shlex

    from lorasweep.config import validate
    from lorasweep.study.sweep import sweep_jobs

    stand_in = tmp_path / "data.json"
    stand_in.write_text('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}]')
    folder = tmp_path / "glue"
    write_glue_folder(folder, n_train=8, n_dev=4, n_test=4)
    rows = [l for l in (REPO / "README.md").read_text().splitlines() if l.startswith("| ") and "sweeps/" in l]
    assert len(rows) >= 12
    for row in rows:
        cell = row.split(" | ")[3]
        m = re.search(r"`lorasweep ([^`]+)`", cell)
        assert m, row
        text = re.sub(r"<([^>]+)>", lambda g: "<" + g.group(1).replace(" ", "_") + ">", m.group(1))
        cmd = [o.split("=", 1)[0] + "=" + (str(folder) if "GLUE" in o or "SST" in o else str(stand_in))
               if "=<" in o else o for o in shlex.split(text)]
        jobs = sweep_jobs(cmd)
        assert len(jobs) > 1 or "search" in cmd[0], f"README: {' '.join(cmd)} runs a single job"
        for job in jobs[:60]:
            validate(compose(*job, f"results_dir={tmp_path}"))
