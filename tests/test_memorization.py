"""Memorization report: nearest-neighbour distances against brute force, and its verdict on a generator that
copies training images versus one whose samples are fresh draws from the data distribution."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpdm.cli.audit import main
from dpdm.evaluation.memorization import memorization_report, nearest_distances


def _images(n, seed, shape=(1, 8, 8)):
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_nearest_distances_match_brute_force_across_chunks():
    q, ref = _images(30, 0, (1, 5, 5)), _images(100, 1, (1, 5, 5))
    ref[17] = q[3]  # an exact copy: distance 0
    got = nearest_distances(q, ref, k=3, query_chunk=7, reference_chunk=13).numpy()
    a = q.reshape(30, -1).numpy().astype(np.float64) / 255
    b = ref.reshape(100, -1).numpy().astype(np.float64) / 255
    full = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(got, np.sort(full, axis=1)[:, :3], rtol=1e-10, atol=1e-7)
    assert got[3, 0] < 1e-6


def test_copying_generator_is_flagged_and_fresh_samples_are_not():
    train, heldout, fresh = _images(3000, 0), _images(1000, 1), _images(1000, 2)
    g = torch.Generator().manual_seed(3)
    picks = torch.randint(0, 3000, (500,), generator=g)
    jitter = torch.randint(-2, 3, (500, 1, 8, 8), generator=g)
    copies = (train[picks].int() + jitter).clamp(0, 255).to(torch.uint8)  # training images + tiny noise

    copied = memorization_report(copies, train, heldout)
    assert copied.fraction_below_threshold > 0.99
    assert copied.samples_ratio["median"] < 0.1 < copied.heldout_ratio["min"]

    honest = memorization_report(fresh, train, heldout)
    assert honest.fraction_below_threshold < 0.04  # ≈ 1% by exchangeability with the held-out images
    assert honest.samples_to_train["median"] == pytest.approx(honest.heldout_to_train["median"], rel=0.02)
    assert honest.threshold == copied.threshold == pytest.approx(np.quantile(
        nearest_distances(heldout, train, k=1)[:, 0].numpy(), 0.01))


def test_cli_flags_copies_of_mnist_training_images(tmp_path, capsys):
    from dpdm.data import load_split

    train, _ = load_split("mnist", "train")
    x = train[:20].numpy().copy()
    x[:, :, 0, 0] ^= 1  # not bit-identical copies
    path = tmp_path / "samples.npz"
    np.savez(path, x=x, y=np.full(20, -1, dtype=np.int64), dataset=np.array("mnist"))
    out = tmp_path / "report.json"
    assert main(["memorization", "--samples", str(path), "--n-heldout", "100", "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["dataset"] == "mnist" and printed["num_train"] == 60000 and printed["num_heldout"] == 100
    assert printed["fraction_below_threshold"] == 1.0


def test_cli_user_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["memorization", "--samples", str(tmp_path / "missing.npz")])
    assert e.value.code == 2
    path = tmp_path / "samples.npz"
    np.savez(path, x=np.zeros((2, 1, 28, 28), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(SystemExit) as e:
        main(["memorization", "--samples", str(path)])  # no dataset stored, none given
    assert e.value.code == 2
    assert "--dataset" in capsys.readouterr().err


def test_run_option_compares_with_the_subset_the_run_trained_on(tmp_path, capsys):
    # A proxy run trains on a seeded subset; its samples must be measured against those images, or copies
    # of them hide among the 60,000 (a copy's nearest neighbour is found either way, but the yardstick and
    # num_train describe another training set).
    from dpdm.data import ImageDataModule

    dm = ImageDataModule("mnist", batch_size=10, subset_size=500, seed=3, poisson_sampling=False)
    dm.setup("fit")
    seen = dm.train_set.images.numpy()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 3\ndata:\n  name: mnist\n  subset_size: 500\n  seed: ${seed}\n")
    copies = seen[:40].copy()
    copies[:, :, 0, 0] ^= 1
    path = tmp_path / "samples.npz"
    np.savez(path, x=copies, y=np.full(40, -1, dtype=np.int64), dataset=np.array("mnist"))
    assert main(["memorization", "--samples", str(path), "--run", str(run), "--n-heldout", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_train"] == 500 and report["run"] == str(run)
    assert report["fraction_below_threshold"] == 1.0
    # Held-out images are far from 500 training images: the yardstick is that set's, not the full split's.
    assert main(["memorization", "--samples", str(path), "--n-heldout", "200", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["num_train"] == 60000 and full["threshold"] < report["threshold"]


def test_run_option_refuses_a_run_of_another_dataset(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  name: fashion_mnist\n  subset_size: null\n  seed: 0\n")
    path = tmp_path / "samples.npz"
    np.savez(path, x=np.zeros((2, 1, 28, 28), np.uint8), y=np.zeros(2, np.int64), dataset=np.array("mnist"))
    with pytest.raises(SystemExit) as e:
        main(["memorization", "--samples", str(path), "--run", str(run)])
    assert e.value.code == 2
    assert "fashion_mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["memorization", "--samples", str(path), "--run", str(tmp_path / "nowhere")])
    assert e.value.code == 2
    assert "config.yaml" in capsys.readouterr().err
