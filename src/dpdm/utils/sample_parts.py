"""Sample sets written batch by batch, so an interrupted dpdm-sample resumes where it stopped.

Sample i depends only on the checkpoint, the sampler, its seed (seed + i) and its label, never on the
batch it was drawn in. So each batch can go to disk as soon as it is drawn, and a later call that asks
for the same checkpoint (by content), sampler, seed and classes starts after the last batch on disk: the
set it ends with is the one an uninterrupted call draws. The batches live in a directory named by a hash
of what drew them, so pieces of another checkpoint or sampler are never mixed in, and nothing is
deleted except the pieces of a set that has just been written whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from dpdm.utils.files import atomic_path

log = logging.getLogger("dpdm.sample")

PARTS_PREFIX = ".parts-"


def parts_dir(out: Path, record: dict) -> Path:
    """Where the batches of the set `record` describes are kept, inside dpdm-sample's `out`."""
    key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(out) / f"{PARTS_PREFIX}{key}"


class SampleParts:
    """The batches drawn so far of one sample set: `drawn(n)` reads them back, `add` stores one more.
    Each batch keeps the seconds it took, so a set drawn over several calls still reports its cost."""

    def __init__(self, out: Path, record: dict):
        self.dir = parts_dir(out, record)
        self.record = record

    def drawn(self, n: int) -> tuple[np.ndarray | None, float]:
        """The first k ≤ n samples already on disk (uint8, k × C × H × W) as one array, None if none, and
        the seconds spent drawing them.

        Only an unbroken run of batches from sample 0 counts: a later batch after a gap is drawn again.
        """
        if not self.dir.is_dir():
            return None, 0.0
        pieces, upto, seconds = [], 0, 0.0
        for start, stop, path in sorted(self._batches()):
            if upto >= n or start > upto:
                break
            if stop <= upto:
                continue
            try:
                with np.load(path) as batch:
                    x, spent = batch["x"], float(batch["seconds"])
            except (OSError, ValueError, EOFError, KeyError) as e:
                # Written atomically, so this is damage from outside; the batch is simply drawn again.
                log.warning("ignoring unreadable batch %s (%s); drawing from sample %d on", path.name,
                            type(e).__name__, upto)
                break
            pieces.append(x[upto - start:])
            seconds += spent * (stop - upto) / (stop - start)
            upto = stop
        if not pieces:
            return None, 0.0
        return np.concatenate(pieces)[:n], seconds

    def add(self, start: int, x: np.ndarray, seconds: float) -> None:
        """Store samples start … start + len(x) − 1, drawn in `seconds`."""
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            (self.dir / "record.json").write_text(json.dumps(self.record, indent=1, sort_keys=True,
                                                             default=str) + "\n")
        with atomic_path(self.dir / f"{start:09d}-{start + len(x):09d}.npz", suffix=".npz") as tmp:
            np.savez(tmp, x=x, seconds=np.float64(seconds))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _batches(self):
        for path in self.dir.glob("*.npz"):
            first, _, last = path.stem.partition("-")
            if first.isdigit() and last.isdigit():
                yield int(first), int(last), path
