"""Independent random streams derived from one seed (per rank of a data-parallel run)."""
from __future__ import annotations

import numpy as np


def derived_seed(*entropy: int) -> int:
    """A 63-bit seed for a torch.Generator from integers (e.g. a base seed and a rank).

    numpy's SeedSequence hashes its entropy, so seeds from different tuples give statistically
    independent streams (unlike base + rank, whose Mersenne-Twister streams are merely different).
    """
    words = [int(e) % 2**64 for e in entropy]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
