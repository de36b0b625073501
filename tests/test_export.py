"""dpdm-export: the shareable file holds the EMA weights, the build config and the privacy record, nothing
else; dpdm-sample draws the same samples from it as from the checkpoint; bad files get one message."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import BIN, run_cli

SHRINK = ["experiment=smoke", "debug=tiny"]


def _run(*cmd):
    return run_cli(Path(cmd[0]).name, *map(str, cmd[1:]))  # in this process (tests.helpers)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "run"
    proc = _run(BIN / "dpdm-train", *SHRINK, f"hydra.run.dir={d}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_export_holds_only_ema_weights_config_and_privacy(run):
    from safetensors.torch import load_file, safe_open

    proc = _run(BIN / "dpdm-export", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run / "export" / "model.safetensors"
    assert f"wrote {out}" in proc.stdout and "ε=" in proc.stdout
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    tensors = load_file(str(out))
    assert tensors.keys() == ema.keys()
    assert all(torch.equal(tensors[k], ema[k]) for k in ema)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"format", "build_config", "privacy"}  # no optimizer, RNG or loop state
    privacy, ledger = json.loads(meta["privacy"]), json.loads((run / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-9) and privacy["steps"] == ledger["steps"]
    assert json.loads(meta["build_config"])["net"] == ckpt["dpdm"]["build_config"]["net"]
    assert "known_seeds" not in privacy and "known_seeds" not in ledger  # seeded from OS entropy


def test_an_export_of_a_run_with_known_seeds_says_so(tmp_path):
    """A fixed noise seed voids the guarantee against its holder; the shared file must carry that caveat."""
    run = tmp_path / "seeded"
    proc = _run(BIN / "dpdm-train", *SHRINK, "privacy.noise_seed=7", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _run(BIN / "dpdm-export", run).returncode == 0
    from safetensors import safe_open

    with safe_open(str(run / "export" / "model.safetensors"), framework="pt") as f:
        privacy = json.loads(f.metadata()["privacy"])
    ledger = json.loads((run / "privacy.json").read_text())
    assert privacy["known_seeds"] == ledger["known_seeds"] == ["privacy.noise_seed"]
    assert privacy["warning"] == ledger["warning"]
    # A second export does not silently replace the first.
    again = _run(BIN / "dpdm-export", run)
    assert again.returncode == 2 and "exists" in again.stderr


def test_sampling_from_the_export_equals_sampling_from_the_checkpoint(run, tmp_path):
    out = run / "export" / "model.safetensors"
    if not out.exists():
        assert _run(BIN / "dpdm-export", run).returncode == 0
    draws = {}
    for name, src in (("ckpt", run / "checkpoints" / "last.ckpt"), ("export", out)):
        proc = _run(BIN / "dpdm-sample", f"ckpt={src}", "n=6", f"out={tmp_path / name}", "sampler.num_steps=3",
                    "device=cpu")
        assert proc.returncode == 0, proc.stderr[-2000:]
        draws[name] = np.load(tmp_path / name / "samples.npz")
    assert np.array_equal(draws["ckpt"]["x"], draws["export"]["x"])
    assert np.array_equal(draws["ckpt"]["y"], draws["export"]["y"])
    assert str(draws["export"]["dataset"]) == "mnist"


@pytest.mark.parametrize("kind", ["garbage", "other_safetensors"])
def test_a_bad_export_gets_one_message(kind, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    if kind == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    else:
        save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    proc = _run(BIN / "dpdm-sample", f"ckpt={path}", "n=2", f"out={tmp_path / 'o'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("not a readable safetensors file" if kind == "garbage" else "not a dpdm export") in proc.stderr
