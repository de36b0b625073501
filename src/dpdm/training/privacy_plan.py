"""The DP-SGD mechanism a run will execute, fixed before training: q, σ, C, steps.

Planned steps = epochs × ⌊1/q⌋, the number of batches Opacus' Poisson loader yields per epoch, or fewer
when the trainer stops earlier (`trainer.max_steps`, for runs sized by time rather than epochs); σ is
calibrated for exactly those steps. `max_steps` is the budget guard: the largest step count whose ε
stays within the target. Resuming recomputes the plan and must find the same mechanism.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dpdm.privacy.accounting import calibrate_noise_multiplier, max_steps_within_budget


@dataclass(frozen=True)
class PrivacyPlan:
    enabled: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    steps_per_epoch: int
    planned_steps: int
    max_steps: int
    noise_multiplicity: int
    accountant: str
    dataset_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def steps_per_epoch(sample_rate: float) -> int:
    return int(1 / sample_rate)


def make_privacy_plan(*, enabled: bool, epsilon: float, delta: float, max_grad_norm: float,
                      accountant: str, noise_multiplier: float | None, batch_size: int,
                      dataset_size: int, epochs: int, noise_multiplicity: int,
                      step_limit: int | None = None) -> PrivacyPlan:
    if batch_size < 1 or batch_size > dataset_size:
        raise ValueError(f"data.batch_size={batch_size} must be between 1 and the dataset size "
                         f"({dataset_size}): Poisson sampling needs a rate q = B/N in (0, 1].")
    if noise_multiplicity < 1:
        raise ValueError(f"loss.noise_multiplicity must be >= 1, got {noise_multiplicity}")
    if epochs < 1:
        raise ValueError(f"trainer.max_epochs must be >= 1 for a planned DP run, got {epochs}")
    q = batch_size / dataset_size
    spe = steps_per_epoch(q)
    planned = epochs * spe
    if step_limit is not None and step_limit >= 0:  # Lightning's max_steps (-1: no limit)
        if step_limit == 0:
            raise ValueError("trainer.max_steps=0 trains nothing; use -1 (no limit) or a positive count")
        planned = min(planned, int(step_limit))
    if not enabled:
        return PrivacyPlan(False, float("inf"), 0.0, 0.0, 0.0, q, batch_size, spe, planned, planned,
                           noise_multiplicity, "none", dataset_size)
    if epsilon <= 0:
        raise ValueError(f"privacy.epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1.0 / dataset_size:
        raise ValueError(f"privacy.delta={delta} must be in (0, 1/N) = (0, {1.0 / dataset_size:.3g}): "
                         "a δ of 1/N or more allows releasing an example outright.")
    if max_grad_norm <= 0:
        raise ValueError(f"privacy.max_grad_norm must be > 0, got {max_grad_norm}")
    if noise_multiplier is not None and noise_multiplier <= 0:
        raise ValueError(f"privacy.noise_multiplier={noise_multiplier} gives no privacy; leave it null to "
                         "calibrate σ from ε, or use privacy=none for a non-private run")
    sigma = noise_multiplier if noise_multiplier is not None else calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=delta, sample_rate=q, steps=planned, accountant=accountant)
    max_steps = max_steps_within_budget(target_epsilon=epsilon, delta=delta, noise_multiplier=sigma,
                                        sample_rate=q, accountant=accountant, upper=planned)
    return PrivacyPlan(True, float(epsilon), float(delta), float(sigma), float(max_grad_norm), q,
                       batch_size, spe, planned, max_steps, noise_multiplicity, accountant, dataset_size)


def known_seed_fields(*, noise_seed_known: bool, sampler_seed_known: bool) -> dict:
    """privacy.json's (and an export's) note on a run whose DP randomness was fixed by a seed.

    The (ε, δ) guarantee assumes the Gaussian noise and the Poisson batches are secret. A known noise seed
    lets whoever knows it subtract the noise; a known sampler seed tells them which examples each step used,
    which removes the subsampling amplification the accountant counted on. Such runs are for tests and
    reproducibility, and their record says so; a run seeded from OS entropy gets no extra fields."""
    known = [name for name, is_known in (("privacy.noise_seed", noise_seed_known),
                                         ("data.sampler_seed", sampler_seed_known)) if is_known]
    if not known:
        return {}
    return {"known_seeds": known,
            "warning": f"{' and '.join(known)} fixed: the run is reproducible, and the (ε, δ) guarantee does "
                       "not hold against anyone who knows the seed (docs/privacy.md)"}
