"""Samplers for the probability-flow ODE / reverse SDE of a preconditioned denoiser D(x; σ, y).

All samplers share one signature, `sampler(denoiser, latents, sigmas, *, class_labels, guidance, ...)`,
take a ready time grid (`karras_sigmas`), never build graphs, and run their state in float64 as EDM does.
Per-sample seeds (`latents_from_seeds`) make a sample independent of the batch it was drawn in.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor


def karras_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, dtype=torch.float64, device=None) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then σ_N = 0 (EDM, Eq. 5)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=dtype, device=device)])


def latents_from_seeds(seeds: Sequence[int], shape: Sequence[int], *, device=None) -> Tensor:
    """One standard-normal latent per seed, each from its own generator (batch-size independent)."""
    out = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        out.append(torch.randn(tuple(shape), generator=g, dtype=torch.float64))
    return torch.stack(out).to(device)


def guided(denoiser: Callable, x: Tensor, sigma: Tensor, class_labels: Tensor | None,
           guidance: float, null_label: int | None) -> Tensor:
    """Classifier-free guidance: (1 + w)·D(x, y) − w·D(x, ∅). w = 0 is the plain conditional D."""
    if guidance == 0 or class_labels is None:
        return denoiser(x, sigma, class_labels)
    null = torch.full_like(class_labels, null_label)
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null]))
    d_cond, d_uncond = both.chunk(2)
    return (1 + guidance) * d_cond - guidance * d_uncond


@torch.no_grad()
def edm_heun_sampler(denoiser, latents: Tensor, sigmas: Tensor, *,
                     class_labels: Tensor | None = None, guidance: float = 0.0,
                     S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                     S_noise: float = 1.0, noise_seeds: Sequence[int] | None = None,
                     net_dtype=torch.float32) -> Tensor:
    """EDM Algorithm 2: Heun steps on dx/dσ = (x − D(x; σ))/σ, with optional churn.

    With S_churn = 0 this is the deterministic 2nd-order sampler (EDM Alg. 1). `latents` are unit-variance
    and are scaled by σ_0 here. Churn noise comes from per-sample generators seeded by `noise_seeds`.
    """
    null_label = getattr(denoiser, "null_label", None)
    num_steps = len(sigmas) - 1
    gens = None
    if S_churn > 0:
        seeds = noise_seeds if noise_seeds is not None else range(len(latents))
        gens = [torch.Generator(device="cpu").manual_seed(10_000_019 + int(s)) for s in seeds]

    def D(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=net_dtype)
        return guided(denoiser, x.to(net_dtype), s, class_labels, guidance, null_label).to(torch.float64)

    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        # Churn: raise the noise level to ŝ = s + γ s, adding fresh noise of variance ŝ² − s².
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
        s_hat = s_cur + gamma * s_cur
        if gamma > 0:
            eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
            x = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * eps.to(x.device)
        d_cur = (x - D(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d_cur
        if s_next > 0:  # 2nd-order correction, skipped on the final step to σ = 0
            d_next = (x_next - D(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x
