"""Improved precision and recall (Kynkäänniemi et al. 2019) against a direct transcription of the
definition (numpy, one point at a time), on cases whose answer is known, and per class."""
import numpy as np
import pytest
import torch

from dpdm.evaluation.precision_recall import class_precision_recall, knn_radii, precision_recall


def _reference(real: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    """precision = mean over g of [∃ r: |g − r| ≤ NND_k(r)], recall the same with the roles swapped."""
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])   # [0] is the point itself

    def inside(points, centres, rad):
        return np.mean([any(np.linalg.norm(c - p) <= r for c, r in zip(centres, rad, strict=True))
                        for p in points])

    return inside(gen, real, radii(real)), inside(real, gen, radii(gen))


@pytest.mark.parametrize("k", [1, 3])
def test_matches_the_definition_on_overlapping_clouds(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(120, 5))
    gen = 0.6 * rng.normal(size=(90, 5)) + 1.0      # narrower and shifted: precision and recall both < 1
    want = _reference(real, gen, k)
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(gen), k=k, batch_size=17)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.05 < want[0] < 0.999 and 0.05 < want[1] < 0.999


def test_known_answers():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # Mode collapse: every sample is (nearly) one real image. All of them look real; they cover almost
    # none of the real set.
    collapsed = x[:1] + 1e-6 * torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    precision, recall = precision_recall(x, collapsed)
    assert precision == 1.0 and recall < 0.05


def test_knn_radii_excludes_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(x, k=4)


def test_class_figures_are_the_mean_of_each_class_alone():
    g = torch.Generator().manual_seed(2)
    real, gen = torch.randn(300, 4, generator=g), torch.randn(240, 4, generator=g) * 0.7
    real_y, gen_y = torch.arange(300) % 3, torch.arange(240) % 3
    per_class = [precision_recall(real[real_y == c], gen[gen_y == c]) for c in range(3)]
    want = tuple(float(np.mean([pc[i] for pc in per_class])) for i in (0, 1))
    assert class_precision_recall(real, real_y, gen, gen_y, num_classes=3) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="class 0"):
        class_precision_recall(real, real_y, gen[:6], gen_y[:6], num_classes=3)
