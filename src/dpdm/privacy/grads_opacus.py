"""Per-example gradients of the K-averaged loss with stock Opacus grad samplers.

The network sees B·K rows (example-major: row i·K + k). Opacus' grad samplers produce one gradient per
row; we fold each layer's (B·K, ...) per-row gradients to (B, ...) by summing the K rows of an example,
layer by layer, so only one layer's B·K gradients exist at a time (never the full B·K × params tensor).

With loss = mean_i ℓ_i where ℓ_i = mean_k ℓ_ik, backprops are scaled by B (= max_batch_len) for the
"mean" reduction, giving per-row gradients (1/K)∇ℓ_ik, whose per-example sum is exactly ∇ℓ_i:
the quantity DP-SGD clips (DPDM, Sec. 3.2).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch import nn


def _fold_rows(fn: Callable, K: int) -> Callable:
    def folded(module: nn.Module, activations, backprops):
        per_row = fn(module, activations, backprops)
        return {p: g.reshape(-1, K, *g.shape[1:]).sum(1) for p, g in per_row.items()}

    return folded


class NoiseMultiplicityGradSampleHooks(GradSampleHooks):
    """Opacus hooks that store one per-sample gradient per *example* for K noised copies per example.

    Attaches to the module in place (no wrapper module), so state dicts keep their plain keys.
    """

    def __init__(self, module: nn.Module, *, noise_multiplicity: int, loss_reduction: str = "mean"):
        if noise_multiplicity < 1:
            raise ValueError(f"loss.noise_multiplicity must be >= 1, got {noise_multiplicity}")
        self.noise_multiplicity = K = int(noise_multiplicity)
        # An instance-level registry shadows the class one; unsupported layer types stay unsupported,
        # so validation (strict) still refuses them when the model is built.
        self.GRAD_SAMPLERS = {t: _fold_rows(f, K) for t, f in GradSampleHooks.GRAD_SAMPLERS.items()}
        super().__init__(module, batch_first=True, loss_reduction=loss_reduction, strict=True)

    # The engine interface shared with dpdm.privacy.grads_fold.PerExampleGradients.
    def capture(self):
        return nullcontext()  # the hooks record every training-mode forward

    def backward(self, per_example_losses: torch.Tensor) -> None:
        # Opacus rescales backprops by the batch size for the "mean" reduction: exact ∇ℓ_i per example.
        per_example_losses.mean().backward()

    def rearrange_grad_samples(self, *, module, backprops, loss_reduction, batch_first):
        if not hasattr(module, "max_batch_len"):
            rows = module.activations[-1][0].shape[0]
            if rows % self.noise_multiplicity:
                raise RuntimeError(f"{type(module).__name__} saw {rows} rows, not a multiple of "
                                   f"K={self.noise_multiplicity}: the network must see B·K rows")
            module.max_batch_len = rows // self.noise_multiplicity
        return super().rearrange_grad_samples(module=module, backprops=backprops,
                                              loss_reduction=loss_reduction, batch_first=batch_first)


def set_empty_grad_samples(module: nn.Module) -> None:
    """For an empty Poisson batch: zero per-sample gradients, so the step adds noise only."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
