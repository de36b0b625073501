"""Assemble DP-SGD from Opacus parts: grad-sample hooks, DPOptimizer, accountant.

This is what `opacus.PrivacyEngine.make_private` does, minus the data loader (the LightningDataModule owns
Poisson sampling at the rate q given here) and plus noise multiplicity. Every piece that touches privacy
is Opacus' own: clipping and noising (`DPOptimizer.pre_step`), accounting (`accountant.step` through the
optimizer's step hook, called only on real, non-skipped steps).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from dpdm.privacy.accounting import _check_accountant
from dpdm.privacy.noise_multiplicity import NoiseMultiplicityGradSampleHooks


@dataclass
class DPComponents:
    hooks: NoiseMultiplicityGradSampleHooks
    optimizer: DPOptimizer
    accountant: IAccountant
    noise_generator: torch.Generator


def validate_for_dp(module: nn.Module) -> None:
    """Refuse layers that mix examples (BatchNorm) or that Opacus cannot differentiate per example."""
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        lines = "\n  ".join(str(e) for e in errors)
        raise ValueError(f"The network cannot be trained with DP-SGD:\n  {lines}\n"
                         "Use GroupNorm instead of BatchNorm and only Opacus-supported layers.")


def make_dp_components(module: nn.Module, optimizer: torch.optim.Optimizer, *,
                       noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                       sample_rate: float, noise_multiplicity: int, accountant: str = "rdp",
                       secure_mode: bool = False, noise_seed: int | None = None) -> DPComponents:
    validate_for_dp(module)
    hooks = NoiseMultiplicityGradSampleHooks(module, noise_multiplicity=noise_multiplicity)
    # The noise must be unpredictable to the adversary: by default its generator is seeded from OS
    # entropy. A fixed noise_seed makes runs reproducible but voids the guarantee against anyone who
    # knows the seed. secure_mode additionally makes Opacus draw each coordinate as a sum of Gaussians,
    # against floating-point attacks on the Gaussian sampler.
    gen = torch.Generator(device=next(module.parameters()).device)
    gen.manual_seed(noise_seed if noise_seed is not None else int.from_bytes(os.urandom(8), "little"))
    dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean",
                         generator=gen, secure_mode=secure_mode)
    acc = create_accountant(mechanism=_check_accountant(accountant))
    dp_opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=sample_rate))
    return DPComponents(hooks=hooks, optimizer=dp_opt, accountant=acc, noise_generator=gen)
