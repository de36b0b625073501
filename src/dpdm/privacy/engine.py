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
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.validators import ModuleValidator
from torch import nn

from dpdm.privacy.accounting import _check_accountant
from dpdm.privacy.grads_fold import PerExampleGradients, unsupported_layer
from dpdm.privacy.grads_opacus import NoiseMultiplicityGradSampleHooks
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


def dp_layer_problems(module: nn.Module) -> list[str]:
    """Every layer that would break DP-SGD's per-example guarantee, whatever the engine.

    Looks at all modules, not only those with trainable parameters: a BatchNorm(affine=False) has none
    but still couples the examples of a batch, and buffers (running statistics) are state computed from
    the private data outside the mechanism, which would reach the EMA and the checkpoint un-noised.
    """
    problems = []
    for name, sub in module.named_modules():
        label = f"{name or '<network>'} ({type(sub).__name__})"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones
            problems.append(f"{label}: batch normalisation mixes the examples of a batch (one example changes "
                            "another's gradient); use GroupNorm")
            continue
        buffers = [n for n, _ in sub.named_buffers(recurse=False)]
        if buffers:
            problems.append(f"{label}: buffers {buffers} are state outside the DP mechanism (e.g. running "
                            "statistics of the private data); use layers without buffers (GroupNorm, "
                            "InstanceNorm with track_running_stats=False)")
        why = unsupported_layer(sub)
        if why:
            problems.append(f"{label}: {why}")
    return problems


def validate_for_dp(module: nn.Module) -> None:
    """Refuse layers that couple examples, keep data-dependent state, or have no exact per-example rule
    (the same set for every engine); then Opacus' own validator."""
    problems = dp_layer_problems(module) + [str(e) for e in ModuleValidator.validate(module, strict=False)]
    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(f"The network cannot be trained with DP-SGD:\n  {lines}")


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"dp_engine must be one of {ENGINES}, got {name!r}")
    return name


def make_per_example_engine(module: nn.Module, *, noise_multiplicity: int, engine: str = "fold"):
    """The object whose `capture()` / `backward(per_example_losses)` fill p.grad_sample."""
    check_engine(engine)
    validate_for_dp(module)  # every engine refuses the same layers
    if engine == "opacus":
        return NoiseMultiplicityGradSampleHooks(module, noise_multiplicity=noise_multiplicity)
    return PerExampleGradients(module, noise_multiplicity=noise_multiplicity,
                               conv_method="unfold" if engine == "fold_unfold" else "grouped")


def make_dp_components(module: nn.Module, optimizer: torch.optim.Optimizer, *,
                       noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                       sample_rate: float, noise_multiplicity: int, accountant: str = "rdp",
                       secure_mode: bool = False, noise_seed: int | None = None,
                       engine: str = "fold") -> DPComponents:
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
    # Flat clipping (one norm over all parameters, as in the paper); Opacus picks the class.
    opt_cls = get_optimizer_class(clipping="flat", distributed=world_size > 1, grad_sample_mode="hooks")
    per_rank_batch = expected_batch_size / world_size if world_size > 1 else expected_batch_size
    dp_opt = opt_cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                     expected_batch_size=per_rank_batch, loss_reduction="mean",
                     generator=gen, secure_mode=secure_mode)
    acc = create_accountant(mechanism=_check_accountant(accountant))
    dp_opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=sample_rate))
    return DPComponents(per_example=per_example, optimizer=dp_opt, accountant=acc, noise_generator=gen)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
