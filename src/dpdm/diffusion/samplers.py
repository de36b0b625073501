"""Samplers for the probability-flow ODE / reverse SDE of a preconditioned denoiser D(x; σ, y).

In the σ-parameterization (x = y + σ·n) the probability-flow ODE is dx/dσ = (x − D(x; σ))/σ (EDM, Eq. 3
with s = 1, σ(t) = t). Every sampler here shares one signature,

    sampler(denoiser, latents, sigmas, *, class_labels=None, guidance=0.0, noise_seeds=None,
            net_dtype=torch.float32, **options) -> x at σ = 0,

takes a ready time grid (`karras_sigmas`), builds no graphs, keeps no state between calls, and runs its
own state in float64 as EDM does. Latents (`latents_from_seeds`) and per-step noise (`seeded_normal`) are
functions of each sample's seed, so a sample never depends on the batch it was drawn in.
`run_sampler` picks a sampler by name and builds its grid: the one entry point for configs.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dpdm.diffusion.seeded_noise import seeded_normal


def karras_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, dtype=torch.float64, device=None) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then σ_N = 0 (EDM, Eq. 5)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
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


def sample_from_seeds(denoiser, seeds: Sequence[int], *, sampler: dict, class_labels: Tensor | None = None,
                      shape: Sequence[int] | None = None, device=None) -> Tensor:
    """Images in [-1, 1], image i from the latent and sampling noise of seeds[i] alone: the same image in
    any batch. `sampler` is a `sampler=` config as a dict; `shape` defaults to the denoiser's."""
    seeds = [int(s) for s in seeds]
    latents = latents_from_seeds(seeds, shape or denoiser.image_shape, device=device)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    return run_sampler(denoiser, latents, class_labels=class_labels, noise_seeds=seeds, **sampler)


def sample_in_batches(draw: Callable[[list[int], Tensor | None], Tensor], *, n: int,
                      labels: Tensor | None = None, seed: int = 0, batch_size: int = 500,
                      progress: Callable[[int, int], None] | None = None) -> Tensor:
    """n images from `draw(seeds, labels)`, batch_size at a time; image i is drawn with seed + i (and
    labels[i]), so the set is the same whatever the batch size. `progress(done, n)` after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, n, batch_size):
        seeds = list(range(seed + start, seed + min(n, start + batch_size)))
        out.append(draw(seeds, None if labels is None else labels[start:start + len(seeds)]))
        if progress is not None:
            progress(start + len(seeds), n)
    return torch.cat(out)


def check_null_label_trained(denoiser, label_dropout: float | None, sampler, *, unconditional: bool) -> None:
    """Refuse to draw with `sampler` through the null label of a conditional model that never trained it.

    Classifier-free guidance (w != 0) and unconditional draws (no class labels) evaluate D(x, ∅). Only
    the noised copies whose label was dropped in training (loss.label_dropout) teach the network that
    input; at label_dropout = 0 the null-label embedding keeps its random initialization and D(x, ∅) is
    not a denoiser of anything. `label_dropout` None: not recorded (checkpoints from before it was), allowed.
    An unconditional network has no null label: nothing to check.
    """
    guidance = float(sampler.get("guidance") or 0)
    if (getattr(denoiser, "null_label", None) is None or label_dropout is None or label_dropout > 0
            or (guidance == 0 and not unconditional)):
        return
    what = f"guidance w = {guidance:g}" if guidance != 0 else "unconditional samples (classes=null)"
    raise ValueError(
        f"{what} needs the unconditional model, but this model was trained with loss.label_dropout=0, "
        "which never trains it. Sample with sampler.guidance=0 and class labels (classes=balanced or a "
        "class index), or train with loss.label_dropout > 0 (0.1 is the paper's).")


def guided(denoiser: Callable, x: Tensor, sigma: Tensor, class_labels: Tensor | None,
           guidance: float, null_label: int | None) -> Tensor:
    """Classifier-free guidance: (1 + w)·D(x, y) − w·D(x, ∅). w = 0 is the plain conditional D."""
    if guidance == 0:
        return denoiser(x, sigma, class_labels)
    if class_labels is None or null_label is None:
        raise ValueError(f"classifier-free guidance (w={guidance}) needs a class-conditional model and "
                         "class labels; use guidance 0 for an unconditional model")
    null = torch.full_like(class_labels, null_label)
    # One call on the doubled batch: half the launches of two calls, same per-row results.
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null]))
    d_cond, d_uncond = both.chunk(2)
    return (1 + guidance) * d_cond - guidance * d_uncond


def _denoise_fn(denoiser, class_labels, guidance, net_dtype) -> Callable[[Tensor, float], Tensor]:
    """D(x; σ) at one σ for the whole batch: network in net_dtype, result in float64."""
    null_label = getattr(denoiser, "null_label", None)

    def D(x: Tensor, sigma: float) -> Tensor:
        s = torch.full((x.shape[0],), sigma, device=x.device, dtype=net_dtype)
        return guided(denoiser, x.to(net_dtype), s, class_labels, guidance, null_label).to(torch.float64)

    return D


def _seeds(noise_seeds, n: int, device) -> Tensor:
    """Per-sample noise seeds as a tensor, made once per call (default: positions in the batch)."""
    if noise_seeds is None:
        seeds = torch.arange(n)
    else:
        seeds = torch.as_tensor(noise_seeds if isinstance(noise_seeds, Tensor) else list(noise_seeds))
    if len(seeds) != n:
        raise ValueError(f"need one noise seed per latent: {len(seeds)} seeds for {n} latents")
    return seeds.to(device=device, dtype=torch.int64)


def euler_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """x + (σ' − σ)·(x − D)/σ: one Euler step of the probability-flow ODE (EDM Eq. 3; DDIM Eq. 14)."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of a DDIM step with stochasticity η (Song et al. 2021a, Eq. 16, in σ-space).

    Writing DDIM's update with ᾱ = 1/(1+σ²) and dividing by sqrt(ᾱ_next) gives
    x' = D + σ_down·(x − D)/σ + σ_up·z with σ_up = η·σ'·sqrt(1 − σ'²/σ²), σ_down = sqrt(σ'² − σ_up²).
    η = 0 is deterministic DDIM; η = 1 is the DDPM ancestral step. σ_down² + σ_up² = σ'²: the step lands
    at noise level σ' whatever η.
    """
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - sigma_next**2 / sigma**2, 0.0)))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.inference_mode()
def ddim_sampler(denoiser, latents: Tensor, sigmas: Tensor, *, class_labels: Tensor | None = None,
                 guidance: float = 0.0, noise_seeds: Sequence[int] | None = None,
                 net_dtype=torch.float32) -> Tensor:
    """Deterministic DDIM: Euler on the probability-flow ODE over the σ grid (one D call per step)."""
    D = _denoise_fn(denoiser, class_labels, guidance, net_dtype)
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(len(sigmas) - 1):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = euler_step(x, D(x, s_cur), s_cur, s_next)
    return x


@torch.inference_mode()
def stochastic_ddim_sampler(denoiser, latents: Tensor, sigmas: Tensor, *,
                            class_labels: Tensor | None = None, guidance: float = 0.0,
                            noise_seeds: Sequence[int] | None = None, net_dtype=torch.float32,
                            eta: float = 1.0) -> Tensor:
    """Stochastic DDIM (η > 0): Euler down to σ_down, then fresh noise of std σ_up (`ancestral_sigmas`).

    With η = 1, a first-order discretization of the reverse SDE dx = −2σ ∇log p dσ + sqrt(2σ) dω̄
    (EDM Eq. 6 with β(t) = σ̇/σ): as the steps shrink, σ_up² → 2σ·|Δσ| and σ − σ_down → 2|Δσ|.
    """
    D = _denoise_fn(denoiser, class_labels, guidance, net_dtype)
    seeds = _seeds(noise_seeds, len(latents), latents.device)
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(len(sigmas) - 1):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_down, s_up = ancestral_sigmas(s_cur, s_next, eta)
        x = euler_step(x, D(x, s_cur), s_cur, s_down)
        if s_up > 0:
            x = x + s_up * seeded_normal(seeds, i, x.shape[1:], device=x.device)
    return x


@torch.inference_mode()
def edm_heun_sampler(denoiser, latents: Tensor, sigmas: Tensor, *,
                     class_labels: Tensor | None = None, guidance: float = 0.0,
                     noise_seeds: Sequence[int] | None = None, net_dtype=torch.float32,
                     S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                     S_noise: float = 1.0) -> Tensor:
    """EDM Algorithm 2: Heun steps on dx/dσ = (x − D(x; σ))/σ, with optional churn.

    With S_churn = 0 this is the deterministic 2nd-order sampler (EDM Alg. 1). `latents` are unit-variance
    and are scaled by σ_0 here. Churn noise is `seeded_normal` of `noise_seeds` (default: batch positions).
    """
    D = _denoise_fn(denoiser, class_labels, guidance, net_dtype)
    num_steps = len(sigmas) - 1
    seeds = _seeds(noise_seeds, len(latents), latents.device)
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        # Churn: raise the noise level to ŝ = s + γ s, adding fresh noise of variance ŝ² − s².
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= s_cur <= S_max else 0.0
        s_hat = s_cur + gamma * s_cur
        if gamma > 0:
            eps = seeded_normal(seeds, i, x.shape[1:], device=x.device)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * S_noise * eps
        d_cur = (x - D(x, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d_cur
        if s_next > 0:  # 2nd-order correction, skipped on the final step to σ = 0
            d_next = (x_next - D(x_next, s_next)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": ddim_sampler,
    "stochastic_ddim": stochastic_ddim_sampler,
    "edm_heun": edm_heun_sampler,
}
# Keys of a sampler config that are not options of the sampler function itself.
GRID_KEYS = ("num_steps", "sigma_min", "sigma_max", "rho")


def sampler_options(name: str) -> list[str]:
    """The sampler-specific keyword options of SAMPLERS[name] (beyond the shared signature)."""
    shared = set(inspect.signature(ddim_sampler).parameters)
    return [p for p in inspect.signature(SAMPLERS[name]).parameters if p not in shared]


def run_sampler(denoiser, latents: Tensor, *, name: str, num_steps: int, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0, class_labels: Tensor | None = None,
                guidance: float = 0.0, noise_seeds: Sequence[int] | None = None,
                net_dtype=torch.float32, **options) -> Tensor:
    """Sample with the sampler called `name` over the ρ-spaced σ grid: what a `sampler=` config describes."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    unknown = set(options) - set(sampler_options(name))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {', '.join(sorted(unknown))}; its options "
                         f"are {', '.join(sampler_options(name)) or 'none'} plus {', '.join(GRID_KEYS)}, "
                         "guidance")
    domain = getattr(getattr(denoiser, "precond", None), "sigma_domain", (0.0, math.inf))
    if sigma_max > domain[1]:
        raise ValueError(f"sampler sigma_max={sigma_max} exceeds the largest σ the denoiser is defined for "
                         f"({domain[1]:.4g}); lower sampler.sigma_max")
    sigmas = karras_sigmas(int(num_steps), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                           device=latents.device)
    return SAMPLERS[name](denoiser, latents, sigmas, class_labels=class_labels, guidance=float(guidance),
                          noise_seeds=noise_seeds, net_dtype=net_dtype,
                          **{k: float(v) for k, v in options.items()})
