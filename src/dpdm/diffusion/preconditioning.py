"""Denoiser preconditionings: D(x; σ, y) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), y).

Each preconditioning is a handful of scalar functions of the noise level σ, written as in
Karras et al. 2022 ("EDM"), Table 1, which DPDM (Dockhorn et al. 2023, Sec. 3 and App. C) builds on.
All four act on the same σ-parameterized input x = y + σ·n, so the loss, the DP machinery and every
sampler are shared. The matching loss weight is λ(σ) = 1 / c_out(σ)² in every case: the loss
λ‖D − y‖² then equals ‖F − F_target‖² with F_target = (y − c_skip·x) / c_out ("effective target").

They import neither Lightning nor Opacus, so they can be tested on their own in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from dpdm.diffusion.schedules import cosine_sigma_inv, vp_sigma, vp_sigma_inv


class Preconditioning(Protocol):
    """The interface of every preconditioning; σ is a tensor broadcastable against x."""

    def c_skip(self, sigma: Tensor) -> Tensor: ...
    def c_out(self, sigma: Tensor) -> Tensor: ...
    def c_in(self, sigma: Tensor) -> Tensor: ...
    def c_noise(self, sigma: Tensor) -> Tensor: ...
    def loss_weight(self, sigma: Tensor) -> Tensor: ...

    @property
    def sigma_domain(self) -> tuple[float, float]:
        """The σ interval on which c_noise is defined (training and sampling must stay inside)."""
        ...


@dataclass(frozen=True)
class EDMPreconditioning:
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours").

    sigma_data is the standard deviation of the data; images scaled to [-1, 1] with roughly uniform
    pixels give sqrt(1/3), the value the DPDM paper uses.
    """

    sigma_data: float = math.sqrt(1.0 / 3.0)

    def __post_init__(self):
        if not self.sigma_data > 0:
            raise ValueError(f"denoiser.sigma_data must be > 0, got {self.sigma_data}")

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4.0

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_data²) / (σ·σ_data)² = 1 / c_out(σ)²: unit-variance effective target."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    @property
    def sigma_domain(self) -> tuple[float, float]:
        return (0.0, math.inf)


@dataclass(frozen=True)
class VPPreconditioning:
    """Variance preserving (Song et al. 2021; EDM Table 1, "VP"): F predicts the noise n (ε-prediction).

    c_in·x is the VP process state s(t)·x; c_noise = (M − 1)·t feeds the network DDPM's discrete time.
    t, and so c_noise, is only defined on [0, 1]: σ may not exceed σ(1) ≈ 152 (β_d = 19.9, β_min = 0.1).
    """

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000

    def __post_init__(self):
        if not (self.beta_d > 0 and self.beta_min >= 0 and self.M >= 2):
            raise ValueError(f"VP preconditioning needs beta_d > 0, beta_min >= 0 and M >= 2, got "
                             f"beta_d={self.beta_d}, beta_min={self.beta_min}, M={self.M}")

    def c_skip(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def c_out(self, sigma: Tensor) -> Tensor:
        return -sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + 1).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (self.M - 1) * vp_sigma_inv(sigma, beta_d=self.beta_d, beta_min=self.beta_min)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = 1/σ²: the DDPM "simple" loss ‖F − n‖²."""
        return 1.0 / sigma**2

    @property
    def sigma_domain(self) -> tuple[float, float]:
        t1 = torch.tensor(1.0, dtype=torch.float64)
        return (0.0, float(vp_sigma(t1, beta_d=self.beta_d, beta_min=self.beta_min)))


@dataclass(frozen=True)
class VEPreconditioning:
    """Variance exploding (Song et al. 2021; EDM Table 1, "VE"): F predicts −n, scaled by σ."""

    def c_skip(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (0.5 * sigma).log()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = 1/σ²."""
        return 1.0 / sigma**2

    @property
    def sigma_domain(self) -> tuple[float, float]:
        return (0.0, math.inf)


@dataclass(frozen=True)
class VPredictionPreconditioning:
    """v-prediction (Salimans & Ho 2022), the DPDM paper's choice at ε = 0.2.

    With α = 1/sqrt(1+σ²) and s = σ·α the VP state is z = α·x = α·y + s·n and the network predicts
    v = α·n − s·y; ŷ = α·z − s·v gives c_in = α, c_skip = α² = 1/(1+σ²), c_out = −s = −σ/sqrt(1+σ²).
    This is EDM's preconditioning at σ_data = 1 with the sign of F flipped. λ(σ) = 1/c_out² = 1 + 1/σ²
    is Salimans & Ho's "SNR + 1" weighting. c_noise is the cosine-schedule time t(σ) = (2/π)·arctan σ.
    """

    def c_skip(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + 1)

    def c_out(self, sigma: Tensor) -> Tensor:
        return -sigma / (sigma**2 + 1).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + 1).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return cosine_sigma_inv(sigma)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + 1)/σ² = 1 + SNR(σ)."""
        return (sigma**2 + 1) / sigma**2

    @property
    def sigma_domain(self) -> tuple[float, float]:
        return (0.0, math.inf)


class Denoiser(nn.Module):
    """Wraps a raw network F into the preconditioned denoiser D(x; σ, y).

    The wrapper owns no parameters and calls the network exactly once per forward, which keeps
    Opacus' per-sample gradient hooks (attached to the network's layers) exact.
    """

    def __init__(self, net: nn.Module, preconditioning: Preconditioning):
        super().__init__()
        self.net = net
        self.precond = preconditioning

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this denoiser draws."""
        return (self.net.in_channels, self.net.img_resolution, self.net.img_resolution)

    @property
    def null_label(self) -> int | None:
        """The "no label" token of a class-conditional net; None for an unconditional one."""
        if getattr(self.net, "num_classes", None) == 0:
            return None
        return getattr(self.net, "null_label", None)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        p = self.precond
        F_x = self.net(p.c_in(sigma) * x, p.c_noise(sigma).flatten(), class_labels)
        return p.c_skip(sigma) * x + p.c_out(sigma) * F_x.to(x.dtype)
