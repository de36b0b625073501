"""Exponential moving average of weights, updated only on real (non-skipped) optimizer steps."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_copy(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(module)
    ema.requires_grad_(False)
    return ema.eval()


def ema_rate_at(step: int, rate: float, warmup: bool) -> float:
    """With warmup, β_t = min(β, (1 + t)/(10 + t)): short runs are not dominated by the initial weights."""
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """θ_ema ← rate·θ_ema + (1 − rate)·θ."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1.0 - rate)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)
