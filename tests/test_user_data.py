"""Your own images (data=image_folder, data=npz): imported into the verified cache, trained on, sampled from;
and every kind of bad data refused with one message, exit 2, and nothing half-written."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpdm.data.user_data import BadDataError, import_user_data, load_user_data
from tests.helpers import run_cli

SIZE = 16
TINY = ["experiment=smoke", "debug=tiny", "data.batch_size=8"]


def _png(path: Path, *, mode: str = "L", size: int = SIZE, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def _folder(root: Path, *, mode: str = "L", per_class: int = 12, classes=("cat", "dog")) -> Path:
    for c in classes:
        for i in range(per_class):
            _png(root / c / f"{i:03d}.png", mode=mode, seed=hash((c, i)) % 2**32)
    return root


def _train(tmp_path: Path, data: list[str], run: str = "run"):
    data_dir = tmp_path / "cache"
    proc = run_cli("dpdm-train", *TINY, *data, f"hydra.run.dir={tmp_path / run}",
                   env={"DPDM_DATA_DIR": str(data_dir)})
    return proc, tmp_path / run, data_dir


def _sample(run_dir: Path, n: int = 4):
    out = run_dir / "drawn"
    proc = run_cli("dpdm-sample", f"ckpt='{run_dir / 'checkpoints' / 'last.ckpt'}'", f"n={n}", f"out={out}",
                   "sampler.num_steps=2", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        return f["x"], f["y"]


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_train_and_sample_on_an_image_folder(tmp_path, mode, channels):
    folder = _folder(tmp_path / "images", mode=mode)
    proc, run_dir, data_dir = _train(tmp_path, ["data=image_folder", f"data.path={folder}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image_folder: imported 24 examples" in proc.stderr and "2 classes" in proc.stderr
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["dataset_size"] == 24 and privacy["sample_rate"] == pytest.approx(8 / 24)  # N = imported
    config = (run_dir / "config.yaml").read_text()
    assert f"img_resolution: {SIZE}" in config and f"in_channels: {channels}" in config  # net followed data
    x, y = _sample(run_dir)
    assert x.shape == (4, channels, SIZE, SIZE) and x.dtype == np.uint8
    assert sorted(set(y.tolist())) == [0, 1]
    (imported,) = (data_dir / "user").iterdir()
    images, labels, meta = load_user_data(imported)
    assert meta.class_names == ("cat", "dog") and labels.tolist() == [0] * 12 + [1] * 12
    first = np.asarray(Image.open(folder / "cat" / "000.png").convert(mode))
    assert np.array_equal(images[0].numpy(), first[None] if mode == "L" else first.transpose(2, 0, 1))


def test_train_and_sample_on_an_npz_file_channels_last_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, SIZE, SIZE, 3), dtype=np.uint8)   # N×H×W×C
    y = np.arange(30) % 3
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    proc, run_dir, data_dir = _train(tmp_path, ["data=npz", f"data.path={tmp_path / 'mine.npz'}",
                                                "data.examples_per_person=2", "privacy.epsilon=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["dataset_size"] == 30 and privacy["privacy_unit"] == "one example"
    eps, delta = privacy["epsilon"], privacy["delta"]   # two images per person: group privacy is reported
    assert privacy["per_person"]["examples_per_person"] == 2
    assert privacy["per_person"]["epsilon"] == pytest.approx(2 * eps)
    assert privacy["per_person"]["delta"] == pytest.approx(delta * (1 + np.exp(eps)))
    assert "per person (2 examples each)" in (run_dir / "train.log").read_text()
    xs, ys = _sample(run_dir, n=6)
    assert xs.shape == (6, 3, SIZE, SIZE) and sorted(set(ys.tolist())) == [0, 1, 2]
    (imported,) = (data_dir / "user").iterdir()
    images, labels, _ = load_user_data(imported)
    assert torch.equal(images, torch.from_numpy(x.transpose(0, 3, 1, 2))) and labels.tolist() == y.tolist()


def test_an_npz_without_labels_trains_an_unconditional_model(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (20, SIZE, SIZE), dtype=np.uint8)   # N×H×W grey
    np.savez(tmp_path / "u.npz", x=x)
    proc, run_dir, _ = _train(tmp_path, ["data=npz", f"data.path={tmp_path / 'u.npz'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "num_classes: 0" in (run_dir / "config.yaml").read_text()
    xs, ys = _sample(run_dir)
    assert xs.shape == (4, 1, SIZE, SIZE) and set(ys.tolist()) == {-1}


def test_resolution_resizes_and_crops_on_import_and_the_same_data_is_imported_once(tmp_path):
    for i in range(4):
        _png(tmp_path / "mixed" / "a" / f"{i}.png", size=20 + 4 * i, seed=i)
    say = []
    first = import_user_data("image_folder", tmp_path / "mixed", data_dir=tmp_path / "c", resolution=12,
                             say=say.append)
    again = import_user_data("image_folder", tmp_path / "mixed", data_dir=tmp_path / "c", resolution=12,
                             say=say.append)
    assert first == again and sum("imported" in m for m in say) == 1
    images, _, meta = load_user_data(first)
    assert images.shape == (4, 1, 12, 12) and meta.resolution == 12
    _png(tmp_path / "mixed" / "a" / "9.png", size=30, seed=9)   # the data changed: a new import
    assert import_user_data("image_folder", tmp_path / "mixed", data_dir=tmp_path / "c", resolution=12,
                            say=say.append) != first


# ---- bad data: one message naming the problem, exit 2, nothing written ----------------------------------

def _bad_folders(tmp_path: Path) -> dict:
    garbage = _folder(tmp_path / "garbage", per_class=3)
    (garbage / "dog" / "broken.png").write_bytes(b"not a png at all")
    truncated = _folder(tmp_path / "truncated", per_class=3)
    t = truncated / "cat" / "000.png"
    t.write_bytes(t.read_bytes()[:60])
    sizes = _folder(tmp_path / "sizes", per_class=3)
    _png(sizes / "dog" / "big.png", size=SIZE * 2)
    modes = _folder(tmp_path / "modes", per_class=3)
    _png(modes / "cat" / "colour.png", mode="RGB")
    empty = _folder(tmp_path / "empty_class", per_class=3)
    (empty / "bird").mkdir()
    np.savez(tmp_path / "negative.npz", x=np.zeros((10, 8, 8), np.uint8), y=np.array([0, 1] * 4 + [-1, 1]))
    np.savez(tmp_path / "floats.npz", x=np.zeros((10, 8, 8), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "negative.npz").read_bytes()[:100])
    return {
        "unreadable file": (["data=image_folder", f"data.path={garbage}"], "broken.png"),
        "truncated file": (["data=image_folder", f"data.path={truncated}"], "000.png"),
        "mixed sizes": (["data=image_folder", f"data.path={sizes}"], "32×32: 1"),
        "mixed modes": (["data=image_folder", f"data.path={modes}"], "mixed grey and colour"),
        "empty class folder": (["data=image_folder", f"data.path={empty}"], "bird has no images"),
        "labels out of range": (["data=npz", f"data.path={tmp_path / 'negative.npz'}"], "1 negative labels"),
        "not uint8": (["data=npz", f"data.path={tmp_path / 'floats.npz'}"], "not uint8"),
        "truncated npz": (["data=npz", f"data.path={tmp_path / 'cut.npz'}"], "cannot read"),
        "no path": (["data=npz"], "needs data.path="),
        "missing path": (["data=image_folder", f"data.path={tmp_path / 'nowhere'}"], "is not a folder"),
    }


CASES = ["unreadable file", "truncated file", "mixed sizes", "mixed modes", "empty class folder",
         "labels out of range", "not uint8", "truncated npz", "no path", "missing path"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_refused_with_one_message_and_nothing_written(tmp_path, case):
    args, expected = _bad_folders(tmp_path)[case]
    proc, run_dir, data_dir = _train(tmp_path, args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert not (data_dir / "user").exists() or not any((data_dir / "user").iterdir())  # cache untouched
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "privacy.json").exists()


def test_too_few_examples_for_the_batch_size_is_refused_before_training(tmp_path):
    folder = _folder(tmp_path / "small", per_class=2)
    proc, run_dir, data_dir = _train(tmp_path, ["data=image_folder", f"data.path={folder}"])
    assert proc.returncode == 2 and "batch_size 8 exceeds the 4 training examples" in proc.stderr, proc.stderr
    assert not (run_dir / "privacy.json").exists()
    (imported,) = (data_dir / "user").iterdir()          # the import itself was fine and is complete
    assert (imported / "checksums.json").is_file()


def test_a_damaged_import_is_reported_with_what_to_do(tmp_path):
    directory = import_user_data("image_folder", _folder(tmp_path / "f", per_class=2), data_dir=tmp_path / "c",
                                 say=lambda m: None)
    (directory / "train.npz").write_bytes(b"damaged")
    with pytest.raises(Exception, match="is damaged.*Delete"):
        load_user_data(directory)


def test_bad_data_error_is_a_dataset_error():
    from dpdm.data import DatasetCorruptError

    assert issubclass(BadDataError, DatasetCorruptError)
