"""Assemble DP-SGD from Opacus parts: grad-sample hooks, DPOptimizer, accountant.

This is what `opacus.PrivacyEngine.make_private` does, minus the data loader (the LightningDataModule owns
Poisson sampling at the rate q given here) and plus noise multiplicity. Every piece that touches privacy
is Opacus' own: clipping and noising (`DPOptimizer.pre_step`), accounting (`accountant.step` through the
optimizer's step hook, called only on real, non-skipped steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from dpdm.privacy.accounting import _check_accountant
from dpdm.privacy.noise_multiplicity import NoiseMultiplicityGradSampleHooks
from dpdm.privacy.per_example_grads import PerExampleGradients
from dpdm.utils.seeds import os_seed

# How per-example gradients are computed (docs/performance.md has the measurements behind the default):
#   fold          dpdm's engine: output-gradient-only backward + one contraction per layer, conv weight
#                 gradients from a B-group convolution backward (default)
#   fold_unfold   the same engine, conv weight gradients by im2col + bmm (slower on CPU:
#                 docs/performance.md)
#   opacus        stock Opacus grad-sample hooks, the K rows of an example summed layer by layer
ENGINES = ("fold", "fold_unfold", "opacus")


@dataclass
class DPComponents:
    per_example: PerExampleGradients | NoiseMultiplicityGradSampleHooks
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


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"dp_engine must be one of {ENGINES}, got {name!r}")
    return name


def make_per_example_engine(module: nn.Module, *, noise_multiplicity: int, engine: str = "fold"):
    """The object whose `capture()` / `backward(per_example_losses)` fill p.grad_sample."""
    if check_engine(engine) == "opacus":
        return NoiseMultiplicityGradSampleHooks(module, noise_multiplicity=noise_multiplicity)
    return PerExampleGradients(module, noise_multiplicity=noise_multiplicity,
                               conv_method="unfold" if engine == "fold_unfold" else "grouped")


def make_dp_components(module: nn.Module, optimizer: torch.optim.Optimizer, *,
                       noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                       sample_rate: float, noise_multiplicity: int, accountant: str = "rdp",
                       secure_mode: bool = False, noise_seed: int | None = None,
                       engine: str = "fold") -> DPComponents:
    validate_for_dp(module)
    per_example = make_per_example_engine(module, noise_multiplicity=noise_multiplicity, engine=engine)
    # The noise must be unpredictable to the adversary: by default its generator is seeded from OS
    # entropy. A fixed noise_seed makes runs reproducible but voids the guarantee against anyone who
    # knows the seed. secure_mode additionally makes Opacus draw each coordinate as a sum of Gaussians,
    # against floating-point attacks on the Gaussian sampler.
    gen = torch.Generator(device=next(module.parameters()).device)
    gen.manual_seed(noise_seed if noise_seed is not None else os_seed())
    # Data-parallel DP-SGD (trainer=ddp, torch.distributed's world size W > 1):
    # Opacus' DistributedDPOptimizer. Every rank clips its own examples, rank 0 alone adds the noise,
    # each rank divides by the per-rank expected batch size B/W, and the all-reduce averages over the W
    # ranks: the update is (Σ clipped gradients of all ranks + one N(0, σ²C²)) / B, as in one process.
    world_size = _world_size()
    opt_cls, per_rank_batch = ((DistributedDPOptimizer, expected_batch_size / world_size)
                               if world_size > 1 else (DPOptimizer, expected_batch_size))
    dp_opt = opt_cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                     expected_batch_size=per_rank_batch, loss_reduction="mean",
                     generator=gen, secure_mode=secure_mode)
    acc = create_accountant(mechanism=_check_accountant(accountant))
    dp_opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=sample_rate))
    return DPComponents(per_example=per_example, optimizer=dp_opt, accountant=acc, noise_generator=gen)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
