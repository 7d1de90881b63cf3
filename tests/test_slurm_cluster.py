"""The local SLURM cluster runs a batch job end to end."""
from __future__ import annotations

import subprocess

import pytest

from slurm_fixture import local_slurm  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.slurm


def test_sbatch_job_writes_output(local_slurm, tmp_path):  # noqa: F811
    out = tmp_path / "job.out"
    proc = subprocess.run(
        ["sbatch", "--wait", f"--partition={local_slurm.partition}", "--time=2", "--mem=100M",
         f"--chdir={tmp_path}", f"--output={out}", "--wrap", "echo ok"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().strip() == "ok"
