"""Fréchet distances between Gaussian fits of image features, computed by torchmetrics.

    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})        (Heusel et al. 2017, Eq. 6)

`FrechetDistance` wraps `torchmetrics.image.fid.FrechetInceptionDistance` with any feature extractor:
the standard Inception network (the only one whose distance may be called FID, see `inception.py`)
or a classifier trained on real data (`fd_classifier`). Reference statistics are stored exactly as
torchmetrics accumulates them (Σf, Σffᵀ, n in float64), so a cached reference gives bit-identical
results to recomputing it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from dpdm.utils.files import atomic_path

__all__ = ["FeatureStats", "FrechetDistance", "cached_feature_stats"]


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of a feature set: Σf (d,), Σffᵀ (d, d), both float64, and n."""

    feature_sum: torch.Tensor
    outer_sum: torch.Tensor
    num_samples: int

    @property
    def mean(self) -> torch.Tensor:
        return self.feature_sum / self.num_samples

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased sample covariance (divides by n − 1), as torchmetrics and numpy.cov do."""
        mu = self.mean
        return (self.outer_sum - self.num_samples * torch.outer(mu, mu)) / (self.num_samples - 1)

    def save(self, path: str | Path, **meta: str) -> None:
        """Atomic npz write; `meta` strings (extractor identity, split) are stored alongside."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, feature_sum=self.feature_sum.cpu().numpy(), outer_sum=self.outer_sum.cpu().numpy(),
                     num_samples=np.int64(self.num_samples),
                     **{f"meta_{k}": np.array(str(v)) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path, allow_pickle=False) as f:
            return cls(torch.from_numpy(f["feature_sum"]).double(), torch.from_numpy(f["outer_sum"]).double(),
                       int(f["num_samples"]))


def cached_feature_stats(*, path: str | Path, compute: Callable[[], FeatureStats], **meta: str) -> FeatureStats:
    """Load the statistics at `path`, or compute and store them there first."""
    path = Path(path)
    if path.is_file():
        return FeatureStats.load(path)
    stats = compute()
    stats.save(path, **meta)
    return stats


class FrechetDistance:
    """Fréchet distance of generated images to a fixed reference, through torchmetrics' FID code.

    `metric` is a `FrechetInceptionDistance` built with the feature extractor of choice; `prepare`
    maps uint8 (N, C, H, W) images to what that extractor takes (e.g. grey → RGB for Inception).
    """

    def __init__(self, *, metric: FrechetInceptionDistance,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.metric = metric.to(self.device)
        self.prepare = prepare or (lambda x: x)

    def _accumulate(self, images: torch.Tensor, *, real: bool, batch_size: int) -> None:
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype}")
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(self.device)
                self.metric.update(self.prepare(batch), real=real)

    def feature_stats(self, images: torch.Tensor, *, batch_size: int = 500) -> FeatureStats:
        """Statistics of `images` in this extractor's feature space (e.g. of a real split)."""
        self.metric.reset()
        self._accumulate(images, real=True, batch_size=batch_size)
        m = self.metric
        stats = FeatureStats(m.real_features_sum.detach().cpu().clone(),
                             m.real_features_cov_sum.detach().cpu().clone(),
                             int(m.real_features_num_samples))
        self.metric.reset()
        return stats

    def _load_real(self, stats: FeatureStats) -> None:
        m = self.metric
        m.real_features_sum = stats.feature_sum.to(self.device, torch.float64)
        m.real_features_cov_sum = stats.outer_sum.to(self.device, torch.float64)
        m.real_features_num_samples = torch.tensor(stats.num_samples, device=self.device)

    def _load_fake(self, stats: FeatureStats) -> None:
        m = self.metric
        m.fake_features_sum = stats.feature_sum.to(self.device, torch.float64)
        m.fake_features_cov_sum = stats.outer_sum.to(self.device, torch.float64)
        m.fake_features_num_samples = torch.tensor(stats.num_samples, device=self.device)
        m.orig_dtype = torch.float64  # update() sets this from the features; no update runs here

    def distance(self, *, reference: FeatureStats, generated: torch.Tensor | FeatureStats,
                 batch_size: int = 500) -> float:
        """d² between a reference (real) set and generated uint8 images or their statistics.

        To compare one generated set with several references, compute its `feature_stats` once
        and pass those: the extractor then runs once.
        """
        for label, n in (("reference", reference.num_samples),
                         ("generated", generated.num_samples if isinstance(generated, FeatureStats)
                          else generated.shape[0])):
            if n < 2:
                raise ValueError(f"a Fréchet distance needs at least 2 {label} samples, got {n}")
        m = self.metric
        m.reset()
        self._load_real(reference)
        with warnings.catch_warnings():
            if isinstance(generated, FeatureStats):
                self._load_fake(generated)
                # torchmetrics warns about compute() before update(); the states were set directly.
                warnings.simplefilter("ignore", UserWarning)
            else:
                self._accumulate(generated, real=False, batch_size=batch_size)
            value = float(m.compute())
        m.reset()
        return value
