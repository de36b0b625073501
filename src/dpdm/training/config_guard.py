"""Configs that would run a different mechanism from the one the accountant counts, refused up front.

The accountant's ε assumes, at every step: a Poisson sample of the N training examples at rate q = B/N
(no fixed or shuffled batches, no sampler Lightning swaps in), each example's gradient clipped to C in
full precision and Gaussian noise σC added once, one optimizer step per sampled batch, and the same
dataset from the first step of the run to the last (resumes included). Each check below names a config
that breaks one of those assumptions. They run before anything is written to the run dir.
"""
from __future__ import annotations

from omegaconf import DictConfig

# fp16 autocast needs a GradScaler: it multiplies the loss by a changing factor (so the clipping bound
# no longer applies to the true per-example gradient) and skips steps whose gradients overflow (a step
# taken or not depending on the private batch, outside the accountant). bf16 needs neither.
FP16_PRECISIONS = {"16", "16-mixed", "16-true", "half"}


def mechanism_problems(cfg: DictConfig) -> list[str]:
    """Every reason this training config would not run the mechanism its privacy plan accounts for."""
    problems = []
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in FP16_PRECISIONS:
        problems.append(
            f"trainer.precision={precision} is refused: fp16 needs a GradScaler, which rescales the gradients "
            "before clipping and skips overflowing steps depending on the batch. Use trainer.precision=32-true "
            "or bf16-mixed (docs/performance.md).")
    if not cfg.privacy.enabled:
        return problems
    if not cfg.data.get("poisson_sampling", True):
        problems.append(
            "data.poisson_sampling=false with privacy enabled is refused: the loader would make fixed "
            "shuffled batches while the accountant assumes Poisson sampling at q = B/N, so the ε reported "
            "would be wrong. Leave data.poisson_sampling at its default (${privacy.enabled}), or train "
            "without privacy (privacy=none).")
    if cfg.trainer.get("use_distributed_sampler", False):
        problems.append(
            "trainer.use_distributed_sampler=true with privacy enabled is refused: Lightning would replace "
            "the Poisson sampler (the privacy mechanism) with its own. Leave it false; trainer=ddp shards the "
            "Poisson sampling itself.")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate not in (None, 1):
        problems.append(
            f"trainer.accumulate_grad_batches={accumulate} is refused: one DP-SGD step is one Poisson batch; "
            "for a larger batch raise data.batch_size (max_physical_batch_size bounds the memory).")
    limit = cfg.trainer.get("limit_train_batches")
    if limit not in (None, 1, 1.0):
        problems.append(
            f"trainer.limit_train_batches={limit} is refused with privacy enabled: the plan's σ and step "
            "count assume ⌊1/q⌋ steps per epoch; size a shorter run with trainer.max_steps instead.")
    return problems


def check_mechanism_config(cfg: DictConfig) -> None:
    problems = mechanism_problems(cfg)
    if problems:
        raise ValueError(" ".join(problems) if len(problems) == 1 else
                         "the config would change the DP mechanism: " + " ".join(
                             f"({i}) {p}" for i, p in enumerate(problems, 1)))


def data_identity(data_cfg) -> dict:
    """What identifies the private dataset of a run (compared when resuming): N alone is not enough,
    since MNIST and Fashion-MNIST (or two subsets) have the same size."""
    keys = ("name", "subset_size", "seed") if data_cfg.get("subset_size") else ("name", "subset_size")
    if data_cfg.get("path"):  # your own images: which ones, at which resolution
        keys += ("path", "resolution")
    return {k: data_cfg.get(k) for k in keys}


def check_same_data(stored_build_config: dict | None, data_cfg) -> None:
    """Refuse resuming a checkpoint on other private data than the run was accounted on."""
    stored = (stored_build_config or {}).get("data")
    if not stored:
        return  # a checkpoint from before the data was stored: the plan comparison (N) still applies
    old, new = data_identity(stored), data_identity(data_cfg)
    if old != new:
        diff = ", ".join(f"data.{k}: checkpoint {old.get(k)!r} vs config {new.get(k)!r}"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        raise ValueError(f"Refusing to resume: the checkpoint was trained on other data ({diff}); its "
                         "accountant history is for that dataset. Resume with the original data settings "
                         "or start a new run.")
