"""Drawing the synthetic evaluation set: class-balanced, seeded per sample, plus a held-out part.

`sample_fn(seeds, labels)` is whatever draws uint8 images for a list of seeds (the CLI wraps
`dpdm.cli.sample.draw_samples`, the callbacks `pl_module.sample`), so this works for both.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dpdm.diffusion.samplers import sample_in_batches
from dpdm.evaluation.downstream import LabeledImages

__all__ = ["SampleFn", "draw_synthetic_set", "samples_from_npz"]

SampleFn = Callable[[Sequence[int], "torch.Tensor | None"], torch.Tensor]


def draw_synthetic_set(sample_fn: SampleFn, *, num_samples: int, num_held_out: int, num_classes: int,
                       seed: int = 0, batch_size: int = 500) -> tuple[LabeledImages, LabeledImages | None]:
    """(samples, held-out) with sample i drawn from seed + i; labels cycle through the classes.

    The held-out set (model selection of the downstream classifiers) continues the same seed and
    label sequence after the first `num_samples`, so both parts are class-balanced when their sizes
    are multiples of `num_classes`. Unconditional models (`num_classes == 0`) get labels −1 and no
    held-out set.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    total = num_samples + (num_held_out if num_classes > 0 else 0)
    labels = torch.arange(total) % num_classes if num_classes > 0 else None
    images = sample_in_batches(sample_fn, n=total, labels=labels, seed=seed, batch_size=batch_size)
    y = labels if labels is not None else torch.full((total,), -1, dtype=torch.int64)
    samples = LabeledImages(images[:num_samples], y[:num_samples])
    if total == num_samples:
        return samples, None
    return samples, LabeledImages(images[num_samples:], y[num_samples:])


def samples_from_npz(path) -> tuple[LabeledImages, str | None]:
    """A dpdm-sample `samples.npz` (x uint8 N×C×H×W, y int64, −1 = unconditional) and its dataset, if stored."""
    import numpy as np

    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"{path} is not a dpdm-sample file: it needs arrays x (uint8 N×C×H×W) and y "
                             f"(int64), found {sorted(f.files)}")
        x, y = f["x"], f["y"]
        dataset = str(f["dataset"]) if "dataset" in f else None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{path}: x must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{path}: y must have shape ({x.shape[0]},), got {y.shape}")
    return LabeledImages(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))), dataset
