"""The DPDM training loss with noise multiplicity (Dockhorn et al. 2023, Sec. 3.2, Eq. 7).

Each example x_i is noised at K independent levels σ_ik; its loss is the mean of the K weighted
denoising errors. DP-SGD then clips the gradient of that per-example loss, so K improves the gradient's
signal-to-noise ratio at no privacy cost: one example still contributes one clipped gradient.

The randomness (σ, noise, dropped labels) is drawn in `draw_training_noise` and passed in explicitly, so
the loss itself is a deterministic function that tests can recompute example by example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpdm.diffusion.noise_levels import NoiseLevels
from dpdm.diffusion.preconditioning import Denoiser


@dataclass
class TrainingNoise:
    """Everything random about one training step, for B examples at K noise levels each."""

    sigma: Tensor  # (B, K) noise levels
    noise: Tensor  # (B, K, C, H, W) standard normal
    class_labels: Tensor | None  # (B, K) labels fed to the network; null_label where dropped


def check_label_dropout(label_dropout: float) -> None:
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"loss.label_dropout={label_dropout} must be in [0, 1]: the fraction of noised copies "
                         "trained without their label (0.1, the paper's, also trains the unconditional model "
                         "that guidance needs; 0 trains only the conditional one)")


def draw_training_noise(x: Tensor, y: Tensor | None, *, noise_multiplicity: int,
                        noise_levels: NoiseLevels, label_dropout: float,
                        null_label: int | None, generator: torch.Generator | None = None
                        ) -> TrainingNoise:
    B, K = x.shape[0], noise_multiplicity
    kw = dict(generator=generator, device=x.device)
    sigma = noise_levels.sample((B, K), dtype=x.dtype, **kw)
    noise = torch.randn((B, K, *x.shape[1:]), dtype=x.dtype, **kw)
    labels = None
    if y is not None and null_label is not None:
        labels = y[:, None].expand(B, K).clone()
        # Dropping the label (per noised copy) trains the unconditional model used by guidance.
        dropped = torch.rand((B, K), dtype=x.dtype, **kw) < label_dropout
        labels[dropped] = null_label
    return TrainingNoise(sigma=sigma, noise=noise, class_labels=labels)


def denoising_loss_per_example(denoiser: Denoiser, x: Tensor, tn: TrainingNoise, *,
                               pixel_reduction: str = "sum") -> Tensor:
    """Per-example loss ℓ_i = (1/K) Σ_k λ(σ_ik) ‖D(x_i + σ_ik n_ik; σ_ik, y_ik) − x_i‖².

    Returns a (B,) vector. The network sees all B·K noised copies in one forward, ordered example-major
    (row i·K + k), which is the layout the noise-multiplicity grad-sample hooks fold back to B examples.
    """
    B, K = tn.sigma.shape
    x_rep = x.repeat_interleave(K, dim=0)
    sigma = tn.sigma.reshape(B * K)
    x_noisy = x_rep + sigma.view(-1, *([1] * (x.ndim - 1))) * tn.noise.reshape(B * K, *x.shape[1:])
    labels = None if tn.class_labels is None else tn.class_labels.reshape(B * K)
    D = denoiser(x_noisy, sigma, labels)
    err = (D - x_rep).square().flatten(1)
    err = err.sum(1) if pixel_reduction == "sum" else err.mean(1)
    weighted = denoiser.precond.loss_weight(sigma) * err
    return weighted.view(B, K).mean(1)
