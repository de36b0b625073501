"""Tests of the DDPM++ U-Net: size, conditioning, and Opacus compatibility."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from dpdm.nets import DDPMppUNet
from dpdm.nets.layers import ResBlock

# Exact count of the paper's MNIST config; the paper quotes "1.75M".
PAPER_PARAMS = 1_754_401
# Opacus' full backward hooks warn when the input image does not require grad;
# that is expected (we only want parameter gradients).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

SMALL = dict(img_resolution=8, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))


def small_net(num_classes: int = 3, dropout: float = 0.0, seed: int = 0) -> DDPMppUNet:
    """Small float64 net with every weight random, so no gradient is trivially zero."""
    torch.manual_seed(seed)
    net = DDPMppUNet(**SMALL, num_classes=num_classes, dropout=dropout).double()
    net.reset_parameters(zero_init=False)
    return net


def batch(n: int, num_classes: int, seed: int = 1, res: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, res, res, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes + 1, (n,), generator=gen) if num_classes else None
    target = torch.randn(n, 1, res, res, generator=gen, dtype=torch.float64)
    return x, noise, labels, target


def test_paper_config_parameter_count_and_shape():
    net = DDPMppUNet()
    count = sum(p.numel() for p in net.parameters())
    assert count == PAPER_PARAMS
    assert abs(count - 1.75e6) / 1.75e6 < 0.03
    x = torch.randn(2, 1, 28, 28)
    out = net(x, torch.randn(2), torch.tensor([3, net.null_label]))
    assert out.shape == x.shape
    # Zero-initialised output conv: the untrained net predicts exactly zero.
    assert torch.count_nonzero(out) == 0


def test_paper_config_attends_only_at_7x7():
    net = DDPMppUNet()
    seen = []
    for blk in net.modules():
        if isinstance(blk, ResBlock) and blk.attn is not None:
            blk.attn.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    net(torch.randn(1, 1, 28, 28), torch.zeros(1), None)
    # Encoder: 2 blocks at 7x7, middle: 1, decoder: last block of the 7x7 level.
    assert seen == [7, 7, 7, 7]


@pytest.mark.parametrize("num_classes", [0, 3])
def test_output_shape(num_classes):
    net = small_net(num_classes)
    x, noise, labels, _ = batch(5, num_classes)
    assert net(x, noise, labels).shape == (5, 1, 8, 8)


def test_out_channels_differ_from_in_channels():
    net = DDPMppUNet(**SMALL, in_channels=3, out_channels=2, num_classes=0)
    assert net(torch.randn(2, 3, 8, 8), torch.randn(2)).shape == (2, 2, 8, 8)


def test_none_labels_equal_null_labels():
    net = small_net(num_classes=3).eval()
    assert net.null_label == 3
    x, noise, _, _ = batch(4, 3)
    null = torch.full((4,), net.null_label, dtype=torch.long)
    torch.testing.assert_close(net(x, noise, None), net(x, noise, null), rtol=0, atol=0)


def test_labels_change_output():
    net = small_net(num_classes=3).eval()
    x, noise, _, _ = batch(1, 3)
    outs = [net(x, noise, torch.tensor([c])) for c in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(outs[a], outs[b])


def test_unconditional_net_has_no_label_embedding_and_rejects_labels():
    net = small_net(num_classes=0)
    assert not any(isinstance(m, torch.nn.Embedding) for m in net.modules())
    x, noise, _, _ = batch(2, 0)
    with pytest.raises(ValueError):
        net(x, noise, torch.zeros(2, dtype=torch.long))


def test_odd_resolution_rejected():
    with pytest.raises(ValueError):
        DDPMppUNet(img_resolution=14, channel_mult=(1, 2, 2))  # 14 -> 7 -> 3.5


@pytest.mark.parametrize("num_classes", [0, 3])
def test_module_validator_strict(num_classes):
    ModuleValidator.validate(small_net(num_classes), strict=True)
    ModuleValidator.validate(DDPMppUNet(), strict=True)


def test_only_opacus_friendly_parametric_leaves():
    allowed = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.Embedding)
    for module in DDPMppUNet().modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, allowed), type(module)


def test_no_module_called_twice_per_forward():
    net = small_net(num_classes=3)
    calls = Counter()
    for name, module in net.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_hook(lambda m, i, o, name=name: calls.update([name]))
    x, noise, labels, _ = batch(2, 3)
    net(x, noise, labels)
    params = {n for n, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert set(calls) == params
    assert set(calls.values()) == {1}


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_opacus_per_sample_grads_match_microbatches(num_classes):
    net = small_net(num_classes).train()
    reference = copy.deepcopy(net)
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    x, noise, labels, target = batch(4, num_classes)
    per_sample_loss(gsm(x, noise, labels), target).sum().backward()

    for i in range(4):
        reference.zero_grad(set_to_none=True)
        lab = None if labels is None else labels[i : i + 1]
        out = reference(x[i : i + 1], noise[i : i + 1], lab)
        per_sample_loss(out, target[i : i + 1]).sum().backward()
        for (name, p), ref in zip(net.named_parameters(), reference.parameters(), strict=True):
            assert ref.grad is not None and ref.grad.abs().max() > 0, name
            err = (p.grad_sample[i] - ref.grad).abs().max().item()
            assert err < 1e-10, (name, err)


def test_grad_sample_module_full_pass_with_dropout():
    # Catches in-place ops on hooked outputs: autograd or the hooks would raise.
    net = small_net(num_classes=3, dropout=0.1).train()
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    x, noise, labels, target = batch(6, 3)
    per_sample_loss(gsm(x, noise, labels), target).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (6, *p.shape), name
        assert torch.isfinite(p.grad_sample).all(), name


def test_grad_sample_module_empty_batch():
    # Poisson sampling can produce empty batches; they must flow through.
    net = small_net(num_classes=3).train()
    gsm = GradSampleModule(net, batch_first=True, loss_reduction="sum")
    x, noise, labels, target = batch(0, 3)
    out = gsm(x, noise, labels)
    assert out.shape == (0, 1, 8, 8)
    per_sample_loss(out, target).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (0, *p.shape), name


def test_patch_size_runs_the_unet_at_a_coarser_grid_and_keeps_the_image_shape():
    torch.manual_seed(0)
    net = DDPMppUNet(img_resolution=28, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                     attn_resolutions=(7,), patch_size=2).double()
    net.reset_parameters(zero_init=False)
    assert net.grid_resolution == 14 and net.input_conv.in_channels == 4 and net.out_conv.out_channels == 4
    assert any(b.attn is not None for b in net.dec)  # attention at the 7x7 grid level
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    out = net(x, torch.zeros(3, dtype=torch.float64), torch.tensor([0, 1, 2]))
    assert out.shape == x.shape
    # Pixel (2i+a, 2j+b) of the output comes from channel 2a+b of the grid cell (i, j): changing one input
    # pixel changes outputs only through the network, never by a mis-ordered reshape (zero-init check).
    net0 = DDPMppUNet(img_resolution=28, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                      attn_resolutions=(), patch_size=2).double()
    with torch.no_grad():
        net0.out_conv.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    y = net0(x, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(y[0, 0, :2, :2], torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))


def test_unpatch_conv_mixes_neighbouring_blocks_at_full_resolution_and_trains_from_zero_init():
    torch.manual_seed(0)
    kw = dict(img_resolution=28, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    sigma = torch.zeros(2, dtype=torch.float64)
    plain, mixed = DDPMppUNet(**kw, patch_size=2).double(), DDPMppUNet(**kw, patch_size=2, unpatch_channels=3).double()
    assert mixed.out_conv.out_channels == 3 * 4 and mixed.unpatch_conv.in_channels == 3
    # Reference: the same net ends in 3 shuffled channels and a 3x3 conv written out by hand.
    with torch.no_grad():
        mixed.out_conv.weight.normal_()
    y = mixed(x, sigma)
    h = torch.nn.functional.pixel_shuffle(_last_features(mixed, x, sigma), 2)
    ref = torch.nn.functional.conv2d(h, mixed.unpatch_conv.weight, mixed.unpatch_conv.bias, padding=1)
    assert y.shape == x.shape and torch.allclose(y, ref)
    # Without it a constant per-position bias tiles the image every 2 pixels: nothing at 28x28 sees it.
    with torch.no_grad():
        plain.out_conv.bias.copy_(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    tiled = plain(x, sigma)[0, 0]
    assert torch.equal(tiled[4:6, 4:6], tiled[10:12, 10:12]) and tiled[4, 4] != tiled[4, 5]
    # Zero-init: the untrained net outputs the unpatch conv's bias alone, and one backward reaches both ends.
    fresh = DDPMppUNet(**kw, patch_size=2, unpatch_channels=3).double()
    out = fresh(x, sigma)
    assert torch.allclose(out, fresh.unpatch_conv.bias.view(1, -1, 1, 1).expand_as(out))
    ((out - x) ** 2).sum().backward()
    assert fresh.out_conv.weight.grad.abs().max() > 0 and fresh.unpatch_conv.weight.grad.abs().max() == 0
    assert fresh.unpatch_conv.bias.grad.abs().max() > 0


def test_full_res_blocks_run_between_the_shuffle_and_the_unpatch_conv_and_start_as_their_skip_path():
    torch.manual_seed(0)
    kw = dict(img_resolution=28, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
              patch_size=2, unpatch_channels=4, dropout=0.0)
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    sigma = torch.tensor([0.3, -1.0], dtype=torch.float64)
    labels = torch.tensor([3, 7])
    net = DDPMppUNet(**kw, full_res_blocks=2).double()
    assert len(net.full_res) == 2 and all(b.conv0.in_channels == 4 for b in net.full_res)
    # Fresh (zero-init), every block is its skip path (scaled by 1/sqrt(2), as every DDPM++ block): the
    # output is the linear ending's on the shuffled features.
    with torch.no_grad():
        net.out_conv.weight.normal_()
    h = torch.nn.functional.pixel_shuffle(_last_features(net, x, sigma, labels), 2)
    linear = torch.nn.functional.conv2d(h / 2, net.unpatch_conv.weight, net.unpatch_conv.bias, padding=1)
    y = net(x, sigma, labels)
    assert torch.allclose(y, linear)
    # Trained (nonzero residual branches), the output is the blocks applied in turn at 28x28, written out
    # with each block's own layers and the embedding of the noise level and label.
    with torch.no_grad():
        for blk in net.full_res:
            blk.conv1.weight.normal_(std=0.3)
    emb = net.embed(sigma, labels, x.dtype)
    ref = h
    for blk in net.full_res:
        r = torch.nn.functional.conv2d(torch.nn.functional.silu(blk.norm0(ref)), blk.conv0.weight, blk.conv0.bias,
                                       padding=1) + blk.affine(emb)[:, :, None, None]
        r = torch.nn.functional.conv2d(torch.nn.functional.silu(blk.norm1(r)), blk.conv1.weight, blk.conv1.bias,
                                       padding=1)
        ref = (ref + r) / 2**0.5
    ref = torch.nn.functional.conv2d(ref, net.unpatch_conv.weight, net.unpatch_conv.bias, padding=1)
    y = net(x, sigma, labels)
    assert torch.allclose(y, ref) and not torch.allclose(y, linear)
    # One backward from zero init reaches the blocks' last convs and the patch net's out_conv.
    fresh = DDPMppUNet(**kw, full_res_blocks=1).double()
    ((fresh(x, sigma, labels) - x) ** 2).sum().backward()
    assert fresh.full_res[0].conv1.weight.grad.abs().max() > 0 and fresh.out_conv.weight.grad.abs().max() > 0


def _last_features(net: DDPMppUNet, x, sigma, labels=None):
    """out_conv's output, through a forward hook (the reference above recomputes what follows it)."""
    seen = {}
    handle = net.out_conv.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        net(x, sigma, labels)
    finally:
        handle.remove()
    return seen["out"]


@pytest.mark.parametrize("bad", [dict(patch_size=0), dict(patch_size=3), dict(patch_size=4, channel_mult=(1, 2, 2)),
                                 dict(unpatch_channels=4), dict(patch_size=2, unpatch_channels=-1),
                                 dict(patch_size=2, full_res_blocks=1),
                                 dict(patch_size=2, unpatch_channels=4, full_res_blocks=-1)])
def test_bad_patch_size_is_refused(bad):
    with pytest.raises(ValueError, match="patch_size|divisible|full_res_blocks"):
        DDPMppUNet(img_resolution=28, **bad)
