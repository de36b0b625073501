"""Per-sample, per-step Gaussian noise for stochastic samplers, as a pure function of (seed, step, index).

A stochastic sampler needs fresh noise at each step, and a sample must not depend on the batch it was
drawn in. One torch.Generator per sample would do, but costs a Python-level call per sample per step
(thousands of calls per step for a large batch, all on the CPU). Instead the noise is a counter-based
hash: element k of sample `seed` at step i is a fixed function of (seed, i, k), computed for the whole
batch at once on any device (the same bits on CPU and GPU; only the final log/cos may round
differently), with no generator state to carry.

The hash is a 32-bit integer finalizer ("lowbias32", C. Wellons' hash-prospector) applied while
absorbing seed, step and counter in turn; two hashed counters give two uniforms, and the Box–Muller
transform turns them into two independent standard normals. All integer arithmetic stays below 2^63 in
int64, so it never relies on signed overflow.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x·c) mod 2³² for 0 ≤ x < 2³², split in 16-bit halves of c so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A bijection of [0, 2³²) with strong avalanche (every input bit flips each output bit w.p. ≈ ½)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform_open(bits: Tensor) -> Tensor:
    """32 random bits → a float64 in (0, 1), never 0 (Box–Muller takes its log)."""
    return (bits.to(torch.float64) + 0.5) / 2.0**32


def seeded_normal(seeds: Sequence[int] | Tensor, step: int, shape: Sequence[int], *,
                  device=None) -> Tensor:
    """Standard normal noise, (len(seeds), *shape) float64; row b depends only on (seeds[b], step)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1, 1)
    numel = math.prod(shape)
    # The odd constants keep structured inputs (seed 0, step 0, counter 0) away from the fixed point
    # _mix32(0) = 0.
    key = _mix32(((_mix32((seeds + 0x9E3779B9) & _MASK32) ^ (int(step) & _MASK32)) + 0x85EBCA6B) & _MASK32)
    # Box–Muller turns the uniforms of pair j (counters 2j, 2j+1) into elements 2j and 2j+1.
    pair = torch.arange((numel + 1) // 2, dtype=torch.int64, device=seeds.device)
    bits = lambda counter: _mix32(((key ^ counter) + 0xC2B2AE35) & _MASK32)
    radius = torch.sqrt(-2.0 * torch.log(_uniform_open(bits(2 * pair))))
    angle = (2.0 * math.pi) * _uniform_open(bits(2 * pair + 1))
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return z.reshape(len(seeds), -1)[:, :numel].reshape(-1, *shape)
