"""The celeba32 path on a tiny fake CelebA written in torchvision's on-disk format (tests/fixtures_celeba.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CelebA

from dpdm.cli import data as data_cli
from dpdm.data import DATASETS, DatasetCorruptError, DatasetMissingError, load_split, prepare
from dpdm.data.cache import celeba_raw_dir
from dpdm.data.datamodule import ImageDataModule
from dpdm.data.sources.celeba import celeba_transform
from tests.fixtures_celeba import HEIGHT, WIDTH, celeba_file_list, write_fake_celeba

N_TRAIN, N_VALID, N_TEST = 16, 4, 4


@pytest.fixture
def fake_celeba(tmp_path, monkeypatch):
    """``<tmp>/raw/celeba/...`` plus the fixture's md5s patched into torchvision's CelebA.file_list."""
    raw = tmp_path / "raw"
    md5s = write_fake_celeba(raw, n_train=N_TRAIN, n_valid=N_VALID, n_test=N_TEST)
    monkeypatch.setattr(CelebA, "file_list", celeba_file_list(md5s))
    return raw


def test_fixture_passes_torchvisions_real_reader(fake_celeba):
    ds = CelebA(str(fake_celeba), split="train", target_type=["attr", "identity", "bbox", "landmarks"])
    assert len(ds) == N_TRAIN and ds.filename[0] == "000001.jpg"
    img, (attr, identity, bbox, landmarks) = ds[3]
    assert img.size == (WIDTH, HEIGHT) and img.mode == "RGB"
    assert attr.shape == (40,) and set(attr.tolist()) <= {0, 1} and len(ds.attr_names) >= 40
    assert bbox.shape == (4,) and landmarks.shape == (10,) and int(identity) > 0
    assert [len(CelebA(str(fake_celeba), split=s, target_type=[])) for s in ("valid", "test", "all")] == [
        N_VALID, N_TEST, N_TRAIN + N_VALID + N_TEST]


def test_transform_crops_the_center_140_and_resizes_to_32():
    # A 178x218 image whose center 140x140 is white and the rest black: the result must be all white.
    array = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    array[39:179, 19:159] = 255
    out = celeba_transform(Image.fromarray(array))
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert (out == 255).all()
    # The inverse: a white frame around a black center. Any border row/column inside the crop
    # (an off-by-one in the crop box) would brighten the edge pixels.
    out = celeba_transform(Image.fromarray(255 - array))
    assert (out == 0).all()
    shifted = np.full_like(array, 255)
    shifted[40:180, 19:159] = 0  # the center moved down by one row: now row 39 is white
    assert celeba_transform(Image.fromarray(shifted))[:, 0, :].max() > 0
    # Grayscale input still yields 3 channels; the channels keep their order.
    gray = celeba_transform(Image.fromarray(np.full((HEIGHT, WIDTH), 7, np.uint8)))
    assert gray.shape == (3, 32, 32) and (gray == 7).all()
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 120, 250
    assert celeba_transform(Image.fromarray(rgb))[:, 16, 16].tolist() == [10, 120, 250]
    with pytest.raises(DatasetCorruptError, match="smaller than the 140x140"):
        celeba_transform(Image.fromarray(np.zeros((100, 178, 3), np.uint8)))


def test_prepare_caches_train_and_test_with_checksums(fake_celeba, tmp_path):
    data_dir = tmp_path / "data"
    out = prepare("celeba32", data_dir=data_dir, raw_dir=fake_celeba, progress=False)
    assert out == (data_dir / "celeba32").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "test.npz", "train.npz"]
    sums = json.loads((out / "checksums.json").read_text())
    assert sums == {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("train.npz", "test.npz")}
    reader = {s: CelebA(str(fake_celeba), split=s, target_type=[]) for s in ("train", "test")}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = load_split("celeba32", split, data_dir=data_dir)
        assert x.dtype == torch.uint8 and x.shape == (n, 3, 32, 32)
        assert y.dtype == torch.int64 and y.tolist() == [-1] * n
        # Same images, in the partition file's order, as torchvision's reader + the transform.
        expected = np.stack([celeba_transform(reader[split][i][0]) for i in range(n)])
        np.testing.assert_array_equal(x.numpy(), expected)
        assert x.float().std() > 10  # not blank
    # The raw folder may also be given as celeba/ itself; an intact cache is not rebuilt.
    assert prepare("celeba32", data_dir=data_dir, raw_dir=fake_celeba / "celeba", progress=False) == out


def test_prepare_from_default_raw_dir_and_datamodule(fake_celeba, tmp_path):
    data_dir = tmp_path / "data"
    (data_dir).mkdir()
    fake_celeba.rename(data_dir / "celeba_raw")
    prepare("celeba32", data_dir=data_dir, progress=False)
    dm = ImageDataModule("celeba32", data_dir=str(data_dir), batch_size=4, eval_batch_size=3)
    dm.setup("fit")
    assert dm.image_shape == (3, 32, 32) and dm.num_classes == 0
    assert dm.num_train == N_TRAIN and dm.sample_rate == pytest.approx(4 / N_TRAIN)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    assert y.tolist() == [-1, -1, -1]


def test_cache_damage_is_detected(fake_celeba, tmp_path):
    prepare("celeba32", data_dir=tmp_path, raw_dir=fake_celeba, progress=False)
    npz = tmp_path / "celeba32" / "train.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x01
    npz.write_bytes(bytes(data))
    with pytest.raises(DatasetCorruptError, match=r"train.npz sha256.*dpdm-data celeba32"):
        load_split("celeba32", "train", data_dir=tmp_path)
    prepare("celeba32", data_dir=tmp_path, raw_dir=fake_celeba, progress=False)  # rebuilt
    assert load_split("celeba32", "train", data_dir=tmp_path)[0].shape == (N_TRAIN, 3, 32, 32)


def test_missing_dataset_says_where_to_put_the_files(tmp_path):
    message = ("CelebA cannot be downloaded automatically: download img_align_celeba.zip and the txt files "
               r"\(list_eval_partition.txt, .*\) from the official site \(https://.*\) into "
               f"{tmp_path / 'celeba_raw' / 'celeba'}/ and run `dpdm-data celeba32 --data-dir {tmp_path}`")
    with pytest.raises(DatasetMissingError, match=message):
        load_split("celeba32", "train", data_dir=tmp_path)
    with pytest.raises(DatasetMissingError, match=message):
        ImageDataModule("celeba32", data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(DatasetMissingError, match="missing in .*img_align_celeba/ .*list_eval_partition.txt"):
        prepare("celeba32", data_dir=tmp_path, progress=False)
    assert not (tmp_path / "celeba32" / "checksums.json").exists()


def test_partial_raw_files_and_bad_md5(fake_celeba, tmp_path):
    (fake_celeba / "celeba" / "list_bbox_celeba.txt").unlink()
    with pytest.raises(DatasetMissingError, match=r"missing in .*: list_bbox_celeba.txt\)"):
        prepare("celeba32", data_dir=tmp_path, raw_dir=fake_celeba, progress=False)
    write_fake_celeba(fake_celeba, n_train=N_TRAIN, n_valid=N_VALID, n_test=N_TEST)  # same seed: same md5s
    attr = fake_celeba / "celeba" / "list_attr_celeba.txt"
    attr.write_text(attr.read_text().replace(" 1", "-1", 1))
    with pytest.raises(DatasetCorruptError, match="list_attr_celeba.txt: md5 does not match"):
        prepare("celeba32", data_dir=tmp_path, raw_dir=fake_celeba, progress=False)
    assert not (tmp_path / "celeba32" / "checksums.json").exists()


def test_real_md5s_reject_the_fixture(tmp_path):
    """Without the patched file_list the fixture's txt files fail torchvision's official md5s."""
    write_fake_celeba(tmp_path / "raw", n_train=2, n_valid=2, n_test=2)
    with pytest.raises(DatasetCorruptError, match="md5 does not match the official file"):
        prepare("celeba32", data_dir=tmp_path, raw_dir=tmp_path / "raw", progress=False)


def test_zip_is_extracted(fake_celeba, tmp_path):
    import shutil

    base = fake_celeba / "celeba"
    shutil.make_archive(str(base / "img_align_celeba"), "zip", root_dir=base, base_dir="img_align_celeba")
    shutil.rmtree(base / "img_align_celeba")
    prepare("celeba32", data_dir=tmp_path, raw_dir=fake_celeba, progress=False)
    assert load_split("celeba32", "test", data_dir=tmp_path)[0].shape == (N_TEST, 3, 32, 32)


def test_missing_image_is_reported(fake_celeba, tmp_path):
    (fake_celeba / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DatasetMissingError, match="000002.jpg"):
        prepare("celeba32", data_dir=tmp_path, raw_dir=fake_celeba, progress=False)


def test_cli_celeba32_with_raw_dir_and_progress(fake_celeba, tmp_path, capsys):
    assert data_cli.main(["celeba32", "--data-dir", str(tmp_path / "d"), "--raw-dir", str(fake_celeba)]) == 0
    captured = capsys.readouterr()
    assert f"celeba32: ready in {tmp_path / 'd' / 'celeba32'}" in captured.out
    assert f"train: {N_TRAIN}/{N_TRAIN} images (100%" in captured.err
    assert "match torchvision's md5s" in captured.err


def test_cli_errors(tmp_path, capsys):
    assert data_cli.main(["celeba32", "--data-dir", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "official site" in err[0] and str(tmp_path / "celeba_raw" / "celeba") in err[0]
    assert data_cli.main(["mnist", "--raw-dir", str(tmp_path)]) == 1
    assert "--raw-dir applies only to celeba32" in capsys.readouterr().err
    assert data_cli.main(["celeba32", "--source", "pypi"]) == 1
    assert "cannot provide celeba32" in capsys.readouterr().err


def test_dataset_info():
    info = DATASETS["celeba32"]
    assert info.image_shape == (3, 32, 32) and info.num_classes == 0
    assert (info.num_train, info.num_test) == (162770, 19962)
    assert Path(celeba_raw_dir(Path("/x"))) == Path("/x/celeba_raw")
