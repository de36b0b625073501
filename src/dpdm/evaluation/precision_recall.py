"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of generated features against real ones.

Each set of feature vectors stands for a manifold: the union of balls around its points, each ball reaching
the point's k-th nearest neighbour within the same set. *Precision* is the share of generated points inside
the real manifold (fidelity); *recall* the share of real points inside the generated manifold (variety).
A Fréchet distance folds both into one number; these two keep fidelity and variety apart.
"""
from __future__ import annotations

import torch

__all__ = ["class_precision_recall", "covered", "knn_radii", "precision_recall"]


def knn_radii(features: torch.Tensor, *, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """Distance from each row of `features` to its k-th nearest neighbour among the other rows."""
    n = len(features)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    out = torch.empty(n, dtype=features.dtype)
    for start in range(0, n, batch_size):
        d = torch.cdist(features[start:start + batch_size], features)
        # The point itself is at distance 0, the smallest: the k-th neighbour is the (k+1)-th smallest.
        out[start:start + batch_size] = d.kthvalue(k + 1, dim=1).values
    return out


def covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, *,
            batch_size: int = 1000) -> torch.Tensor:
    """Whether each of `points` lies in at least one ball (centres[j], radii[j]) (boundary included)."""
    hits = torch.empty(len(points), dtype=torch.bool)
    for start in range(0, len(points), batch_size):
        d = torch.cdist(points[start:start + batch_size], centres)
        hits[start:start + batch_size] = (d <= radii.unsqueeze(0)).any(dim=1)
    return hits


def precision_recall(real: torch.Tensor, generated: torch.Tensor, *, k: int = 3,
                     batch_size: int = 1000) -> tuple[float, float]:
    """(precision, recall) of `generated` against `real`, both (n, d) feature matrices."""
    real, generated = real.double(), generated.double()
    precision = covered(generated, real, knn_radii(real, k=k, batch_size=batch_size), batch_size=batch_size)
    recall = covered(real, generated, knn_radii(generated, k=k, batch_size=batch_size), batch_size=batch_size)
    return precision.double().mean().item(), recall.double().mean().item()


def class_precision_recall(real: torch.Tensor, real_labels: torch.Tensor, generated: torch.Tensor,
                           generated_labels: torch.Tensor, *, num_classes: int, k: int = 3,
                           batch_size: int = 1000) -> tuple[float, float]:
    """Precision and recall within each class (class-y samples against real class-y images), averaged over
    the classes: a class-conditional generator's variety inside each class, which the pooled figures mix
    with how the classes are laid out."""
    precisions, recalls = [], []
    for c in range(num_classes):
        r, g = real[real_labels == c], generated[generated_labels == c]
        if len(r) <= k or len(g) <= k:
            raise ValueError(f"class {c}: {len(r)} real and {len(g)} generated points; each needs more than k={k}")
        p, rec = precision_recall(r, g, k=k, batch_size=batch_size)
        precisions.append(p)
        recalls.append(rec)
    return sum(precisions) / num_classes, sum(recalls) / num_classes
