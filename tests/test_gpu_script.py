"""scripts/gpu/checks.sh (the prepared device run) works end to end in its CPU `smoke` mode: dpdm from
the source tree via PYTHONPATH and console-script shims, as on the GPU machine where dpdm is not installed."""
import os
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_checks_script_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "checks.sh"), "smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bench = (tmp_path / "env_bench.txt").read_text()
    assert "== bench fp32" in bench and "== bench bf16" in bench and bench.count("vs opacus") == 2  # a table each
    # The time box reaches dpdm-train, and the page records that command.
    fast = (tmp_path / "fast.txt").read_text()
    assert "training stops after" in fast and "fast: exit 0" in fast
    page = (tmp_path / "mnist_fast.md").read_text()
    assert "++trainer.max_time=00:" in page and "evaluation.downstream.val_size=0.2" in page
    # At most 8 files come back from the device: the run's small files travel in one archive, no checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env_bench.txt", "fast.txt", "fast_run.tar.gz",
                                                          "mnist_fast.md", "train_step.json"]
    with tarfile.open(tmp_path / "fast_run.tar.gz") as tar:
        names = tar.getnames()
    assert {"privacy.json", "summary.json", "reproduce.json", "samples_accuracy/eval.json"} <= set(names)
    assert not any(n.endswith(".ckpt") or n.endswith(".npz") for n in names)
