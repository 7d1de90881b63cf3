"""The command line: bad input is one line naming the field, no traceback, no record."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def lorasweep(*args, cwd, timeout=180):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lorasweep.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_config_is_one_line_without_traceback(tmp_path):
    p = lorasweep("model=tiny_llama", "lora.r=0", "optimizer.lr=-1", f"results_dir={tmp_path}/r", cwd=tmp_path)
    assert p.returncode == 2
    err = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(err) == 1, p.stderr
    assert "lora.r=0" in err[0] and "optimizer.lr=-1" in err[0]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_target_module_lists_the_real_ones(tmp_path):
    p = lorasweep("model=tiny_llama", "lora.targets=[q_proj,qkv]", "logger=none", f"results_dir={tmp_path}/r",
                  "study=s", cwd=tmp_path)
    assert p.returncode == 1
    assert "lora.targets: unknown module(s) qkv" in p.stderr and "v_proj" in p.stderr
    assert "Traceback" not in p.stderr
    recs = list((tmp_path / "r" / "s").glob("*/record.json"))
    assert len(recs) == 1
    rec = json.loads(recs[0].read_text())
    assert rec["status"] == "failed" and "qkv" in rec["error"]
    assert not (recs[0].parent / "adapter").exists()


def test_malformed_jsonl_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    p = lorasweep("model=tiny_llama", "data=jsonl", f"data.path={f}", "logger=none", f"results_dir={tmp_path}/r",
                  cwd=tmp_path)
    assert p.returncode == 1
    assert "line 2 is not valid JSON" in p.stderr


def test_empty_data_file_is_refused(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    p = lorasweep("model=tiny_llama", "data=jsonl", f"data.path={f}", "logger=none", f"results_dir={tmp_path}/r",
                  cwd=tmp_path)
    assert p.returncode == 1 and "empty" in p.stderr
