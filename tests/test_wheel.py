"""dpdm installed from its wheel, outside the checkout: the configs travel inside the package (dpdm.conf),
so dpdm-train and dpdm-sample work from an empty directory with no conf/ in sight."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import REPO, SHRINK, cli_env


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installed_elsewhere_trains_and_samples_from_an_empty_directory(tmp_path):
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info litter.
    src = tmp_path / "src_tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "conf", src / "conf")
    shutil.copytree(REPO / "src", src / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp_path / "dist"])
    wheel = next((tmp_path / "dist").glob("dpdm-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("dpdm/conf/")}
    for path in (REPO / "conf").rglob("*.yaml"):
        assert f"dpdm/conf/{path.relative_to(REPO / 'conf').as_posix()}" in shipped, path

    # A fresh venv holding only the wheel; its dependencies are borrowed from this environment by path
    # (a .pth line adds a directory, not the editable install's import hook, so `dpdm` is the wheel's).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(
        "\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    where = _run([py, "-c", "import dpdm; print(dpdm.__file__)"]).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = cli_env()
    _run([venv / "bin" / "dpdm-train", *SHRINK, "hydra.run.dir=run"], cwd=empty, env=env)
    assert (empty / "run" / "privacy.json").exists() and (empty / "run" / "checkpoints" / "last.ckpt").exists()
    _run([venv / "bin" / "dpdm-sample", "ckpt=run/checkpoints/last.ckpt", "n=6", "out=samples",
          "sampler.num_steps=2"], cwd=empty, env=env)
    assert (empty / "samples" / "samples.npz").exists()
    assert sorted(p.name for p in empty.iterdir()) == ["run", "samples"]
