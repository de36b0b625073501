"""scripts/gpu/checks.sh (the prepared device run) works end to end in its CPU `smoke` mode: dpdm from
the source tree via PYTHONPATH and console-script shims, as on the GPU machine where dpdm is not installed."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_checks_script_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "checks.sh"), "smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "vs opacus" in (tmp_path / "bench_smoke.txt").read_text()
    assert (tmp_path / "mnist_fast.md").exists() and (tmp_path / "env.txt").exists()
