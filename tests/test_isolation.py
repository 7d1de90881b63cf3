"""Each run is alone in its process: nothing a run owns or sets carries into the next one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose
from lorasweep.run import basecache
from lorasweep import job
from tiny_encoder import tiny_bert_dir, write_glue_folder

HERE = Path(__file__).resolve().parent


def _overrides(tmp_path, bert, folder, study):
    return ["model=minilm_l6", f"model.name_or_path={bert}", "model.name=tiny_bert", "logger=none", "data=sst2",
            f"data.path={folder}", "lora=r2_a4_qv", "train.max_steps=3", "train.batch_size=8", "train.max_seq_len=32",
            "train.reuse_base=true", "train.num_threads=1", "train.save_adapter=false",
            f"results_dir={tmp_path / 'r'}", f"study={study}"]


def test_one_process_sweep_of_two_seeds_with_reuse_equals_fresh_processes(tmp_path):
    bert = tiny_bert_dir(tmp_path / "models")
    folder = write_glue_folder(tmp_path / "sst2")
    try:
        same = [job.run(compose(*_overrides(tmp_path, bert, folder, "one"), f"seed={s}"), show_progress=False)
                for s in (0, 1)]
    finally:
        basecache.drop()
    code = ("import json, sys; sys.path.insert(0, %r); from conftest import compose; from lorasweep import job; "
            "o = job.run(compose(*sys.argv[1:]), show_progress=False); print(json.dumps(o.metrics))") % str(HERE)
    fresh = []
    for s in (0, 1):
        p = subprocess.run([sys.executable, "-c", code, *_overrides(tmp_path, bert, folder, "fresh"), f"seed={s}"],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert p.returncode == 0, p.stderr[-2000:]
        fresh.append(json.loads(p.stdout.strip().splitlines()[-1]))
    for a, b in zip(same, fresh):
        assert a.status == "completed" and a.metrics["model/base_reused"] == 0  # a head is the run's own
        for k in ("train/first_loss", "train/loss", "val/loss", "val/accuracy"):
            assert a.metrics[k] == b[k], k
    assert same[0].metrics["val/loss"] != same[1].metrics["val/loss"]  # the seeds differ


def test_thread_count_set_by_a_run_is_restored(tiny):
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    out = job.run(tiny(f"train.num_threads={target}", "eval=none", "train.max_steps=1"), show_progress=False)
    assert out.status == "completed" and out.metrics is not None
    assert torch.get_num_threads() == before
