"""Per-example gradients of every layer type the networks use, with and without noise multiplicity.

For each layer (or block) under test the network sees B·K rows (example-major: row i·K + k) and a
per-row loss ℓ_ik; the per-example loss is ℓ_i = mean_k ℓ_ik and the batch loss mean_i ℓ_i — exactly
the reduction of `denoising_loss_per_example` + `training_step`. The per-example gradients Opacus stores
through every engine offered (`dpdm.privacy.engine.ENGINES`) must equal a micro-batch reference: plain
autograd of ℓ_i on example i's K rows alone. float64, tolerance 1e-10. Shapes are drawn by hypothesis.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpdm.nets.classifiers import CNN, MLP, LogReg
from dpdm.nets.layers import ResBlock, SelfAttention2d, group_norm
from dpdm.privacy.engine import ENGINES, make_per_example_engine, validate_for_dp

TOL = 1e-10
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
Ks = pytest.mark.parametrize("K", [1, 3])


def _per_row_loss(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A nonlinear per-row loss with fixed random weights (so no gradient is trivially symmetric)."""
    out = out.reshape(out.shape[0], -1)
    return (out * w).sum(1) + 0.25 * out.square().sum(1)


def check_per_example_grads(module: nn.Module, inputs: tuple, *, B: int, K: int, seed: int = 0):
    """Compare every engine's per-example gradients with per-example micro-batch autograd."""
    module = module.double().train()
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        out_shape = module(*inputs).shape
    assert out_shape[0] == B * K
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((B * K, int(torch.tensor(out_shape[1:]).prod())), generator=g, dtype=torch.float64)

    ref = []
    for i in range(B):
        rows = slice(i * K, (i + 1) * K)
        loss_i = _per_row_loss(module(*(x[rows] for x in inputs)), w[rows]).mean()
        ref.append(torch.autograd.grad(loss_i, params, allow_unused=True))

    for engine in ENGINES:  # every engine offered must be exact
        hooks = make_per_example_engine(module, noise_multiplicity=K, engine=engine)
        try:
            with hooks.capture():
                out = module(*inputs)
            hooks.backward(_per_row_loss(out, w).reshape(B, K).mean(1))
            worst, biggest = 0.0, 0.0
            for j, p in enumerate(params):
                assert p.grad_sample.shape == (B, *p.shape), (engine, j, p.grad_sample.shape)
                for i in range(B):
                    r = ref[i][j] if ref[i][j] is not None else torch.zeros_like(p)
                    worst = max(worst, (p.grad_sample[i] - r).abs().max().item())
                    biggest = max(biggest, r.abs().max().item())
            assert worst < TOL, (engine, worst)
            assert biggest > 1e-3  # the reference is not trivially zero
        finally:
            hooks.cleanup()
            for p in params:
                p.grad_sample = None
                p.grad = None


def _x(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- single layers ----------------------------------------------------------------------------------

@Ks
@SETTINGS
@given(B=st.integers(1, 3), cin=st.integers(1, 3), cout=st.integers(1, 4), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), padding=st.integers(0, 1), hw=st.integers(3, 6), bias=st.booleans())
def test_conv2d(K, B, cin, cout, k, stride, padding, hw, bias):
    conv = nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=padding, bias=bias)
    check_per_example_grads(conv, (_x(B * K, cin, hw, hw),), B=B, K=K)


@Ks
@SETTINGS
@given(B=st.integers(1, 3), groups_channels=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 6)]),
       hw=st.integers(1, 4))
def test_group_norm(K, B, groups_channels, hw):
    groups, channels = groups_channels
    gn = nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():  # non-trivial affine parameters
        gn.weight.normal_(generator=torch.Generator().manual_seed(3))
        gn.bias.normal_(generator=torch.Generator().manual_seed(4))
    check_per_example_grads(gn, (_x(B * K, channels, hw, hw),), B=B, K=K)


def test_group_norm_helper_is_what_the_net_uses():
    assert isinstance(group_norm(8), nn.GroupNorm) and group_norm(8).num_groups == 2


@Ks
@SETTINGS
@given(B=st.integers(1, 3), fin=st.integers(1, 5), fout=st.integers(1, 5),
       extra=st.sampled_from([(), (1,), (3,), (2, 3)]), bias=st.booleans())
def test_linear_2d_and_3d_inputs(K, B, fin, fout, extra, bias):
    lin = nn.Linear(fin, fout, bias=bias)
    check_per_example_grads(lin, (_x(B * K, *extra, fin),), B=B, K=K)


class _EmbeddingThenNonlinear(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.emb = nn.Embedding(n, d)

    def forward(self, idx):
        return torch.tanh(self.emb(idx))


@Ks
@SETTINGS
@given(B=st.integers(1, 4), n=st.integers(1, 6), d=st.integers(1, 4), length=st.sampled_from([0, 1, 3]),
       seed=st.integers(0, 100))
def test_embedding(K, B, n, d, length, seed):
    """Indices of shape (rows,) as the U-Net's class labels, and (rows, L) with repeated indices."""
    shape = (B * K,) if length == 0 else (B * K, length)
    idx = torch.randint(0, n, shape, generator=torch.Generator().manual_seed(seed))
    check_per_example_grads(_EmbeddingThenNonlinear(n, d), (idx,), B=B, K=K)


# --- the U-Net's blocks -----------------------------------------------------------------------------

@Ks
@SETTINGS
@given(B=st.integers(1, 3), channels_heads=st.sampled_from([(4, 1), (8, 1), (8, 2), (8, 4)]),
       hw=st.sampled_from([1, 2, 4]))
def test_attention_block(K, B, channels_heads, hw):
    c, heads = channels_heads
    check_per_example_grads(SelfAttention2d(c, heads), (_x(B * K, c, hw, hw),), B=B, K=K)


class _ResBlockWithEmbedding(nn.Module):
    """ResBlock fed its per-row embedding, as the U-Net does (emb: rows × emb_channels)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, emb):
        return self.block(x, emb)


@Ks
@SETTINGS
@given(B=st.integers(1, 2), mode=st.sampled_from(["none", "down", "up"]),
       cin_cout=st.sampled_from([(4, 4), (4, 8), (8, 4)]), attention=st.booleans(),
       hw=st.sampled_from([2, 4]))
def test_resblocks_with_resampling_and_attention(K, B, mode, cin_cout, attention, hw):
    cin, cout = cin_cout
    block = ResBlock(cin, cout, emb_channels=6, resample_mode=mode, attention=attention, dropout=0.0)
    check_per_example_grads(_ResBlockWithEmbedding(block), (_x(B * K, cin, hw, hw), _x(B * K, 6, seed=2)),
                            B=B, K=K)


# --- downstream classifiers ---------------------------------------------------------------------------

@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("make", [LogReg, MLP, lambda: CNN(dropout=0.0)], ids=["logreg", "mlp", "cnn"])
def test_downstream_classifiers(make, K):
    """Opacus accepts them (validator) and their per-example gradients are exact (MaxPool, Flatten, ReLU
    are parameter-free). Dropout is set to 0 so that the reference sees the same function."""
    torch.manual_seed(0)
    net = make()
    validate_for_dp(net)
    B = 2
    check_per_example_grads(net, (_x(B * K, 1, 28, 28).clamp(-1, 1),), B=B, K=K)


# --- the grouped convolution's weight stand-in ----------------------------------------------------------

def test_grouped_conv_weight_gradients_ignore_the_stand_in_weight_and_reuse_one_buffer():
    """The grouped kernel is given one shared buffer in place of B copies of each layer's weight: its
    values must not reach the gradients (NaN in it changes nothing), and after the first backward no
    layer allocates a new one (the buffer fits the largest layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.SiLU(), nn.Conv2d(5, 3, 3, padding=1)).double()
    B, K = 3, 2
    x = _x(B * K, 2, 5, 5)
    engine = make_per_example_engine(net, noise_multiplicity=K, engine="fold")  # grouped: its default

    def grad_samples():
        with engine.capture():
            out = net(x)
        engine.backward(out.square().flatten(1).sum(1).reshape(B, K).mean(1))
        return [p.grad_sample.clone() for p in net.parameters()]

    try:
        first = grad_samples()
        stand_in = engine._weight_stand_in._buf
        assert stand_in.numel() == B * max(5 * 2, 3 * 5) * 9  # B·Cout·Cin·k² of the larger layer
        stand_in.fill_(float("nan"))
        second = grad_samples()
        assert engine._weight_stand_in._buf.data_ptr() == stand_in.data_ptr()
        for a, b in zip(first, second, strict=True):
            assert torch.isfinite(b).all() and torch.equal(a, b)
    finally:
        engine.cleanup()
