"""The per-example gradient that reaches clipping is the gradient of the K-averaged loss.

Reference: brute-force autograd, one example at a time, of ℓ_i = mean_k λ(σ_ik)‖D(x_i + σ_ik n_ik) − x_i‖²
with the same noise draws, in float64.
"""
import pytest
import torch

from dpdm.diffusion.loss import TrainingNoise, denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.noise_levels import LogNormalSigma
from dpdm.privacy.engine import ENGINES, make_per_example_engine
from tests.helpers import tiny_denoiser


def _noise_for(tn: TrainingNoise, i: int) -> TrainingNoise:
    labels = None if tn.class_labels is None else tn.class_labels[i:i + 1]
    return TrainingNoise(tn.sigma[i:i + 1], tn.noise[i:i + 1], labels)


@pytest.mark.parametrize("engine", ENGINES)
# head: (unpatch_channels, full_res_blocks), the patch nets' optional full-resolution ending.
@pytest.mark.parametrize("K,conditional,patch_size,head", [(1, True, 1, (0, 0)), (4, True, 1, (0, 0)),
                                                           (1, False, 1, (0, 0)), (4, False, 1, (0, 0)),
                                                           (4, True, 2, (0, 0)), (2, True, 2, (3, 0)),
                                                           (2, True, 2, (4, 1))])
def test_per_example_grad_equals_bruteforce_of_k_averaged_loss(K, conditional, patch_size, head, engine):
    B = 5
    den = tiny_denoiser(num_classes=3 if conditional else 0, patch_size=patch_size, unpatch_channels=head[0],
                        full_res_blocks=head[1])
    g = torch.Generator().manual_seed(1)
    x = torch.rand((B, 1, 8, 8), generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 3, (B,), generator=g) if conditional else None
    tn = draw_training_noise(x, y, noise_multiplicity=K, noise_levels=LogNormalSigma(),
                             label_dropout=0.3, null_label=den.null_label, generator=g)

    # Reference first, on the plain module (no hooks).
    params = [p for p in den.parameters() if p.requires_grad]
    ref = []
    for i in range(B):
        loss_i = denoising_loss_per_example(den, x[i:i + 1], _noise_for(tn, i))[0]
        ref.append(torch.autograd.grad(loss_i, params))

    hooks = make_per_example_engine(den.net, noise_multiplicity=K, engine=engine)
    try:
        with hooks.capture():
            losses = denoising_loss_per_example(den, x, tn)
        hooks.backward(losses)
        worst = 0.0
        for j, p in enumerate(params):
            assert p.grad_sample.shape == (B, *p.shape)
            for i in range(B):
                worst = max(worst, (p.grad_sample[i] - ref[i][j]).abs().max().item())
        assert worst < 1e-10, worst
        # The reference is not trivially zero.
        assert max(r.abs().max().item() for r in ref[0]) > 1e-3
    finally:
        hooks.cleanup()


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_not_multiple_of_k_are_refused(engine):
    den = tiny_denoiser(num_classes=0)
    hooks = make_per_example_engine(den.net, noise_multiplicity=4, engine=engine)
    try:
        x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
        with hooks.capture():
            out = den(x, torch.ones(6, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="multiple of"):
            hooks.backward(out.square().flatten(1).sum(1))
    finally:
        hooks.cleanup()


@pytest.mark.parametrize("engine", ENGINES)
def test_k_must_be_positive(engine):
    with pytest.raises(ValueError, match="noise_multiplicity"):
        make_per_example_engine(tiny_denoiser().net, noise_multiplicity=0, engine=engine)


def test_unknown_engine_and_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="engine"):
        make_per_example_engine(tiny_denoiser().net, noise_multiplicity=1, engine="vmap")
    for net in (torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.LayerNorm(4),
                torch.nn.Embedding(5, 3, padding_idx=0), torch.nn.Conv2d(2, 2, 3, padding="same")):
        with pytest.raises(ValueError, match="no per-example gradient rule"):
            make_per_example_engine(net, noise_multiplicity=1, engine="fold")


@pytest.mark.parametrize("engine", ["fold", "fold_unfold"])
def test_bf16_autocast_gives_fp32_per_example_grads_close_to_fp32(engine):
    """Mixed precision (trainer.precision=bf16-mixed): the per-example gradients that reach clipping are
    fp32 and within bf16 rounding (relative error < 5%) of the fp32 ones."""
    B, K = 4, 2
    den = tiny_denoiser(num_classes=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((B, 1, 8, 8), generator=g) * 2 - 1
    y = torch.randint(0, 3, (B,), generator=g)
    tn = draw_training_noise(x, y, noise_multiplicity=K, noise_levels=LogNormalSigma(), label_dropout=0.1,
                             null_label=den.null_label, generator=g)
    eng = make_per_example_engine(den.net, noise_multiplicity=K, engine=engine)
    grads = {}
    for mode in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            with eng.capture():
                losses = denoising_loss_per_example(den, x, tn)
            eng.backward(losses)
        grads[mode] = [p.grad_sample for p in den.net.parameters()]
    eng.cleanup()
    assert all(gs.dtype == torch.float32 for gs in grads["bf16"])
    err = torch.sqrt(sum((a - b).square().sum() for a, b in zip(grads["bf16"], grads["fp32"], strict=True)))
    ref = torch.sqrt(sum(b.square().sum() for b in grads["fp32"]))
    assert 0 < err / ref < 0.05, (err / ref).item()


class _RawScale(torch.nn.Module):
    """A bare nn.Parameter outside any supported layer (Opacus would fall back to functorch)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return x * self.scale


# Layers no engine may train: (factory, words of the refusal).
REFUSED_LAYERS = {
    "batchnorm_affine": (lambda: torch.nn.BatchNorm2d(4), "mixes the examples"),
    "batchnorm_no_affine": (lambda: torch.nn.BatchNorm2d(4, affine=False), "mixes the examples"),
    "batchnorm_no_affine_no_stats": (lambda: torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                                     "mixes the examples"),
    "instancenorm_running_stats": (lambda: torch.nn.InstanceNorm2d(4, track_running_stats=True),
                                   "state outside the DP mechanism"),
    "layernorm": (lambda: torch.nn.LayerNorm([4, 6, 6]), "no per-example gradient rule"),
    "grouped_conv": (lambda: torch.nn.Conv2d(4, 4, 3, groups=2), "no per-example gradient rule"),
    "same_padding_conv": (lambda: torch.nn.Conv2d(4, 4, 3, padding="same"), "no per-example gradient rule"),
    "reflect_conv": (lambda: torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                     "no per-example gradient rule"),
    "conv_transpose": (lambda: torch.nn.ConvTranspose2d(4, 4, 2), "no per-example gradient rule"),
    "raw_parameter": (_RawScale, "no per-example gradient rule"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layer", sorted(REFUSED_LAYERS))
def test_every_engine_refuses_coupling_stateful_and_unsupported_layers(layer, engine):
    make, words = REFUSED_LAYERS[layer]
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), make())
    with pytest.raises(ValueError, match=words):
        make_per_example_engine(net, noise_multiplicity=2, engine=engine)


def test_the_refused_norm_layers_really_couple_examples_or_keep_data_state():
    """Independent evidence behind the refusals: in training mode a BatchNorm without parameters makes one
    example's output depend on another example, and InstanceNorm's running statistics move with the data;
    GroupNorm (allowed) does neither."""
    x = torch.randn(2, 4, 6, 6)
    x2 = x.clone()
    x2[1] += 3.0  # change example 1 only
    bn = torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False).train()
    assert not torch.allclose(bn(x)[0], bn(x2)[0])
    gn = torch.nn.GroupNorm(2, 4).train()
    assert torch.allclose(gn(x)[0], gn(x2)[0])
    inorm = torch.nn.InstanceNorm2d(4, track_running_stats=True).train()
    before = inorm.running_mean.clone()
    inorm(x + 1.0)
    assert not torch.equal(inorm.running_mean, before)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), gn)
    for engine in ENGINES:
        make_per_example_engine(net, noise_multiplicity=2, engine=engine).cleanup()
