"""Distributions of training noise levels σ (the p_train(σ) of EDM, Karras et al. 2022, Sec. 5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogNormalSigma:
    """ln σ ~ N(P_mean, P_std²); EDM's defaults P_mean = -1.2, P_std = 1.2 are DPDM's too."""

    P_mean: float = -1.2
    P_std: float = 1.2

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               device=None, dtype=torch.float32) -> Tensor:
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return (self.P_mean + self.P_std * z).exp()
