"""Building blocks of the DDPM++ U-Net, restricted to what Opacus can handle.

Every parametric leaf is an ``nn.Conv2d``, ``nn.Linear``, ``nn.GroupNorm`` or
``nn.Embedding`` so that Opacus' hook-based per-sample gradients apply.  Two
further rules keep those hooks exact:

* no in-place op ever touches a module output (the hooks keep references to
  activations and backprops, and in-place edits corrupt them or raise), and
* no parametric module is called twice in one forward, since the hooks assume
  one activation per module per backward.

Parameter-free ops (SiLU, resampling, attention softmax) are functional.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Resample = Literal["none", "down", "up"]

# DDPM++ sums residual branches and rescales so that the variance of the
# activations does not grow with depth.
SKIP_SCALE = math.sqrt(0.5)


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups but at least 4 channels per group.

    The plain ``GroupNorm(32, C)`` of DDPM++ would give one channel per group
    at ``C = 32`` (degenerating to instance norm); capping the group count
    keeps small models well-behaved, as EDM does.
    """
    groups = min(32, max(channels // 4, 1))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def resample(x: Tensor, mode: Resample) -> Tensor:
    """2x box-filter down- or nearest up-sampling (the [1, 1] filter of EDM's DDPM++).

    Both are exact for 28 -> 14 -> 7 -> 14 -> 28; odd sizes are rejected
    because the skip connections would no longer line up.
    """
    if mode == "none":
        return x
    if mode == "down":
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"cannot halve odd spatial size {tuple(x.shape[-2:])}")
        return F.avg_pool2d(x, 2)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar per row.

    Frequencies are geometric from 1 down to ``1 / max_positions``; for EDM's
    ``c_noise = ln(sigma) / 4`` (roughly [-2, 2]) the high-frequency channels
    carry most of the information, which the following MLP can use.
    """

    def __init__(self, num_channels: int, max_positions: float = 10_000.0) -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError("positional embedding needs an even channel count")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=x.dtype, device=x.device) / max(half - 1, 1)
        freqs = self.max_positions ** (-exponent)
        angles = x.reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class SelfAttention2d(nn.Module):
    """Pre-norm multi-head self-attention over the pixels of a feature map.

    q/k/v and the output projection are 1x1 convolutions and the softmax is
    written out with plain tensor ops, so Opacus sees only Conv2d/GroupNorm.
    """

    def __init__(self, channels: int, num_heads: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.unbind(dim=1)
        logits = torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(c // self.num_heads)
        out = torch.einsum("nhqk,nhck->nhcq", logits.softmax(dim=-1), v)
        return (x + self.proj(out.reshape(n, c, h, w))) * SKIP_SCALE


class ResBlock(nn.Module):
    """DDPM++ / BigGAN residual block, optionally resampling and attending.

    Resampling sits between the first activation and the first conv, with the
    skip path resampled the same way and projected by a 1x1 conv (DDPM++'s
    ``resample_proj``), so both branches see identical spatial grids.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        resample_mode: Resample = "none",
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.resample_mode = resample_mode
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        needs_skip = in_channels != out_channels or resample_mode != "none"
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if needs_skip else None
        self.attn = SelfAttention2d(out_channels, num_heads, eps) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample_mode))
        h = h + self.affine(emb).unsqueeze(-1).unsqueeze(-1)
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        skip = resample(x, self.resample_mode)
        if self.skip is not None:
            skip = self.skip(skip)
        h = (h + skip) * SKIP_SCALE
        if self.attn is not None:
            h = self.attn(h)
        return h
