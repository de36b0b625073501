"""Two-process DP-SGD worker for tests/test_ddp.py, and the pieces the test shares with it.

Run by the test as `torchrun --standalone --nproc_per_node 2 -m tests.ddp_worker OUT_DIR`: each rank trains
through the real Lightning path (`DPDDPStrategy`, Opacus' `DistributedDPOptimizer`, gloo, float64) on fixed
local batches and saves what it saw to OUT_DIR/rank<r>.pt.

To compare a data-parallel step with a single-process step on the union of the ranks' examples, the
diffusion noise of an example (σ, n, dropped labels) must not depend on which rank or chunk it is in:
`KeyedNoiseModule` draws it from a generator seeded by a hash of the example's pixels. Everything else
(per-example gradients, clipping, the optimizer step, EMA, accounting) is the real module's.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dpdm.diffusion.loss import TrainingNoise, denoising_loss_per_example, draw_training_noise
from dpdm.training.privacy_plan import PrivacyPlan
from tests.helpers import RecordingModule, tiny_denoiser

K, C, E, N = 2, 0.05, 8, 100  # noise multiplicity, clip norm, expected batch size B, dataset size
SIGMA = 1.3
WORLD = 2
# 10 fixed examples; per logical step, the example indices of rank 0 and of rank 1.
EXAMPLES = (torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1,
            torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))
# Step 0: 3 + 5 examples (rank 1 needs 3 chunks of ≤ 2); step 1: rank 0 empty, rank 1 two examples.
STEPS_DATA = [([0, 1, 2], [3, 4, 5, 6, 7]), ([], [8, 9])]
# The noise run: step 0 as above, then two steps where both ranks are empty (pure noise).
STEPS_NOISE = [([0, 1, 2], [3, 4, 5, 6, 7]), ([], []), ([], [])]
MAX_PHYSICAL = 2


def plan(sigma: float, steps: int) -> PrivacyPlan:
    return PrivacyPlan(enabled=True, target_epsilon=1e6, delta=1e-5, noise_multiplier=sigma,
                       max_grad_norm=C, sample_rate=E / N, expected_batch_size=E,
                       steps_per_epoch=steps, planned_steps=steps, max_steps=steps,
                       noise_multiplicity=K, accountant="rdp", dataset_size=N)


def example_seed(x: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(x.contiguous().numpy().tobytes()).digest()[:7], "little")


class KeyedNoiseModule(RecordingModule):
    """The real module; diffusion noise keyed by example; records what reaches Adam and how often
    gradients are all-reduced in each training step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.chunk_sizes: list = []     # per forward: number of examples
        self.all_reduces: list = []     # per training_step: torch.distributed.all_reduce calls
        self.wrapper_type = self.optimizer_type = None

    def _chunk_loss(self, x, y):
        self.chunk_sizes.append(len(x))
        parts = [draw_training_noise(x[i:i + 1], y[i:i + 1], noise_multiplicity=self.K,
                                     noise_levels=self.noise_levels, label_dropout=self.label_dropout,
                                     null_label=self.denoiser.null_label,
                                     generator=torch.Generator().manual_seed(example_seed(x[i])))
                 for i in range(len(x))]
        tn = TrainingNoise(sigma=torch.cat([p.sigma for p in parts]),
                           noise=torch.cat([p.noise for p in parts]),
                           class_labels=torch.cat([p.class_labels for p in parts]))
        return denoising_loss_per_example(self.denoiser, x, tn, pixel_reduction=self.pixel_reduction)

    def on_train_start(self):
        super().on_train_start()
        self.wrapper_type = type(self.trainer.strategy.model).__name__
        self.optimizer_type = type(self.dp.optimizer).__name__

    def training_step(self, batch, batch_idx):
        if not torch.distributed.is_initialized():
            return super().training_step(batch, batch_idx)
        real, calls = torch.distributed.all_reduce, []

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        torch.distributed.all_reduce = counting
        try:
            return super().training_step(batch, batch_idx)
        finally:
            torch.distributed.all_reduce = real
            self.all_reduces.append(len(calls))


def make_module(sigma: float, steps: int, max_physical: int, noise_seed: int) -> KeyedNoiseModule:
    den = tiny_denoiser(num_classes=3)  # same initial weights on every call (seeded)
    return KeyedNoiseModule(net=den.net, plan=plan(sigma, steps), preconditioning=den.precond,
                            label_dropout=0.3, ema_rate=0.9, max_physical_batch_size=max_physical,
                            seed=0, noise_seed=noise_seed)


class _Examples(Dataset):
    def __len__(self):
        return len(EXAMPLES[0])

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return EXAMPLES[0][idx], EXAMPLES[1][idx]


def loader(batches: list[list[int]]) -> DataLoader:
    return DataLoader(_Examples(), batch_sampler=batches, collate_fn=lambda b: b)


def fit(module: KeyedNoiseModule, batches: list[list[int]], **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=len(batches), precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         use_distributed_sampler=False, **trainer_kw)
    trainer.fit(module, train_dataloaders=loader(batches))
    return trainer


def _state(module: KeyedNoiseModule) -> dict:
    return {"recorded": module.recorded, "chunk_sizes": module.chunk_sizes,
            "all_reduces": module.all_reduces, "wrapper": module.wrapper_type,
            "optimizer": module.optimizer_type,
            "params": [p.detach().clone() for p in module.denoiser.parameters()],
            "ema": [p.detach().clone() for p in module.ema.parameters()],
            "history": list(module.dp.accountant.history), "steps": module.steps_taken,
            "epsilon": module.epsilon_spent() if module.plan.noise_multiplier > 0 else None}


def main(out_dir: str) -> None:
    from dpdm.training.ddp import DPDDPStrategy

    torch.set_num_threads(1)  # two processes on a small shared machine
    rank = int(__import__("os").environ["RANK"])
    results = {}
    for name, sigma, steps in (("sigma0", 0.0, STEPS_DATA), ("noise", SIGMA, STEPS_NOISE)):
        module = make_module(sigma, len(steps), MAX_PHYSICAL, noise_seed=1000 + rank)
        trainer = fit(module, [s[rank] for s in steps], strategy=DPDDPStrategy(), devices=WORLD)
        assert trainer.world_size == WORLD and trainer.global_rank == rank
        results[name] = _state(module)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
