"""Every config preset composes and runs: experiment presets (shrunk fast_dev_run on CPU), the
denoiser × noise combinations (invalid ones refused), and every sampler preset through dpdm-sample.
"""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdm.data import DATASETS, DatasetMissingError, load_split, prepare
from tests.fixtures_celeba import celeba_file_list, write_fake_celeba
from tests.helpers import REPO, compose_config

CONF = REPO / "conf"
DATA_DIR = os.environ.get("DPDM_DATA_DIR") or str(REPO / "data")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PRECONDITIONINGS = sorted(p.stem for p in (CONF / "preconditioning").glob("*.yaml"))
NOISE_LEVELS = sorted(p.stem for p in (CONF / "noise_levels").glob("*.yaml"))
SAMPLER_PRESETS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))

SHRINK = ["+trainer.fast_dev_run=1", "trainer.accelerator=cpu", "trainer.max_epochs=1",
          "data.subset_size=256", "data.batch_size=64", "max_physical_batch_size=64",
          "net.model_channels=8", "net.channel_mult=[1]", "net.num_blocks=1", "net.attn_resolutions=[]",
          "loss.noise_multiplicity=2", "logger=none", "callbacks.sample_grid.every_n_epochs=1",
          "callbacks.sample_grid.per_class=1", "callbacks.sample_grid.num_steps=2",
          f"data.data_dir={DATA_DIR}"]

# The paper's settings (PAPER.md): denoiser at each ε, batch, δ.
PAPER = {f"{d}_eps{e}": (d, e) for d in ("mnist", "fmnist") for e in ("0.2", "1", "10")}
PAPER.update({f"celeba32_eps{e}": ("celeba32", e) for e in ("1", "10")})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def celeba_data_dir(tmp_path_factory):
    """A data dir whose celeba32 cache is prepared from a fake CelebA in torchvision's format (CelebA
    itself cannot be downloaded here): 256 train images, the size every shrunk run subsets to."""
    from torchvision.datasets import CelebA

    root = tmp_path_factory.mktemp("celeba")
    md5s = write_fake_celeba(root / "raw", n_train=256, n_valid=2, n_test=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CelebA, "file_list", celeba_file_list(md5s))
        prepare("celeba32", data_dir=root / "data", raw_dir=root / "raw", progress=False)
    return root / "data"


_compose = compose_config


def _skip_reason(cfg) -> str | None:
    name = cfg.data.name
    if name not in DATASETS:
        return f"dataset {name!r} is not supported by dpdm.data; the preset is composed and checked, not run"
    try:
        load_split(name, "train", data_dir=cfg.data.data_dir)
    except DatasetMissingError:
        return f"dataset {name!r} is not prepared in {cfg.data.data_dir}; run `dpdm-data {name}`"
    return None


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_hold_the_papers_settings(name):
    dataset, eps = PAPER[name]
    cfg = _compose("train", [f"experiment={name}", "output_dir=unused"])
    den = cfg.preconditioning._target_.rsplit(".", 1)[1]
    assert den == ("VPredictionPreconditioning" if eps == "0.2" else "EDMPreconditioning")
    noise = cfg.noise_levels._target_.rsplit(".", 1)[1]
    assert noise == ("LogSNRCosine" if eps == "0.2" else "LogNormalSigma")
    assert cfg.privacy.epsilon == float(eps) and cfg.privacy.enabled
    assert cfg.privacy.max_grad_norm == 1.0 and cfg.privacy.accountant == "rdp"
    celeba = dataset == "celeba32"
    assert cfg.privacy.delta == (1e-6 if celeba else 1e-5)
    assert cfg.data.batch_size == (2048 if celeba else 4096)
    assert cfg.data.name == {"mnist": "mnist", "fmnist": "fashion_mnist"}.get(dataset, dataset)
    assert cfg.trainer.max_epochs == 300 and cfg.loss.noise_multiplicity == 32
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0 and cfg.ema.rate == 0.999
    assert cfg.net.num_classes == (0 if celeba else 10)
    if not celeba:
        assert (cfg.net.model_channels, list(cfg.net.channel_mult), cfg.net.num_blocks) == (32, [1, 2, 2], 2)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_runs_a_shrunk_fast_dev_run(name, tmp_path, request):
    from dpdm.cli.train import run_training

    overrides = [f"experiment={name}", f"output_dir={tmp_path}", *SHRINK]
    if name.startswith("celeba32"):
        data_dir = request.getfixturevalue("celeba_data_dir")
        overrides = [o for o in overrides if not o.startswith("data.data_dir=")] + [f"data.data_dir={data_dir}"]
    cfg = _compose("train", overrides)
    reason = _skip_reason(cfg)
    if reason:
        pytest.skip(reason)
    summary = run_training(cfg)
    assert summary["optimizer_steps"] == 1
    assert len(summary["sample_grids"]) == 1  # the grid came from the run's sampler config


def test_an_unconditional_model_trains_and_samples(tmp_path):
    """An unconditional net (num_classes = 0: labels ignored, no dropout, no guidance) on labelled MNIST."""
    from dpdm.cli.train import run_training

    cfg = _compose("train", ["experiment=smoke", f"output_dir={tmp_path}", *SHRINK, "net.num_classes=0"])
    assert run_training(cfg)["optimizer_steps"] == 1


def _build_module(cfg):
    """The module dpdm-train would build for `cfg`, on a data module of MNIST's size."""
    from dpdm.training.builder import build_module

    return build_module(cfg, SimpleNamespace(num_train=60_000, image_shape=(1, 28, 28), num_classes=10))[0]


def test_the_net_is_fitted_to_the_data_once_and_the_model_builds_that_net():
    """RGB 16×16 data with 3 classes: cfg.net is set from the data and the model group's net follows it
    by interpolation (one copy to fit); a config resolved too early is refused, not built wrongly."""
    from omegaconf import OmegaConf

    from dpdm.training.builder import build_module

    rgb = SimpleNamespace(num_train=500, image_shape=(3, 16, 16), num_classes=3)
    cfg = _compose("train", ["experiment=smoke", "output_dir=unused"])
    module = build_module(cfg, rgb)[0]
    unet = module.denoiser.net
    assert (unet.img_resolution, unet.in_channels, unet.out_channels, unet.num_classes) == (16, 3, 3, 3)
    assert OmegaConf.is_interpolation(cfg.model, "net") and cfg.net.in_channels == 3
    early = _compose("train", ["experiment=smoke", "output_dir=unused"])
    OmegaConf.resolve(early)
    with pytest.raises(ValueError, match="resolved before the net was fitted"):
        build_module(early, rgb)


@pytest.mark.parametrize("noise_levels", NOISE_LEVELS)
@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
def test_preconditioning_noise_level_combinations_build(preconditioning, noise_levels):
    cfg = _compose("train", [f"preconditioning={preconditioning}", f"noise_levels={noise_levels}",
                             "net=ddpmpp_tiny", "output_dir=unused"])
    module = _build_module(cfg)  # every shipped pair is valid
    precond, dist = module.denoiser.precond, module.noise_levels
    assert type(precond).__name__ == cfg.preconditioning._target_.rsplit(".", 1)[1]
    assert type(dist).__name__ == cfg.noise_levels._target_.rsplit(".", 1)[1]
    sigma = dist.sample((1000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert bool(torch.isfinite(precond.loss_weight(sigma) * precond.c_out(sigma) ** 2).all())


def test_an_invalid_combination_is_refused_when_the_module_is_built():
    cfg = _compose("train", ["preconditioning=vp", "noise_levels=edm_lognormal",
                             "noise_levels.log_sigma_shift=3", "net=ddpmpp_tiny", "output_dir=unused"])
    with pytest.raises(ValueError, match="VPPreconditioning is defined for σ in"):
        _build_module(cfg)


def test_the_model_group_assembles_what_the_top_level_groups_say():
    """Hydra builds the module from conf/model/: net, preconditioning, noise levels, an optimizer partial
    and the scalar settings each come from the group or key a user overrides."""
    cfg = _compose("train", ["experiment=quickstart", "optim.lr=2e-3", "optim.weight_decay=0.01",
                             "ema.rate=0.99", "loss.label_dropout=0.2", "output_dir=unused"])
    module = _build_module(cfg)
    size = lambda net: sum(p.numel() for p in net.parameters())
    assert size(module.denoiser.net) == size(instantiate(cfg.net))
    assert module.noise_levels.log_sigma_shift == cfg.noise_levels.log_sigma_shift
    opt = module.make_optimizer(module.denoiser.parameters())
    assert isinstance(opt, torch.optim.Adam)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (2e-3, 0.01)
    assert tuple(opt.defaults["betas"]) == tuple(cfg.optim.betas)
    assert (module.hparams.ema_rate, module.hparams.label_dropout) == (0.99, 0.2)
    assert module.hparams.max_physical_batch_size == cfg.max_physical_batch_size
    assert not {"net", "plan", "optimizer", "preconditioning", "noise_levels"} & set(module.hparams)


def test_checkpoints_before_the_rename_still_load(tmp_path):
    """Checkpoints name the preconditioning "preconditioning" now and "denoiser" before; both load to
    the same denoiser, and a build config naming neither gets a clear error."""
    from dpdm.training.checkpoint import CheckpointError, load_denoiser

    old = torch.load(_write_checkpoint(tmp_path / "old.ckpt"), weights_only=True)
    new = {"dpdm": {"build_config": dict(old["dpdm"]["build_config"])}, "state_dict": old["state_dict"]}
    new["dpdm"]["build_config"]["preconditioning"] = new["dpdm"]["build_config"].pop("denoiser")
    x, sigma = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.5, 3.0])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(load_denoiser(old)(x, sigma, labels), load_denoiser(new)(x, sigma, labels))
    del new["dpdm"]["build_config"]["preconditioning"]
    with pytest.raises(CheckpointError, match="names no preconditioning"):
        load_denoiser(new)


# ---- dpdm-sample with every sampler preset ---------------------------------------------------------

def test_load_denoiser_picks_the_ema_or_the_raw_weights(tmp_path):
    """Sampling reads the EMA weights, the clipping diagnostics the raw ones the DP step saw; a file
    holding only EMA weights (an export) is refused for raw, by name."""
    from dpdm.training.checkpoint import CheckpointError, build_denoiser, load_denoiser

    ema = torch.load(_write_checkpoint(tmp_path / "c.ckpt"), weights_only=True)
    torch.manual_seed(7)
    raw = build_denoiser(ema).state_dict()
    ckpt = {**ema, "state_dict": {**ema["state_dict"], **{f"denoiser.{k}": v for k, v in raw.items()}}}
    for weights, expected in [("ema", ema["state_dict"]), ("raw", {f"ema.{k}": v for k, v in raw.items()})]:
        got = load_denoiser(ckpt, weights=weights).state_dict()
        assert all(torch.equal(got[k], expected[f"ema.{k}"]) for k in got)
    assert not all(torch.equal(raw[k], ema["state_dict"][f"ema.{k}"]) for k in raw)
    with pytest.raises(CheckpointError, match="no raw weights"):
        load_denoiser(ema, weights="raw")
    with pytest.raises(ValueError, match="choose one of"):
        load_denoiser(ckpt, weights="last")


def _write_checkpoint(path: Path, num_classes: int = 10):
    """A dpdm-train-shaped checkpoint of a tiny random network (no training needed to test plumbing)."""
    from dpdm.diffusion.preconditioning import Denoiser

    build = {"net": {"_target_": "dpdm.nets.DDPMppUNet", "img_resolution": 8, "in_channels": 1,
                     "out_channels": 1, "num_classes": num_classes, "model_channels": 8,
                     "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "zero_init": False},
             # The key checkpoints had before the `denoiser` group became `preconditioning`: an old
             # checkpoint must stay loadable (test_checkpoints_before_the_rename_still_load).
             "denoiser": {"_target_": "dpdm.diffusion.preconditioning.EDMPreconditioning"},
             "data": {"name": "mnist"}}
    torch.manual_seed(0)
    den = Denoiser(instantiate(build["net"]), instantiate(build["denoiser"]))
    state = {f"ema.{k}": v for k, v in den.state_dict().items()}
    torch.save({"dpdm": {"build_config": build}, "state_dict": state}, path)
    return path


def _sample(tmp_path, overrides, tag):
    from dpdm.cli.sample import run_sampling

    cfg = _compose("sample", [f"out={tmp_path / tag}", "device=cpu", *overrides])
    data = np.load(run_sampling(cfg))
    return data["x"], data["y"]


@pytest.mark.parametrize("sampler", SAMPLER_PRESETS)
def test_dpdm_sample_runs_every_sampler_preset_batch_independently(sampler, tmp_path):
    ckpt = _write_checkpoint(tmp_path / "c.ckpt")
    common = [f"ckpt={ckpt}", f"sampler={sampler}", "sampler.num_steps=3", "n=6", "sampler.guidance=0.5"]
    x4, y4 = _sample(tmp_path, [*common, "batch_size=4"], "b4")
    x6, y6 = _sample(tmp_path, [*common, "batch_size=6"], "b6")
    assert x4.shape == (6, 1, 8, 8) and x4.dtype == np.uint8
    assert y4.tolist() == [0, 1, 2, 3, 4, 5]
    # uint8 quantization can flip a value sitting on a rounding boundary; allow 1 level.
    assert np.abs(x4.astype(int) - x6.astype(int)).max() <= 1


def test_dpdm_sample_class_options(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "c.ckpt")
    _, y = _sample(tmp_path, [f"ckpt={ckpt}", "sampler=ddim", "sampler.num_steps=2", "n=4", "classes=7"],
                   "c7")
    assert y.tolist() == [7] * 4
    uncond = _write_checkpoint(tmp_path / "u.ckpt", num_classes=0)
    _, y = _sample(tmp_path, [f"ckpt={uncond}", "sampler=ddim", "sampler.num_steps=2", "n=3"], "u")
    assert y.tolist() == [-1] * 3
    with pytest.raises(ValueError, match="unconditional"):
        _sample(tmp_path, [f"ckpt={uncond}", "sampler=ddim", "n=3", "classes=2"], "u2")
    with pytest.raises(ValueError, match="class-conditional"):
        _sample(tmp_path, [f"ckpt={uncond}", "sampler=ddim", "n=3", "sampler.guidance=1"], "u3")


def test_an_interrupted_dpdm_sample_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """Each batch is on disk as soon as it is drawn; the same command again draws only the rest and ends
    with the very set an uninterrupted call draws. Another sampler's call neither uses nor removes them."""
    import dpdm.diffusion.samplers as samplers

    ckpt = _write_checkpoint(tmp_path / "c.ckpt")
    args = [f"ckpt={ckpt}", "sampler=stochastic_ddim", "sampler.num_steps=3", "n=25", "batch_size=10"]
    x_whole, y_whole = _sample(tmp_path, args, "whole")

    drawn, stop_after = [], [20]
    real = samplers.sample_from_seeds

    def counting(denoiser, seeds, **kw):
        if len(drawn) >= stop_after[0]:
            raise KeyboardInterrupt  # the job is killed while drawing the third batch
        drawn.extend(seeds)
        return real(denoiser, seeds, **kw)

    monkeypatch.setattr(samplers, "sample_from_seeds", counting)
    with pytest.raises(KeyboardInterrupt):
        _sample(tmp_path, args, "cut")
    out = tmp_path / "cut"
    assert not (out / "samples.npz").exists()
    (parts,) = out.glob(".parts-*")
    assert sorted(p.name for p in parts.glob("*.npz")) == ["000000000-000000010.npz", "000000010-000000020.npz"]

    earlier = sum(float(np.load(p)["seconds"]) for p in parts.glob("*.npz"))

    # A 4-step sampler in the same directory starts from sample 0 and leaves the 3-step batches alone.
    drawn.clear()
    stop_after[0] = 10**6
    _sample(tmp_path, [*args, "sampler.num_steps=4"], "cut")
    assert drawn == list(range(25))
    assert [p.name for p in out.glob(".parts-*")] == [parts.name]

    drawn.clear()
    x, y = _sample(tmp_path, [*args, "overwrite=true"], "cut")
    assert drawn == list(range(20, 25))
    np.testing.assert_array_equal(x, x_whole)
    np.testing.assert_array_equal(y, y_whole)
    assert not list(out.glob(".parts-*"))  # the set is whole: its batches are gone
    # The drawing time counts the earlier call's batches too, not only the last 5 samples.
    record = json.loads((out / "sampler.json").read_text())
    assert earlier > 0 and record["draw_s"] >= round(earlier, 1)


def test_sample_parts_count_only_an_unbroken_run_from_sample_zero(tmp_path):
    from dpdm.utils.sample_parts import SampleParts

    parts = SampleParts(tmp_path, {"sampler": "a"})
    assert parts.drawn(10) == (None, 0.0)
    rows = lambda a, b: np.arange(a, b, dtype=np.uint8).reshape(-1, 1, 1, 1)
    parts.add(0, rows(0, 10), 4.0)
    parts.add(5, rows(5, 15), 2.0)    # overlaps (another batch size): only 10 … 14 are new
    parts.add(20, rows(20, 30), 9.0)  # after a gap: not used
    x, seconds = parts.drawn(100)
    assert x.ravel().tolist() == list(range(15)) and seconds == pytest.approx(4.0 + 1.0)
    assert parts.drawn(7)[0].ravel().tolist() == list(range(7))
    assert SampleParts(tmp_path, {"sampler": "b"}).drawn(100) == (None, 0.0)
    (parts.dir / "000000005-000000015.npz").write_bytes(b"damaged")
    assert parts.drawn(100)[0].ravel().tolist() == list(range(10))


def test_sampler_presets_are_the_papers():
    fid = OmegaConf.load(CONF / "sampler" / "paper_fid.yaml")
    assert (fid.name, fid.num_steps, fid.S_churn, fid.S_min, fid.S_max) == ("edm_heun", 1000, 100, 0.05, 50)
    acc = OmegaConf.load(CONF / "sampler" / "paper_accuracy.yaml")
    assert acc.name == "ddim"
    for name in SAMPLER_PRESETS:
        s = OmegaConf.load(CONF / "sampler" / f"{name}.yaml")
        assert (s.sigma_min, s.sigma_max, s.rho) == (0.002, 80.0, 7.0)
