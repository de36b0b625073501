"""`make bench` (benchmarks/train_step.py) runs every variant, prints the table and appends a record."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow  # three engines through the benchmark harness (~40 s on 2 cores): `make test-slow`
def test_bench_runs_every_variant_and_appends_results(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--device", "cpu",
           "--net", "ddpmpp_tiny", "--batch", "2", "--k", "2", "--steps", "1", "--warmup", "1",
           "--rounds", "1", "--threads", "1", "--variants", "nonprivate,dpdm,opacus", "--profile", "5",
           "--out", str(out)]
    earlier = {"settings": {"note": "an earlier run's record"}}
    out.write_text(json.dumps([earlier]))  # the run appends to it instead of overwriting
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "vs non-private" in res.stdout and "opacus" in res.stdout
    # --profile: one table per variant, its five ops by self CPU time
    assert res.stdout.count("ops with the most self CPU time") == 3 and "aten::" in res.stdout
    history = json.loads(out.read_text())
    assert len(history) == 2 and history[0] == earlier
    rec = history[-1]
    assert rec["settings"]["batch"] == 2 and rec["settings"]["k"] == 2
    assert {"torch", "opacus", "cpu_count"} <= set(rec["machine"])
    for v in ("nonprivate", "dpdm", "opacus"):
        r = rec["results"][v]
        assert r["noised_images_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert abs(r["noised_images_per_s"] * r["median_step_s"] - 4) < 1e-6


def test_bench_refuses_unknown_variant(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--variants",
                          "nonprivate,vmap", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown variant" in res.stderr


def test_bench_channels_builds_the_net_dpdm_train_composes_with_that_width():
    from hydra.utils import instantiate

    from tests.helpers import compose_config, load_script

    bench = load_script("benchmarks/train_step.py", "train_step_bench")
    cfg = compose_config("train", ["experiment=mnist_eps1_cpu", "net.model_channels=24"])
    trained = instantiate(cfg.net)
    benched = bench.build("ddpmpp_tiny_p2", "cpu", channels=24).net
    shapes = lambda net: [tuple(p.shape) for p in net.parameters()]
    assert shapes(benched) == shapes(trained)
    assert sum(p.numel() for p in benched.parameters()) == 405_700
    assert shapes(bench.build("ddpmpp_tiny_p2", "cpu").net) != shapes(trained)  # 0: the file's width (32)


@pytest.mark.parametrize("variant", ["nonprivate", "dpdm", "opacus"])
def test_bench_physical_chunks_give_the_whole_batch_update_in_one_optimizer_step(variant, monkeypatch):
    """--physical splits a step as training_step does: the optimizer steps once per logical batch, and (with
    σ = 0 and the same draws per example) the gradient it receives is the unchunked step's."""
    import torch

    from dpdm.diffusion.loss import TrainingNoise
    from tests.helpers import load_script

    bench = load_script("benchmarks/train_step.py", "train_step_bench")
    monkeypatch.setattr(bench, "SIGMA", 0.0)  # no DP noise: the update is the mean of clipped gradients
    real_draw = bench.draw_training_noise

    def draws_keyed_by_example(xc, yc, *, generator, **kw):  # example i draws alike in any chunk
        parts = [real_draw(xc[i:i + 1], yc[i:i + 1], generator=torch.Generator().manual_seed(
            int(xc[i].sum().item() * 1e4) % 2**31), **kw) for i in range(len(xc))]
        return TrainingNoise(torch.cat([p.sigma for p in parts]), torch.cat([p.noise for p in parts]),
                             torch.cat([p.class_labels for p in parts]))

    monkeypatch.setattr(bench, "draw_training_noise", draws_keyed_by_example)
    seen = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return adam_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    grads = {}
    for physical in (0, 2):  # 5 examples: one chunk, or chunks of 2, 2 and 1
        seen.clear()
        den = bench.build("ddpmpp_tiny", torch.device("cpu"))
        bench.make_step(variant, den, B=5, K=1, device=torch.device("cpu"), physical=physical)()
        assert len(seen) == 1  # one optimizer step per logical batch, chunked or not
        grads[physical] = seen[0]
    biggest = max(g.abs().max().item() for g in grads[0])
    worst = max((a - b).abs().max().item() for a, b in zip(grads[0], grads[2], strict=True))
    assert biggest > 1e-3 and worst < 1e-5 * biggest, (worst, biggest)  # float32 sums in another order
