"""The downstream protocol: the paper's classifiers, selection on held-out synthetic data, sanity anchors.

Anchors: a CNN trained on all 60,000 real MNIST images reaches ≥ 98.5% on the real test set (slow), and
the same CNN trained on pure noise scores near chance (10%).
"""
import time

import pytest
import torch

from dpdm.data import load_split
from dpdm.evaluation import downstream as ds
from dpdm.evaluation.downstream import LabeledImages, TrainSettings, evaluate_downstream, split_held_out
from dpdm.evaluation.real_classifier import RealClassifierSettings, load_or_train_real_classifier
from dpdm.nets.classifiers import CNN, MLP, LogReg, make_classifier


@pytest.fixture(scope="module")
def mnist():
    return {s: LabeledImages(*load_split("mnist", s)) for s in ("train", "test")}


def _num_params(m):
    return sum(p.numel() for p in m.parameters())


def test_architectures_are_the_papers():
    assert _num_params(LogReg()) == 784 * 10 + 10
    assert _num_params(MLP()) == (784 * 100 + 100) + (100 * 10 + 10)
    cnn = CNN()
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in cnn.modules() if isinstance(m, torch.nn.Linear)]
    drops = [m for m in cnn.modules() if isinstance(m, torch.nn.Dropout)]
    assert [c.out_channels for c in convs] == [32, 64, 128] and all(c.kernel_size == (3, 3) for c in convs)
    assert [(m.in_features, m.out_features) for m in linears] == [(1152, 128), (128, 10)]
    assert len(drops) == 3 and all(d.p == 0.5 for d in drops)
    x = torch.randn(5, 1, 28, 28)
    assert cnn(x).shape == (5, 10) and cnn.features(x).shape == (5, CNN.num_features)
    with pytest.raises(ValueError, match="unknown classifier"):
        make_classifier("resnet")


def test_held_out_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(1000) % 10
    images = torch.arange(1000, dtype=torch.int64).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    data = LabeledImages(images.contiguous(), labels)
    train, val = split_held_out(data, size=200, seed=3)
    assert len(train) == 800 and len(val) == 200
    assert torch.bincount(val.labels, minlength=10).tolist() == [20] * 10
    again = split_held_out(data, size=200, seed=3)[1]
    assert torch.equal(again.images, val.images)
    with pytest.raises(ValueError, match="hold out"):
        split_held_out(data, size=1000)


def test_selection_uses_held_out_data_and_touches_the_test_set_once(mnist, monkeypatch):
    real = mnist["train"].subset(torch.arange(3000))
    train, val = split_held_out(real, size=500, seed=0)
    test = mnist["test"].subset(torch.arange(2000))
    seen = []
    original = ds.accuracy
    monkeypatch.setattr(ds, "accuracy", lambda model, data, **kw: seen.append(data) or original(model, data, **kw))
    lines = []
    results = evaluate_downstream(train=train, val=val, test=test, classifiers=("logreg", "mlp"),
                                  settings=TrainSettings(max_epochs=10), log=lines.append)
    assert sum(d is test for d in seen) == 2                     # once per classifier, after selection
    assert sum(d is val for d in seen) == 20                     # every epoch of each classifier
    for name, r in results.items():
        assert r.best_epoch == 1 + max(range(10), key=lambda i: r.val_history[i])
        assert r.val_acc == max(r.val_history)
        assert r.test_acc > 0.75                                 # real → real positive control (chance: 0.1)
        # progress: one line per epoch with its held-out accuracy, then the kept epoch's test accuracy
        mine = [x for x in lines if x.startswith(f"downstream {name}:")]
        assert len(mine) == 11 and f"epoch 3/10, held-out synthetic accuracy {r.val_history[2]:.4f}" in mine[2]
        assert mine[-1] == f"downstream {name}: epoch {r.best_epoch} kept, {r.test_acc:.4f} on the real test set"


def test_cnn_trained_on_noise_is_near_chance(mnist):
    gen = torch.Generator().manual_seed(0)
    noise = LabeledImages(torch.randint(0, 256, (2000, 1, 28, 28), dtype=torch.uint8, generator=gen),
                          torch.arange(2000) % 10)
    train, val = split_held_out(noise, size=400)
    result = evaluate_downstream(train=train, val=val, test=mnist["test"], classifiers=("cnn",),
                                 settings=TrainSettings(max_epochs=2))["cnn"]
    assert result.test_acc < 0.2, result


def test_classifier_training_leaves_the_global_rng_alone(mnist):
    # Callbacks train classifiers in the middle of a diffusion run: its RNG stream must not move.
    data = mnist["train"].subset(torch.arange(256))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_downstream(train=data, val=data, test=data, classifiers=("cnn",),
                        settings=TrainSettings(max_epochs=1, seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_results_do_not_depend_on_the_global_seed(mnist):
    data = mnist["train"].subset(torch.arange(256))
    accs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        r = evaluate_downstream(train=data, val=data, test=data, classifiers=("mlp",),
                                settings=TrainSettings(max_epochs=1, seed=7))["mlp"]
        accs.append((r.val_acc, r.test_acc))
    assert accs[0] == accs[1]


@pytest.mark.slow
def test_cnn_on_60000_real_mnist_reaches_98_5_percent(mnist, tmp_path):
    """The protocol's sanity anchor, and the default real-data CNN behind fd_classifier (~10 epochs)."""
    t0 = time.time()
    clf = load_or_train_real_classifier(dataset="mnist", train=mnist["train"], test=mnist["test"],
                                        cache_dir=tmp_path, settings=RealClassifierSettings())
    print(f"\nreal-data CNN: {len(mnist['train'])} images, {RealClassifierSettings().max_epochs} epochs, "
          f"test accuracy {clf.test_acc:.4f}, {time.time() - t0:.0f}s")
    assert len(mnist["train"]) == 60000
    assert clf.test_acc >= 0.985
    # Cached: a second call loads the same weights instead of training.
    again = load_or_train_real_classifier(dataset="mnist", train=mnist["train"], test=mnist["test"],
                                          cache_dir=tmp_path, settings=RealClassifierSettings())
    assert again.weights_sha256 == clf.weights_sha256 and again.test_acc == clf.test_acc
