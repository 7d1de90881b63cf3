"""Session fixture `local_slurm`: a real one-node SLURM cluster from scripts/slurm_local.sh.

Use from a test module with ``from slurm_fixture import local_slurm  # noqa: F401`` and
``@pytest.mark.slurm``. Skips (never fails) when the cluster cannot be had here: not root,
no sbatch and no apt-get, or the start script failing (its stderr is the skip reason).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
# A first run may apt-get install slurm + mariadb (~1-2 min); later runs take < 1 s.
START_TIMEOUT_S = 900


@dataclass(frozen=True)
class LocalSlurm:
    partition: str
    cpus: int
    accounting: bool  # sacct works, so submitit sees cancelled / timed-out jobs


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("local SLURM needs root (scripts/slurm_local.sh installs packages, starts daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("local SLURM: no sbatch and no apt-get to install it")
    if shutil.which("bash") is None or not SCRIPT.exists():
        pytest.skip(f"local SLURM: bash or {SCRIPT} missing")
    try:
        proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"local SLURM: {SCRIPT.name} took over {START_TIMEOUT_S}s")
    m = re.search(r"slurm ready: partition (\S+), (\d+) cpus(, accounting on)?", proc.stdout)
    if proc.returncode != 0 or m is None:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        pytest.skip(f"local SLURM failed to start (rc={proc.returncode}): {' | '.join(why)}")
    return LocalSlurm(partition=m.group(1), cpus=int(m.group(2)), accounting=bool(m.group(3)))
