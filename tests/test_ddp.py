"""Data-parallel DP-SGD (trainer=ddp, `DPDDPStrategy` + Opacus' `DistributedDPOptimizer`) and logical
batches made of micro-batches.

Two CPU processes (gloo) are launched with torchrun, as a user would (`tests/ddp_worker.py`), and train in
float64 through the real Lightning module on fixed local batches (with an empty local batch and a rank
whose batch needs three micro-batches). Checked against a single-process run on the union of the ranks'
examples, and against the analytic noise distribution:

* σ = 0: every gradient handed to Adam, and the parameters and EMA weights after the steps, equal the
  single-process ones (|Δ| ≤ 1e-12 for gradients of size ~C/B = 6e-3, ≤ 1e-10 for weights after Adam,
  whose first step divides by |g|); both ranks hold bitwise identical weights; gradients are all-reduced
  once per parameter per logical batch (never per micro-batch, never by torch's DDP hooks).
* σ > 0: the noise in the update is N(0, (σC/B)²) per coordinate — one draw for the whole logical batch,
  not one per rank. Same χ² / mean test as tests/test_dp_noise.py at two-sided false-alarm rate 1e-6 each
  over n ≈ 1.4e5 coordinates; its power against the variance of W = 2 independent draws (×2) is computed
  below (> 1 − 1e-12), and the statistic of the actual data is checked to reject ×2 and ×4 variances.
* ε: the accountant of every rank has the single-process history (σ, q, steps), so the same ε.

The command-line run (`dpdm-train trainer=ddp trainer.devices=2`, Lightning's own launcher) checks the plan
and privacy.json against the single-process plan. The sharded Poisson loaders are checked in-process.
"""
from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from scipy import stats
from torch.utils.data import Subset

from dpdm.data.datamodule import ImageDataModule
from dpdm.privacy.accounting import mechanism_epsilon
from dpdm.training.privacy_plan import make_privacy_plan
from tests.ddp_worker import MAX_PHYSICAL, SIGMA, STEPS_DATA, STEPS_NOISE, C, E, N, fit, make_module
from tests.helpers import BIN, REPO, cli_env, tiny_denoiser
from tests.test_dp_noise import ALPHA, noise_test

N_PARAM_TENSORS = len(list(tiny_denoiser(num_classes=3).parameters()))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _env():
    return cli_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.ddp_worker", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single_process_union():
    """The same module in one process, each logical batch being the union of the ranks' batches."""
    module = make_module(0.0, len(STEPS_DATA), max_physical=8, noise_seed=0)
    fit(module, [r0 + r1 for r0, r1 in STEPS_DATA])
    assert module.chunk_sizes == [8, 2]  # one micro-batch per logical batch
    return module


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in tensors]).numpy()


def test_ranks_use_opacus_ddp_pieces_and_reduce_once_per_logical_batch(ddp_run):
    for res in ddp_run:
        for run in ("sigma0", "noise"):
            s = res[run]
            assert s["wrapper"] == "DifferentiallyPrivateDistributedDataParallel"  # not torch's DDP
            assert s["optimizer"] == "DistributedDPOptimizer"
            # One all-reduce per parameter tensor per logical batch, however many micro-batches.
            assert s["all_reduces"] == [N_PARAM_TENSORS] * len(s["recorded"])
    # Rank 1's first logical batch (5 examples) ran as 3 micro-batches; rank 0's second one was empty.
    assert ddp_run[1]["sigma0"]["chunk_sizes"] == [MAX_PHYSICAL, MAX_PHYSICAL, 1, MAX_PHYSICAL]
    assert ddp_run[0]["sigma0"]["chunk_sizes"] == [MAX_PHYSICAL, 1]


def test_sigma0_ddp_steps_equal_single_process_steps_on_the_union(ddp_run, single_process_union):
    ref = single_process_union
    assert len(ref.recorded) == 2
    assert max(np.abs(_flat(g)).max() for g in ref.recorded) > 1e-3  # a real, non-zero update
    for rank in (0, 1):
        s = ddp_run[rank]["sigma0"]
        assert len(s["recorded"]) == 2
        for got, want in zip(s["recorded"], ref.recorded, strict=True):
            assert _max_diff(got, want) <= 1e-12
        assert _max_diff(s["params"], [p.detach() for p in ref.denoiser.parameters()]) <= 1e-10
        assert _max_diff(s["ema"], [p.detach() for p in ref.ema.parameters()]) <= 1e-10
        assert s["history"] == ref.dp.accountant.history == [(0.0, E / N, 2)]
    a, b = ddp_run
    assert all(torch.equal(x, y) for x, y in zip(a["sigma0"]["params"], b["sigma0"]["params"], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a["sigma0"]["ema"], b["sigma0"]["ema"], strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a["noise"]["params"], b["noise"]["params"], strict=True))


def test_noise_is_added_once_per_logical_batch_with_std_sigma_C_over_B(ddp_run):
    s, clean = ddp_run[0]["noise"], ddp_run[0]["sigma0"]
    # Both ranks hand Adam the same all-reduced gradient.
    for got, other in zip(s["recorded"], ddp_run[1]["noise"]["recorded"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(got, other, strict=True))
    # Step 0: same data and weights as the σ = 0 run, so the difference is the noise alone;
    # steps 1 and 2 had empty batches on both ranks: the update is pure noise.
    assert STEPS_NOISE[0] == STEPS_DATA[0] and all(s == ([], []) for s in STEPS_NOISE[1:])
    noise = np.concatenate([_flat(s["recorded"][0]) - _flat(clean["recorded"][0]),
                            _flat(s["recorded"][1]), _flat(s["recorded"][2])])
    std = SIGMA * C / E
    n = noise.size
    assert n > 100_000
    ratio = float(np.mean(np.square(noise / std)))  # ≈ 1 if noise was added once, ≈ 2 if per rank
    assert noise_test(noise, std) == (True, True), f"mean z = {noise.mean() / std:.4g}, var ratio {ratio:.4f}"
    # Power against "every rank adds its own noise" (variance × W = 2): probability that 2·χ²(n) falls
    # below the upper critical value.
    upper = stats.chi2.isf(ALPHA / 2, n)
    assert stats.chi2.cdf(upper / 2, n) < 1e-12
    # ... and the statistic of these very values rejects it (and × 4: every rank adding the same draw).
    assert noise_test(noise, std * math.sqrt(2))[1] is False
    assert noise_test(noise, std * 2)[1] is False


def test_epsilon_is_the_single_process_epsilon(ddp_run):
    expected = mechanism_epsilon(noise_multiplier=SIGMA, sample_rate=E / N, steps=len(STEPS_NOISE),
                             delta=1e-5, accountant="rdp")
    for res in ddp_run:
        assert res["noise"]["history"] == [(SIGMA, E / N, len(STEPS_NOISE))]
        assert res["noise"]["epsilon"] == pytest.approx(expected, rel=1e-12)


# --- logical batches of micro-batches, in one process ----------------------------------------------

def test_logical_batch_of_four_micro_batches_equals_one_big_batch():
    """σ = 0, float64: 8 examples as one micro-batch vs four of 2 (three skipped optimizer steps that
    only clip and accumulate). Same update to Adam (|Δ| ≤ 1e-12), weights, EMA (≤ 1e-10), one step
    accounted. tests/test_dp_step.py checks the chunked update against brute-force clipping (2 chunks)."""
    runs = {}
    for max_physical in (8, 2):
        module = make_module(0.0, 1, max_physical, noise_seed=0)
        trainer = fit(module, [list(range(8))])
        assert trainer.global_step == 1 and module.steps_taken == 1
        runs[max_physical] = module
    big, small = runs[8], runs[2]
    assert big.chunk_sizes == [8] and small.chunk_sizes == [2, 2, 2, 2]
    assert len(big.recorded) == len(small.recorded) == 1
    assert np.abs(_flat(big.recorded[0])).max() > 1e-3
    assert _max_diff(small.recorded[0], big.recorded[0]) <= 1e-12
    assert _max_diff(list(small.denoiser.parameters()), list(big.denoiser.parameters())) <= 1e-10
    assert _max_diff(list(small.ema.parameters()), list(big.ema.parameters())) <= 1e-10
    assert small.dp.accountant.history == big.dp.accountant.history == [(0.0, E / N, 1)]


# --- the sharded Poisson loaders (in-process, ranks given explicitly) -------------------------------

def _datamodule(subset_size, batch_size):
    # The same sampler_seed on every rank: the worst case for independence between the ranks' streams.
    return ImageDataModule("mnist", data_dir=str(REPO / "data"), subset_size=subset_size,
                           batch_size=batch_size, sampler_seed=5)


def _rank_loader(rank, subset_size, batch_size, world_size=2):
    dm = _datamodule(subset_size, batch_size)  # one per rank, as in separate processes
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return dm, dm.train_dataloader()


def test_each_rank_samples_its_own_shard_at_the_global_rate_with_the_single_process_step_count():
    single_dm = _datamodule(40, 1)  # q = 1/40; a 20-example shard is empty with probability ≈ 0.60
    single = single_dm.train_dataloader()
    shards = []
    for rank in (0, 1):
        dm, loader = _rank_loader(rank, 40, 1)
        assert isinstance(loader, DPDataLoader) and isinstance(loader.dataset, Subset)
        assert loader.sample_rate == dm.sample_rate == 1 / 40  # the global q, not B/W over N/W
        shards.append(list(loader.dataset.indices))
        sizes = [len(x) for x, _ in loader]
        assert len(sizes) == len(loader) == len(single) == 40  # ⌊1/q⌋ steps on every rank
        assert 0 in sizes and max(sizes) > 0  # empty local batches are yielded, not skipped
    assert sorted(shards[0] + shards[1]) == list(range(40)) and not set(shards[0]) & set(shards[1])


def _global_batch_size_test(sizes: np.ndarray, n: int, q: float) -> tuple[bool, bool]:
    """(mean ok, variance ok) for i.i.d. Binomial(n, q) global batch sizes, two-sided at ALPHA each.

    z_t = (b_t − nq)/√(nq(1−q)); Σ z_t/√T ~ N(0, 1); S = Σ z_t² has mean T and variance T(2 + κ),
    κ = (1 − 6q(1−q))/(nq(1−q)) the binomial's excess kurtosis; (S − T)/√(T(2 + κ)) is ~N(0, 1) (CLT)."""
    var = n * q * (1 - q)
    z = (sizes - n * q) / math.sqrt(var)
    T = z.size
    crit = stats.norm.isf(ALPHA / 2)
    kappa = (1 - 6 * q * (1 - q)) / var
    return (bool(abs(z.sum() / math.sqrt(T)) < crit),
            bool(abs((np.square(z).sum() - T) / math.sqrt(T * (2 + kappa))) < crit))


def test_union_of_the_local_batches_is_a_poisson_sample_of_the_whole_dataset():
    """400 examples, B = 20 (q = 0.05), 50 epochs = 1000 steps: the global batch sizes are i.i.d.
    Binomial(400, q) — mean and variance tests at false-alarm rate 1e-6 each. Power: ranks sharing one
    stream (same seed on every rank) would double the variance — checked to be rejected below."""
    n, b, epochs = 400, 20, 50
    loaders = [_rank_loader(rank, n, b)[1] for rank in (0, 1)]
    local = [[len(idx) for _ in range(epochs) for idx in loader.batch_sampler] for loader in loaders]
    assert len(local[0]) == len(local[1]) == epochs * int(n / b)
    assert local[0] != local[1]
    assert _global_batch_size_test(np.add(*local), n, b / n) == (True, True)
    # The mistake of one shared stream: both shards Poisson-sampled with identically seeded generators.
    shared = [DPDataLoader(loader.dataset, sample_rate=b / n, generator=torch.Generator().manual_seed(5))
              for loader in loaders]
    wrong = [[len(idx) for _ in range(epochs) for idx in loader.batch_sampler] for loader in shared]
    assert _global_batch_size_test(np.add(*wrong), n, b / n)[1] is False


# --- the command line: Lightning launches the second process ---------------------------------------

def test_dpdm_train_trainer_ddp_two_processes_has_the_single_process_plan_and_epsilon(tmp_path):
    shrink = ["experiment=smoke", "debug=tiny", "max_physical_batch_size=4"]
    proc = subprocess.run([str(BIN / "dpdm-train"), *shrink, "trainer=ddp", "trainer.devices=2",
                           "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # really two processes
    report = json.loads((tmp_path / "privacy.json").read_text())
    plan = make_privacy_plan(enabled=True, epsilon=10, delta=1e-4, max_grad_norm=1.0, accountant="rdp",
                             noise_multiplier=None, batch_size=10, dataset_size=40, epochs=1,
                             noise_multiplicity=2)  # what one process plans for this config
    assert {k: report[k] for k in plan.to_dict()} == plan.to_dict()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert report["steps"] == summary["optimizer_steps"] == plan.planned_steps == 4
    assert report["epsilon"] == pytest.approx(
        mechanism_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=4,
                      delta=plan.delta, accountant="rdp"), rel=1e-12)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["dpdm"]["accountant"]["history"] == [(plan.noise_multiplier, plan.sample_rate, 4)]
    assert (tmp_path / "samples" / "epoch_0000.png").is_file()
