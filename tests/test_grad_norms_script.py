"""scripts/study/grad_norms.py: the per-example gradient norms it reports are those of per-example
autograd (one backward per example, K-averaged loss), the independent reference."""
import torch

from dpdm.diffusion.loss import denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.noise_levels import LogNormalSigma
from tests.helpers import load_script, tiny_denoiser


def _script():
    return load_script("scripts/study/grad_norms.py", "grad_norms")


def test_per_example_norms_match_one_backward_per_example(monkeypatch):
    script = _script()
    monkeypatch.setattr(script, "CHUNK", 3)  # two chunks, the second short
    den = tiny_denoiser(dtype=torch.float64, attention=False)
    K, n = 2, 5
    x = torch.rand(n, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 3, (n,))
    gen = torch.Generator().manual_seed(3)
    drawn = {}

    def draw(start, xc):
        tn = draw_training_noise(xc, y[start:start + len(xc)], noise_multiplicity=K,
                                 noise_levels=LogNormalSigma(), label_dropout=0.5,
                                 null_label=den.null_label, generator=gen)
        drawn[start] = tn
        return tn

    got = script.per_example_norms(den, x, draw, K=K, pixel_reduction="sum")

    params = [p for p in den.net.parameters() if p.requires_grad]
    expected = []
    for start, tn in sorted(drawn.items()):
        for i in range(tn.sigma.shape[0]):
            one = type(tn)(sigma=tn.sigma[i:i + 1], noise=tn.noise[i:i + 1],
                           class_labels=None if tn.class_labels is None else tn.class_labels[i:i + 1])
            loss = denoising_loss_per_example(den, x[start + i:start + i + 1], one, pixel_reduction="sum")
            grads = torch.autograd.grad(loss.sum(), params)
            expected.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    expected = torch.stack(expected)
    assert got.shape == (n,)
    assert torch.allclose(got, expected, rtol=1e-8), (got, expected)
    # Different examples have different norms: a constant would not pass the comparison above by chance.
    assert expected.std() > 0
