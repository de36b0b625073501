"""Fréchet distances: torchmetrics' FID code path against an independent numpy/scipy computation on the
same features (a small frozen extractor), cached reference statistics, and FID's offline behaviour.
"""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from dpdm.evaluation import (
    EvalSettings,
    Evaluator,
    FIDUnavailable,
    FrechetDistance,
    LabeledImages,
    cached_feature_stats,
    resolve_inception_weights,
)
from dpdm.evaluation.inception import INCEPTION_FILENAMES, INCEPTION_SHA256, INCEPTION_URL
from dpdm.evaluation.real_classifier import ClassifierFeatures
from dpdm.nets.classifiers import CNN


class FrozenExtractor(nn.Module):
    """uint8 (N, 1, 28, 28) → 12 features; fixed random weights, float64 out."""

    num_features = 12

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(4 * 8 * 8, self.num_features)).requires_grad_(False)

    def forward(self, x):
        return 10 * self.net(x.float() / 255).double()


def _frechet_numpy(f1: np.ndarray, f2: np.ndarray) -> float:
    """Heusel et al.'s formula with scipy's matrix square root (the pytorch-fid / TTUR recipe)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _images(n, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


@pytest.fixture
def fd():
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetDistance(metric=FrechetInceptionDistance(feature=FrozenExtractor()))


def test_distance_matches_numpy_scipy_on_the_same_features(fd):
    real, fake = _images(300, 0, 256, 1), _images(200, 0, 96, 2)
    extractor = FrozenExtractor()
    expected = _frechet_numpy(extractor(real).numpy(), extractor(fake).numpy())
    reference = fd.feature_stats(real, batch_size=64)
    got_from_images = fd.distance(reference=reference, generated=fake, batch_size=50)
    got_from_stats = fd.distance(reference=reference, generated=fd.feature_stats(fake))
    assert expected > 0.1
    assert got_from_images == pytest.approx(expected, rel=1e-6)
    assert got_from_stats == pytest.approx(expected, rel=1e-6)
    # Same distribution → small; a set against itself → 0.
    assert fd.distance(reference=reference, generated=real) == pytest.approx(0, abs=1e-6)


def test_stats_are_the_sufficient_statistics(fd):
    real = _images(100, 0, 256, 3)
    feats = FrozenExtractor()(real).numpy()
    s = fd.feature_stats(real)
    assert s.num_samples == 100
    np.testing.assert_allclose(s.mean.numpy(), feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(s.cov.numpy(), np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)


def test_cached_reference_gives_the_same_distance(fd, tmp_path):
    real, fake = _images(150, 0, 256, 4), _images(120, 0, 128, 5)
    path = tmp_path / "ref.npz"
    first = cached_feature_stats(path=path, compute=lambda: fd.feature_stats(real), extractor="frozen")
    assert path.is_file()

    def must_not_run():
        raise AssertionError("cached statistics were recomputed")

    second = cached_feature_stats(path=path, compute=must_not_run)
    assert fd.distance(reference=first, generated=fake) == fd.distance(reference=second, generated=fake)
    assert str(np.load(path)["meta_extractor"]) == "frozen"


def test_too_few_samples_is_an_error(fd):
    ref = fd.feature_stats(_images(10, 0, 256, 6))
    with pytest.raises(ValueError, match="at least 2"):
        fd.distance(reference=ref, generated=_images(1, 0, 256, 7))


def test_classifier_features_are_frozen_and_typed():
    feats = ClassifierFeatures(CNN())
    feats.train()  # torchmetrics / Lightning may call train(); dropout must stay off
    assert not feats.training and feats.num_features == 128
    x = _images(4, 0, 256, 8)
    out = feats(x)
    assert out.dtype == torch.float64 and out.shape == (4, 128)
    assert torch.equal(out, feats(x))


# ---- FID proper: the standard weights or nothing ----------------------------------------------------

def test_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FIDUnavailable) as e:
        resolve_inception_weights(download=False)
    msg = str(e.value)
    assert "FID unavailable" in msg and INCEPTION_URL in msg and "fid.weights_path=" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    with pytest.raises(FIDUnavailable, match="nope.pth"):
        resolve_inception_weights(weights_path=tmp_path / "nope.pth")  # an explicit path never downloads
    offline = (tmp_path / "unreachable.pth").as_uri()                   # what an offline download meets
    with pytest.raises(FIDUnavailable, match="Downloading .* failed") as e:
        resolve_inception_weights(url=offline)
    assert "fid.weights_path=" in str(e.value)
    assert not any((tmp_path / "torch_home" / "hub" / "checkpoints").iterdir())   # nothing half-written


def test_weights_are_downloaded_into_the_hub_cache_once_and_kept_only_if_standard(tmp_path, monkeypatch):
    """Served from a local file:// URL: a file whose sha256 is not the standard one is deleted; the standard
    one (here: this test's file, made standard by patching the expected digest) is kept in the torch hub
    cache under the standard name and found there next time without downloading."""
    import dpdm.evaluation.inception as inception
    from dpdm.utils.checksums import sha256_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served" / "weights.pth"
    served.parent.mkdir()
    served.write_bytes(b"pretend these are the 2015-12-05 Inception weights")
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(FIDUnavailable, match="it was deleted"):
        resolve_inception_weights(url=served.as_uri())
    assert not any(hub.iterdir())
    monkeypatch.setattr(inception, "INCEPTION_SHA256", sha256_file(served))
    got = resolve_inception_weights(url=served.as_uri())
    assert got == hub / INCEPTION_FILENAMES[0] and got.read_bytes() == served.read_bytes()
    served.unlink()
    assert resolve_inception_weights(url=served.as_uri()) == got   # cached: no second download


def test_weights_found_in_the_hub_cache_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAMES[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the inception weights")
    with pytest.raises(FIDUnavailable, match="not the standard Inception-v3 file") as e:
        resolve_inception_weights()
    assert INCEPTION_SHA256 in str(e.value)
    assert resolve_inception_weights(verify=False) == cached


def test_evaluator_reports_fid_unavailable_and_never_substitutes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    settings = EvalSettings.from_dict({"metrics": ["fid"], "cache_dir": str(tmp_path / "cache"),
                                       "fid": {"url": (tmp_path / "offline.pth").as_uri()}})
    evaluator = Evaluator(dataset="mnist", settings=settings)
    samples = LabeledImages(_images(20, 0, 256, 9), torch.arange(20) % 10)
    report = evaluator.evaluate(samples)
    assert "fid" in report.unavailable and "fid.weights_path=" in report.unavailable["fid"]
    assert not any(k.startswith("eval/fid") for k in report.metrics)
    assert report.unavailable == evaluator.evaluate(samples).unavailable  # looked up once, same answer


def test_settings_refuse_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        EvalSettings.from_dict({"fid": {"weight_path": "x"}})
    with pytest.raises(ValueError, match="unknown metrics"):
        EvalSettings.from_dict({"metrics": ["is"]})


def _random_inception_weights(path):
    """A state dict of the right architecture with random weights (the real file cannot be fetched here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, tf_inception.load_state_dict_from_url
    try:
        cls.load_state_dict = lambda self, sd, *a, **k: None
        tf_inception.load_state_dict_from_url = lambda *a, **k: {}
        torch.manual_seed(0)
        model = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, tf_inception.load_state_dict_from_url = original_load, original_url
    torch.save(model.state_dict(), path)


def test_inception_code_path_runs_on_grey_images(tmp_path):
    """torchmetrics' Inception route end to end (weights file → 2048 features → FID) with *random*
    weights and verification off: checks the plumbing only, never a meaningful FID."""
    pytest.importorskip("torch_fidelity")
    from dpdm.evaluation import inception_frechet_distance

    weights = tmp_path / "random_inception.pth"
    _random_inception_weights(weights)
    path = resolve_inception_weights(weights_path=weights, verify=False)
    fd = inception_frechet_distance(weights_path=path)
    ref = fd.feature_stats(_images(6, 0, 256, 10), batch_size=3)
    assert ref.feature_sum.shape == (2048,)
    value = fd.distance(reference=ref, generated=_images(6, 50, 100, 11), batch_size=3)
    assert np.isfinite(value) and value > 0
