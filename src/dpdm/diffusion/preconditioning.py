"""Denoiser preconditionings: D(x; σ, y) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ), y).

Each preconditioning is a handful of scalar functions of the noise level σ, written as in
Karras et al. 2022 ("EDM"), Table 1, which DPDM (Dockhorn et al. 2023, Sec. 3 and App. C) builds on.
They import neither Lightning nor Opacus, so they can be tested on their own in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class EDMPreconditioning:
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours").

    sigma_data is the standard deviation of the data; images scaled to [-1, 1] with roughly uniform
    pixels give sqrt(1/3), the value the DPDM paper uses.
    """

    sigma_data: float = math.sqrt(1.0 / 3.0)

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4.0

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = 1 / c_out(σ)²: makes the effective training target of F unit-variance."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class Denoiser(nn.Module):
    """Wraps a raw network F into the preconditioned denoiser D(x; σ, y).

    The wrapper owns no parameters and calls the network exactly once per forward, which keeps
    Opacus' per-sample gradient hooks (attached to the network's layers) exact.
    """

    def __init__(self, net: nn.Module, preconditioning: EDMPreconditioning):
        super().__init__()
        self.net = net
        self.precond = preconditioning

    @property
    def null_label(self) -> int | None:
        return getattr(self.net, "null_label", None)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        p = self.precond
        F_x = self.net(p.c_in(sigma) * x, p.c_noise(sigma).flatten(), class_labels)
        return p.c_skip(sigma) * x + p.c_out(sigma) * F_x.to(x.dtype)
