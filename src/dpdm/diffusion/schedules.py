"""Noise schedules σ(t) and their inverses, shared by preconditionings and noise-level distributions.

Everything in dpdm is parameterized by the noise level σ of x_noisy = y + σ·n (EDM, Karras et al. 2022,
Sec. 2). The VP SDE and the cosine schedule define a "time" t ∈ [0, 1] with σ = σ(t); the networks of those
formulations are conditioned on t, and their training distributions are uniform in t.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def vp_sigma(t: Tensor, *, beta_d: float, beta_min: float) -> Tensor:
    """σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) of the VP SDE (EDM Table 1, "VP")."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: Tensor, *, beta_d: float, beta_min: float) -> Tensor:
    """σ⁻¹(σ) = (sqrt(β_min² + 2β_d ln(σ² + 1)) − β_min) / β_d (EDM Table 1, "VP")."""
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_scale(t: Tensor, *, beta_d: float, beta_min: float) -> Tensor:
    """s(t) = exp(−½∫₀ᵗ β(u) du) with β(u) = β_min + β_d u: the VP process is x_t = s(t)·(y + σ(t)·n)."""
    return torch.exp(-(0.25 * beta_d * t**2 + 0.5 * beta_min * t))


def cosine_sigma(t: Tensor) -> Tensor:
    """σ(t) = tan(πt/2): the cosine schedule α_t = cos(πt/2) (Salimans & Ho 2022) written with σ = s/α."""
    return torch.tan(0.5 * math.pi * t)


def cosine_sigma_inv(sigma: Tensor) -> Tensor:
    """t(σ) = (2/π)·arctan σ, the inverse of `cosine_sigma`."""
    return (2 / math.pi) * torch.atan(sigma)


def logsnr_to_sigma(logsnr: float) -> float:
    """λ = log(α²/s²) = −2 ln σ for a VP process with α = 1/sqrt(1+σ²), s = σ·α."""
    return math.exp(-0.5 * logsnr)
