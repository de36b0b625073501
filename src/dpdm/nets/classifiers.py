"""Downstream classifiers of the DPDM evaluation protocol (Dockhorn et al. 2023, Sec. 5 / App. D).

The same three models the paper (and GS-WGAN / DP-Sinkhorn before it) trains on synthetic data:
logistic regression (784 → 10), an MLP (784-100-10) and a small CNN (3×3 convolutions with 32/64/128
channels, 2×2 max-pooling, dropout 0.5, then 1152-128-10). Inputs are float images in [-1, 1],
shape (N, 1, 28, 28); outputs are logits.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CLASSIFIERS", "CNN", "LogReg", "MLP", "make_classifier"]


class LogReg(nn.Module):
    """Multinomial logistic regression on raw pixels (784 → 10)."""

    def __init__(self, *, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """One hidden layer of 100 ReLU units (784-100-10)."""

    def __init__(self, *, in_features: int = 784, hidden: int = 100, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Three unpadded 3×3 convolutions (32, 64, 128 channels); 28 → 26 → 13 → 11 → 5 → 3, so 128·3·3 = 1152.

    Pooling follows the first two convolutions and dropout 0.5 follows each pooled block and the hidden
    layer. `features` returns the 128-d hidden layer (after ReLU, before dropout): the feature space
    of the classifier-feature Fréchet distance.
    """

    num_features = 128  # torchmetrics reads this instead of probing the module with a dummy image

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(1152, self.num_features), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


CLASSIFIERS: dict[str, type[nn.Module]] = {"logreg": LogReg, "mlp": MLP, "cnn": CNN}


def make_classifier(name: str, *, num_classes: int = 10) -> nn.Module:
    """A fresh classifier by protocol name (`logreg`, `mlp`, `cnn`)."""
    try:
        cls = CLASSIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}") from None
    return cls(num_classes=num_classes)
