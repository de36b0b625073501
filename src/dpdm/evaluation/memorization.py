"""Memorization report: how close generated samples come to the training images, next to real held-out images.

For a generated sample g, d(g, T) is the L2 distance in pixel space (pixels scaled to [0, 1]) to its
nearest training image. A model that copies training images produces samples much closer to T than
fresh real images are; so the yardstick is d(h, T) for held-out real images h (the test split). If the
samples were distributed like fresh real data, about 1% of them would fall below the held-out 1st
percentile. d1/d2 (nearest over second-nearest) near 0 means "one training image in particular".

This is a diagnostic of one failure mode, not a privacy guarantee: a DP model may still sit close to
training images that look like many others, and a model that memorizes need not show it in pixel space.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

QUANTILES = {"min": 0.0, "q01": 0.01, "q05": 0.05, "median": 0.5}


def _flat01(x: torch.Tensor) -> torch.Tensor:
    # Float64 keeps |a|² + |b|² − 2ab (what cdist's matmul path computes) exact enough for near-copies.
    return x.reshape(x.shape[0], -1).to(torch.float64) / (255.0 if x.dtype == torch.uint8 else 1.0)


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, *, k: int = 2,
                      query_chunk: int = 512, reference_chunk: int = 8192) -> torch.Tensor:
    """(n, k) ascending L2 distances from each query to its k nearest reference images.

    uint8 images are scaled to [0, 1]; float images are used as given. The reference is processed in
    chunks (converted chunk by chunk), so 60,000 training images never exist as one float64 matrix.
    """
    if queries.shape[1:] != reference.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(queries.shape[1:])} vs {tuple(reference.shape[1:])}")
    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the reference size {reference.shape[0]}")
    out = []
    for qs in range(0, queries.shape[0], query_chunk):
        q = _flat01(queries[qs:qs + query_chunk])
        best = torch.empty((q.shape[0], 0), dtype=torch.float64)
        for rs in range(0, reference.shape[0], reference_chunk):
            d = torch.cdist(q, _flat01(reference[rs:rs + reference_chunk]))
            best = torch.cat([best, d], dim=1).topk(min(k, best.shape[1] + d.shape[1]), dim=1,
                                                     largest=False).values
        out.append(best)
    return torch.cat(out)  # topk(largest=False) already sorts ascending


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {name: float(np.quantile(x, q)) for name, q in QUANTILES.items()}


@dataclass(frozen=True)
class MemorizationReport:
    num_samples: int
    num_train: int
    num_heldout: int
    samples_to_train: dict          # quantiles of d(g, T)
    heldout_to_train: dict          # quantiles of d(h, T)
    threshold: float                # 1st percentile of d(h, T)
    fraction_below_threshold: float  # of the samples; ≈ 0.01 for samples like fresh real data
    samples_ratio: dict             # quantiles of d1/d2 for the samples
    heldout_ratio: dict

    def to_dict(self) -> dict:
        return asdict(self)


def memorization_report(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor) -> MemorizationReport:
    if samples.dtype != heldout.dtype:
        raise ValueError(f"samples ({samples.dtype}) and held-out images ({heldout.dtype}) must share a dtype")
    # One pass over the (large) training set for both query sets.
    d = nearest_distances(torch.cat([samples, heldout]), train).numpy()
    ds, dh = d[:len(samples)], d[len(samples):]
    threshold = float(np.quantile(dh[:, 0], 0.01))
    ratio = lambda d: np.divide(d[:, 0], d[:, 1], out=np.zeros(len(d)), where=d[:, 1] > 0)
    return MemorizationReport(
        num_samples=len(ds), num_train=int(train.shape[0]), num_heldout=len(dh),
        samples_to_train=_quantiles(ds[:, 0]), heldout_to_train=_quantiles(dh[:, 0]), threshold=threshold,
        fraction_below_threshold=float(np.mean(ds[:, 0] < threshold)),
        samples_ratio=_quantiles(ratio(ds)), heldout_ratio=_quantiles(ratio(dh)))
