"""Seeds: from OS entropy (what the privacy guarantee needs), and independent streams derived from one
seed (per rank of a data-parallel run)."""
from __future__ import annotations

import os

import numpy as np


def os_seed() -> int:
    """A 62-bit seed from OS entropy, unpredictable to an adversary (the DP noise, the Poisson sampler).

    62 bits: callers may add small offsets, and torch seeds must stay below 2**64.
    """
    return int.from_bytes(os.urandom(8), "little") >> 2


def derived_seed(*entropy: int) -> int:
    """A 63-bit seed for a torch.Generator from integers (e.g. a base seed and a rank).

    numpy's SeedSequence hashes its entropy, so seeds from different tuples give statistically
    independent streams (unlike base + rank, whose Mersenne-Twister streams are merely different).
    """
    words = [int(e) % 2**64 for e in entropy]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
