"""scripts/setup.sh's disk check: on a disk without room for a fresh environment it stops before installing anything,
and says where and how much (pip's own '[Errno 28] No space left on device' names neither)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What setup.sh reads before its disk check (the inputs of its stamp hash).
SETUP_INPUTS = ("scripts/setup.sh", "scripts/constraints.txt", "requirements.txt", "requirements-dev.txt",
                "scripts/requirements-upstream.txt", "scripts/requirements-upstream-own.txt")


def test_setup_refuses_a_fresh_environment_on_a_disk_too_small_and_installs_nothing(tmp_path):
    clone = tmp_path / "comfyui-tdm"
    for name in SETUP_INPUTS:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, clone / name)
    # No disk has a million GB free: the check must refuse, whatever this machine has.
    env = dict(os.environ, TDM_SETUP_NEED_GB="1000000")
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"a fresh environment in {clone}/.venv needs about 1000000 GB" in done.stderr
    assert "nothing was installed" in done.stderr
    assert not (clone / ".venv").exists()
    assert sorted(p.relative_to(clone).as_posix() for p in clone.rglob("*") if p.is_file()) == sorted(SETUP_INPUTS)
