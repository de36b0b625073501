"""Fast sampling: the prepared denoiser gives the same samples, and the benchmark measures every mode."""
import json
import subprocess
import sys

import pytest
import torch

from dpdm.diffusion.inference import prepare_for_sampling
from dpdm.diffusion.samplers import latents_from_seeds, run_sampler
from tests.helpers import REPO, tiny_denoiser


def _samples(den, compile=False):
    seeds = list(range(6))
    lat = latents_from_seeds(seeds, (1, 8, 8))
    return run_sampler(den, lat, name="edm_heun", num_steps=4, class_labels=torch.arange(6) % 3,
                       noise_seeds=seeds, guidance=1.0)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_channels_last_inference_gives_the_same_samples(patch_size):
    plain = tiny_denoiser(dtype=torch.float32, patch_size=patch_size).eval().requires_grad_(False)
    ref = _samples(plain)
    fast = prepare_for_sampling(tiny_denoiser(dtype=torch.float32, patch_size=patch_size), "cpu")
    assert next(p for p in fast.net.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    out = _samples(fast)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (ref - _samples(tiny_denoiser(dtype=torch.float32, seed=1).eval())).abs().max() > 1e-2


@pytest.mark.slow
def test_compiled_network_gives_the_same_samples():
    ref = _samples(tiny_denoiser(dtype=torch.float32).eval().requires_grad_(False))
    out = _samples(prepare_for_sampling(tiny_denoiser(dtype=torch.float32), "cpu", compile=True))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_sampling_benchmark_measures_modes_beside_dp_training(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "sampling_speed.py"), "--net", "ddpmpp_tiny",
           "--device", "cpu", "--batch", "4", "--train-batch", "2", "--repeats", "1", "--measure-steps", "1",
           "--threads", "1", "--modes", "eager,fast", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "× DP training" in res.stdout and "paper_fid" in res.stdout
    rec = json.loads(out.read_text())[-1]
    assert set(rec["modes"]) == {"eager", "fast"} and rec["training_noised_images_per_s"] > 0
    assert {r["preset"] for r in rec["samplers"]} == {"ddim", "stochastic_ddim", "edm_heun", "paper_fid"}
