"""uint8 ↔ [-1, 1] and the PNG grid, against hand-written expectations."""
import numpy as np
import torch
from PIL import Image

from dpdm.utils.images import from_uint8, save_image_grid, to_uint8


def test_uint8_round_trip_and_scale():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = from_uint8(x)
    assert f.dtype == torch.float32 and f.min() == -1.0 and f.max() == 1.0
    assert torch.equal(to_uint8(f), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0, 128, 255], dtype=torch.uint8))


def test_grid_places_each_image_in_row_major_order_between_padding(tmp_path):
    images = torch.stack([torch.full((1, 2, 3), 10 * (i + 1), dtype=torch.uint8) for i in range(5)])
    save_image_grid(images, tmp_path / "g.png", nrow=2, pad=1)
    img = Image.open(tmp_path / "g.png")
    assert img.mode == "L"
    got = np.asarray(img)
    expected = np.zeros((3 * (2 + 1) + 1, 2 * (3 + 1) + 1), dtype=np.uint8)   # 3 rows × 2 columns
    for i in range(5):
        r, c = divmod(i, 2)
        expected[1 + r * 3:1 + r * 3 + 2, 1 + c * 4:1 + c * 4 + 3] = 10 * (i + 1)
    assert np.array_equal(got, expected)


def test_rgb_grid_keeps_its_channels(tmp_path):
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = 200   # red
    save_image_grid(images, tmp_path / "g.png", nrow=2, pad=2)
    img = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert img.shape == (8, 14, 3) and (img[2:6, 2:6] == [200, 0, 0]).all()
