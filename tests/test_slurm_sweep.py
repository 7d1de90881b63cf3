"""`lorasweep -m launcher=slurm ...` runs each configuration of the grid as a job of a real SLURM."""
from __future__ import annotations

import pytest

from slurm_fixture import local_slurm  # noqa: F401  (pytest fixture)
from test_sweep import TINY, lorasweep, records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_slurm_sweep_runs_each_config_as_a_job(local_slurm, tmp_path):  # noqa: F811
    # The cluster fields of conf/launcher/slurm.yaml, sized for the one small local node.
    p = lorasweep("-m", "launcher=slurm", *TINY, f"results_dir={tmp_path}/r", "study=sl", "lora.r=2,4",
                  f"hydra.launcher.partition={local_slurm.partition}", "hydra.launcher.gpus_per_node=null",
                  "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15",
                  "hydra.launcher.array_parallelism=2", cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = list(records(tmp_path / "r" / "sl").values())
    assert sorted(r["config"]["lora"]["r"] for r in recs) == [2, 4]
    assert all(r["status"] == "completed" for r in recs)
    job_ids = {r["env"].get("slurm_job_id") for r in recs}
    assert None not in job_ids and len(job_ids) == 2  # two jobs (of one array)
    assert all(r["env"].get("slurm_array") for r in recs)
    assert all(r["config"]["train"]["num_threads"] == 1 for r in recs)  # = cpus_per_task
    assert "sweep: 2 completed, 0 failed, 0 skipped (2 runs)" in p.stdout
