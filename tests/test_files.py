"""atomic_path: a file is replaced whole or not at all."""
import os

import pytest

from dpdm.utils.files import atomic_path


def test_a_failed_rewrite_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "result.json"
    with atomic_path(path) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["result.json"]


def test_the_new_file_follows_the_umask_and_keeps_the_requested_suffix(tmp_path):
    with atomic_path(tmp_path / "x.npz", suffix=".npz", durable=True) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        tmp.write_bytes(b"data")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.npz").stat().st_mode & 0o777 == 0o666 & ~umask
