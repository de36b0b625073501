"""The EMA of weights and its warm-up β_t = min(β, (1+t)/(c+t)): against closed-form averages of the iterates,
the refusal of an offset that freezes the EMA, and the offset reaching a real DP run's EMA."""
import pytest
import torch

from dpdm.training.ema import check_ema_warmup_offset, ema_rate_at, make_ema_copy, update_ema
from tests.helpers import run_cli


def _ema_of(iterates: list[torch.Tensor], offset: float, rate: float = 0.9999) -> torch.Tensor:
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(iterates[0])
    ema = make_ema_copy(model)
    for t, theta in enumerate(iterates[1:]):
        with torch.no_grad():
            model.weight.copy_(theta)
        update_ema(ema, model, ema_rate_at(t, rate, True, offset))
    return ema.weight.detach()


@pytest.mark.parametrize("offset, weight_of_step", [(2, lambda s: 1.0),       # every step alike
                                                     (3, lambda s: s + 1.0),   # ∝ s
                                                     (4, lambda s: (s + 1.0) * (s + 2.0))])   # ∝ s² late on
def test_the_warm_up_is_a_closed_form_power_average_of_the_iterates(offset, weight_of_step):
    """(1+t)/(c+t) makes the EMA after T steps Σ w_s θ_s / Σ w_s over the initial weights (s = 0) and every
    step's, with w_s = (s+1)(s+2)…(s+c−2): a plain mean for c = 2, linear weights for c = 3."""
    gen = torch.Generator().manual_seed(0)
    iterates = [torch.randn(1, 3, generator=gen, dtype=torch.float64).float() for _ in range(12)]
    w = torch.tensor([weight_of_step(s) for s in range(len(iterates))])
    expected = sum(wi * th for wi, th in zip(w, iterates, strict=True)) / w.sum()
    assert _ema_of(iterates, offset) == pytest.approx(expected, abs=1e-6)


def test_the_rate_caps_the_warm_up_and_the_offset_matters_only_while_warming_up():
    assert ema_rate_at(0, 0.995, True) == pytest.approx(1 / 10)
    assert ema_rate_at(5000, 0.995, True, 4) == 0.995                  # past the warm-up: the rate
    assert ema_rate_at(680, 0.995, True) == pytest.approx(681 / 690)   # a 680-step run never gets there
    assert ema_rate_at(3, 0.9, False, 1.0) == 0.9                       # no warm-up: the offset is unused
    check_ema_warmup_offset(1.0001)                                       # just above 1 is a valid offset


@pytest.mark.parametrize("offset", [1, 0.5, -3])
def test_an_offset_that_would_freeze_the_ema_is_refused(offset):
    with pytest.raises(ValueError, match="ema.warmup_offset must be > 1"):
        check_ema_warmup_offset(offset)


def test_dpdm_train_refuses_a_bad_offset_with_one_message(tmp_path):
    proc = run_cli("dpdm-train", "experiment=smoke", "debug=tiny", "ema.warmup=true", "ema.warmup_offset=1",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "ema.warmup_offset must be > 1 (got 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _one_step(run_dir, offset):
    proc = run_cli("dpdm-train", "experiment=smoke", "debug=tiny", "trainer.max_steps=1", "privacy.noise_seed=7",
                   "data.sampler_seed=3", "ema.warmup=true", f"ema.warmup_offset={offset}",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["ema_warmup_offset"] == offset
    sd = ckpt["state_dict"]
    return {k.removeprefix("denoiser."): v for k, v in sd.items() if k.startswith("denoiser.")}, \
        {k.removeprefix("ema."): v for k, v in sd.items() if k.startswith("ema.")}


def test_a_dp_runs_ema_after_one_step_mixes_the_initial_and_the_new_weights_as_the_offset_says(tmp_path):
    """Same seeds, one DP-SGD step: both runs take the same step θ_0 → θ_1, and their EMAs are
    β_0·θ_0 + (1 − β_0)·θ_1 with β_0 = 1/c, so both must give back the same θ_0."""
    raw2, ema2 = _one_step(tmp_path / "c2", 2.0)
    raw10, ema10 = _one_step(tmp_path / "c10", 10.0)
    params = [k for k in raw2 if raw2[k].is_floating_point() and not torch.equal(raw2[k], ema2[k])]
    assert params, "the step changed no weight"
    for k in params:
        assert torch.equal(raw2[k], raw10[k]), k
        theta0_from_c2 = 2 * ema2[k] - raw2[k]              # ema = θ0/2 + θ1/2
        theta0_from_c10 = 10 * ema10[k] - 9 * raw10[k]      # ema = θ0/10 + 9θ1/10
        assert theta0_from_c2 == pytest.approx(theta0_from_c10, abs=2e-5), k
