"""The DPDM paper's reported numbers (Dockhorn et al., TMLR 2023), as data, for tables and plots.

Transcribed from the project's summary of the paper (shared/PAPER.md): the headline table (δ = 1e-5,
accuracy in %) and the noise-multiplicity ablation (MNIST, ε = 1). FID and accuracy in the headline
table come from different sampler settings of the same model (the best of each).
"""
from __future__ import annotations

# (dataset, ε) -> {"fid", "logreg", "mlp", "cnn"}; dataset names as in conf/data/.
HEADLINE: dict[tuple[str, float], dict[str, float]] = {
    ("mnist", 0.2): {"fid": 61.9, "logreg": 81.0, "mlp": 81.7, "cnn": 86.3},
    ("mnist", 1.0): {"fid": 23.4, "logreg": 86.7, "mlp": 91.6, "cnn": 95.3},
    ("mnist", 10.0): {"fid": 5.01, "logreg": 90.8, "mlp": 94.8, "cnn": 98.1},
    ("fashion_mnist", 0.2): {"fid": 78.4, "logreg": 70.4, "mlp": 71.3, "cnn": 72.3},
    ("fashion_mnist", 1.0): {"fid": 37.8, "logreg": 76.3, "mlp": 76.9, "cnn": 79.4},
    ("fashion_mnist", 10.0): {"fid": 18.6, "logreg": 81.1, "mlp": 83.0, "cnn": 86.2},
}

# Noise multiplicity K -> (FID, CNN accuracy %), MNIST ε = 1 (the paper's ablation).
K_ABLATION_MNIST_EPS1: dict[int, tuple[float, float]] = {
    1: (76.9, 91.7), 2: (60.1, 93.1), 4: (57.1, 92.8), 8: (44.8, 94.1), 16: (36.9, 94.2), 32: (34.8, 94.4),
}

# DP-SGD CNN classifiers trained directly on the real data (the baseline the synthetic data beats).
DP_CNN_ON_REAL: dict[tuple[str, float], float] = {
    ("mnist", 0.2): 69.9, ("mnist", 1.0): 88.2, ("mnist", 10.0): 96.4,
    ("fashion_mnist", 0.2): 59.5, ("fashion_mnist", 1.0): 70.5, ("fashion_mnist", 10.0): 77.1,
}


def headline(dataset: str, epsilon: float) -> dict[str, float] | None:
    """The paper's row for (dataset, ε), or None where the paper reports none."""
    return HEADLINE.get((dataset, float(epsilon)))
