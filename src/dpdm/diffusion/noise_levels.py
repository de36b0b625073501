"""Distributions of training noise levels σ: the p_train(σ) of EDM (Karras et al. 2022, Sec. 5, Table 1).

Every distribution draws σ directly (noise is added in σ-space, x = y + σ·n), so each pairs with every
preconditioning; `check_compatible` refuses the pairs that leave a preconditioning's σ domain.
Each also has its exact CDF, the reference the tests check the sampler against.

`log_sigma_shift` moves any distribution toward higher noise: ln σ ← ln σ + shift, i.e. the logSNR
λ = −2 ln σ moves by −2·shift ("shifted schedules", Hoogeboom et al. 2023). DPDM (Sec. 5.2) finds that
training on high noise levels matters most at small ε, where the DP noise leaves only coarse
structure learnable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dpdm.diffusion.schedules import cosine_sigma, cosine_sigma_inv, logsnr_to_sigma, vp_sigma, vp_sigma_inv


@dataclass(frozen=True)
class NoiseLevels:
    """Base: `sample` and `cdf` of σ·exp(shift), given `_sample` and `_cdf` of the unshifted σ."""

    # Keyword-only so that subclasses keep their own positional fields (LogNormalSigma(-1.2, 1.2)).
    log_sigma_shift: float = field(default=0.0, kw_only=True)

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               device=None, dtype=torch.float32) -> Tensor:
        sigma = self._sample(shape, generator=generator, device=device, dtype=dtype)
        return sigma * math.exp(self.log_sigma_shift) if self.log_sigma_shift else sigma

    def cdf(self, sigma: Tensor) -> Tensor:
        """P(σ' ≤ σ) for the (shifted) distribution; σ a float64 tensor."""
        return self._cdf(sigma * math.exp(-self.log_sigma_shift))

    def _sample(self, shape, *, generator, device, dtype) -> Tensor:
        raise NotImplementedError

    def _cdf(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def _uniform(self, shape, *, generator, device, dtype) -> Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class LogNormalSigma(NoiseLevels):
    """ln σ ~ N(P_mean, P_std²) (EDM Sec. 5); EDM's defaults P_mean = -1.2, P_std = 1.2 are DPDM's too."""

    P_mean: float = -1.2
    P_std: float = 1.2

    def __post_init__(self):
        if not self.P_std > 0:
            raise ValueError(f"noise_levels.P_std must be > 0, got {self.P_std}")

    def _sample(self, shape, *, generator, device, dtype) -> Tensor:
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return (self.P_mean + self.P_std * z).exp()

    def _cdf(self, sigma: Tensor) -> Tensor:
        return torch.special.ndtr((sigma.log() - self.P_mean) / self.P_std)


@dataclass(frozen=True)
class VPUniformT(NoiseLevels):
    """t ~ U(ε_t, 1), σ = σ_VP(t) (EDM Table 1, "VP" training; Song et al. 2021)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    eps_t: float = 1e-5

    def __post_init__(self):
        if not (0 < self.eps_t < 1 and self.beta_d > 0 and self.beta_min >= 0):
            raise ValueError(f"noise: need 0 < eps_t < 1, beta_d > 0, beta_min >= 0; got eps_t="
                             f"{self.eps_t}, beta_d={self.beta_d}, beta_min={self.beta_min}")

    def _sample(self, shape, *, generator, device, dtype) -> Tensor:
        t = self.eps_t + (1 - self.eps_t) * self._uniform(shape, generator=generator, device=device,
                                                          dtype=dtype)
        return vp_sigma(t, beta_d=self.beta_d, beta_min=self.beta_min)

    def _cdf(self, sigma: Tensor) -> Tensor:
        t = vp_sigma_inv(sigma, beta_d=self.beta_d, beta_min=self.beta_min)
        return ((t - self.eps_t) / (1 - self.eps_t)).clamp(0, 1)


@dataclass(frozen=True)
class VELogUniform(NoiseLevels):
    """ln σ ~ U(ln σ_min, ln σ_max) (EDM Table 1, "VE" training: σ = σ_min·(σ_max/σ_min)^t, t ~ U(0, 1))."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"noise: need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")

    def _sample(self, shape, *, generator, device, dtype) -> Tensor:
        t = self._uniform(shape, generator=generator, device=device, dtype=dtype)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def _cdf(self, sigma: Tensor) -> Tensor:
        return (torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)).clamp(0, 1)


@dataclass(frozen=True)
class LogSNRCosine(NoiseLevels):
    """t uniform, σ = tan(πt/2) (cosine schedule), truncated to logSNR λ ∈ [λ_min, λ_max].

    DPDM's v-prediction setting: λ ∈ [−9, 13], i.e. σ = e^{−λ/2} ∈ [0.0015, 90]. t ranges over
    [t(σ_lo), t(σ_hi)] with t(σ) = (2/π)·arctan σ, so p(λ) ∝ sech(λ/2) there (Salimans & Ho 2022).
    """

    logsnr_min: float = -9.0
    logsnr_max: float = 13.0

    def __post_init__(self):
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"noise: need logsnr_min < logsnr_max, got {self.logsnr_min}, "
                             f"{self.logsnr_max}")

    def _t_range(self) -> tuple[float, float]:
        lo = logsnr_to_sigma(self.logsnr_max)  # high SNR = low noise
        hi = logsnr_to_sigma(self.logsnr_min)
        return (2 / math.pi) * math.atan(lo), (2 / math.pi) * math.atan(hi)

    def _sample(self, shape, *, generator, device, dtype) -> Tensor:
        t_lo, t_hi = self._t_range()
        u = self._uniform(shape, generator=generator, device=device, dtype=dtype)
        return cosine_sigma(t_lo + (t_hi - t_lo) * u)

    def _cdf(self, sigma: Tensor) -> Tensor:
        t_lo, t_hi = self._t_range()
        return ((cosine_sigma_inv(sigma) - t_lo) / (t_hi - t_lo)).clamp(0, 1)


# Probability mass a noise distribution may put outside a preconditioning's σ domain.
OUTSIDE_DOMAIN_TOLERANCE = 1e-6


def check_compatible(preconditioning, noise_levels, *, tol: float = OUTSIDE_DOMAIN_TOLERANCE) -> None:
    """Refuse a (denoiser, noise) pair whose training σ leave the denoiser's σ domain.

    Only VP has a bounded domain (its network input c_noise = (M−1)·t needs t ≤ 1, σ ≤ σ(1) ≈ 152), so in
    practice this refuses VP with noise distributions shifted or widened past it.
    """
    lo, hi = preconditioning.sigma_domain
    cdf = lambda s: float(noise_levels.cdf(torch.tensor(s, dtype=torch.float64)))
    outside = (cdf(lo) if lo > 0 else 0.0) + (1.0 - cdf(hi) if math.isfinite(hi) else 0.0)
    if outside > tol:
        raise ValueError(
            f"preconditioning {type(preconditioning).__name__} is defined for σ in ({lo:.4g}, {hi:.4g}], but "
            f"the noise distribution {noise_levels} puts {outside:.2e} of its mass outside that range "
            f"(at most {tol:g} allowed). Choose another noise_levels= (e.g. the preconditioning's own), reduce "
            "noise_levels.log_sigma_shift, or another preconditioning=.")
