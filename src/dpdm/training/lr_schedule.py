"""Learning-rate decay over a run's planned steps, as the factor of a torch LambdaLR.

A short DP run has two wants that one constant lr cannot meet: a high lr early, to cover the data in a few
hundred steps, and a low lr late, because every DP-Adam update carries noise of a size proportional to the
lr and the last updates are the ones the sampled weights keep. The decay runs over the steps the privacy
plan was calibrated for (public: the config, not the data, decides them), so a resumed run continues the
same curve; LambdaLR's state, saved with the checkpoint, holds the step it reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LR_SCHEDULES = ("constant", "cosine", "linear")


def check_lr_schedule(kind: str, final_fraction: float) -> None:
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule.kind={kind!r} is not one of {', '.join(LR_SCHEDULES)}")
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"lr_schedule.final_fraction={final_fraction} must be in (0, 1]: the last step's lr "
                         "as a fraction of optim.lr (1 keeps it constant)")


@dataclass
class LrDecay:
    """lr_t / lr_0 = f + (1 − f)·s(t/T), with s the cosine half-wave ½(1 + cos πu) or the line 1 − u.

    A callable object, not a closure: LambdaLR saves the fields of such objects in its state_dict.
    """
    kind: str
    total_steps: int
    final_fraction: float

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        u = min(max(step, 0), self.total_steps) / max(self.total_steps, 1)
        shape = 0.5 * (1.0 + math.cos(math.pi * u)) if self.kind == "cosine" else 1.0 - u
        return self.final_fraction + (1.0 - self.final_fraction) * shape


def make_lr_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int,
                      final_fraction: float) -> torch.optim.lr_scheduler.LambdaLR | None:
    """None for a constant lr, so runs that do not decay carry no scheduler state."""
    check_lr_schedule(kind, final_fraction)
    if kind == "constant" or final_fraction == 1.0:
        return None
    if total_steps < 1:
        raise ValueError(f"an lr decay needs the run's planned steps, got {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrDecay(kind, int(total_steps), float(final_fraction)))
