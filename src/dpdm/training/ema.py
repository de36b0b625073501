"""Exponential moving average of weights, updated only on real (non-skipped) optimizer steps."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_copy(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(module)
    ema.requires_grad_(False)
    return ema.eval()


def ema_rate_at(step: int, rate: float, warmup: bool, offset: float = 10.0) -> float:
    """With warmup, β_t = min(β, (1 + t)/(c + t)), c = `offset`: short runs are not dominated by the initial
    weights. While the warm-up term is the smaller one (t < (c − β)/(1 − β): 1,790 steps for β = 0.995 and
    c = 10) the EMA at step T weighs step s in proportion to about (s/T)^(c−2), whatever β is: c = 10 averages
    roughly the last tenth of the run, c = 4 the last ~40% (weights ∝ s²), c = 2 every step alike."""
    return min(rate, (1 + step) / (offset + step)) if warmup else rate


def check_ema_warmup_offset(offset: float) -> None:
    if not offset > 1:
        raise ValueError(f"ema.warmup_offset must be > 1 (got {offset}): at 1 the EMA never leaves the initial "
                         "weights; 10 is the usual warm-up, 2 a plain average of every step")


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """θ_ema ← rate·θ_ema + (1 − rate)·θ."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1.0 - rate)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)
