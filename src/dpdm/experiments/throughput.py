"""Measure DP-SGD training throughput (noised images per second) with a few real steps of a preset.

The steps are dpdm-train's own: the preset's network, denoiser, noise levels and K, built by
`dpdm.training.builder.build_module` and stepped by Lightning through `DPDiffusionModule.training_step`
(per-example gradients, clipping, noise, accountant, EMA). Only the batch is made small, so that a
measurement takes seconds on a CPU; the first steps are warm-up and not timed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pytorch_lightning as pl
import torch

from dpdm.utils.machine import cpu_isa, cpu_model


@dataclass(frozen=True)
class Throughput:
    images_per_s: float          # noised images (examples × K) per second of DP-SGD step time
    steps: int                   # timed steps
    noised_images: int           # noised images in the timed steps
    seconds: float               # their total step time
    examples_per_step: int       # the expected (Poisson) batch size used for the measurement
    noise_multiplicity: int
    num_params: int
    device: str                  # "cpu (N threads, <processor>)" or the CUDA device name
    experiment: str
    dp_engine: str | None        # the per-example gradient engine the preset used (config dp_engine)

    def to_dict(self) -> dict:
        return asdict(self)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {cpu_model()}, {cpu_isa()})"


def measure_training_throughput(experiment: str, *, examples: int = 4, steps: int = 2, warmup: int = 1,
                                device: str = "auto", data_dir: str | None = None,
                                overrides: list[str] | None = None) -> Throughput:
    """Run `warmup + steps` real DP-SGD steps of `experiment=<experiment>` with `examples` examples per
    (expected) batch and time the last `steps`. The preset's K and network are kept."""
    from hydra.utils import instantiate

    from dpdm.training.builder import build_module
    from dpdm.utils.configs import compose

    if examples < 1 or steps < 1 or warmup < 0:
        raise ValueError("examples and steps must be >= 1 and warmup >= 0")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    extra = [f"data.data_dir={data_dir}"] if data_dir else []
    cfg = compose("train", [f"experiment={experiment}", "output_dir=unused", f"data.batch_size={examples}",
                            f"max_physical_batch_size={max(examples * 4, 1)}", "logger=none",
                            *extra, *(overrides or [])])
    dm = instantiate(cfg.data)
    dm.prepare_data()  # as dpdm-train: a missing built-in dataset is fetched and verified first
    dm.setup("fit")
    module, plan = build_module(cfg, dm)
    timer = _StepTimer(plan.noise_multiplicity, skip=warmup)
    trainer = pl.Trainer(accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1,
                         precision=cfg.trainer.get("precision", "32-true"), max_steps=warmup + steps,
                         logger=False, callbacks=[timer], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    if not timer.times:
        raise RuntimeError("no timed training step ran; increase steps")
    seconds = sum(timer.times)
    return Throughput(images_per_s=timer.images / seconds, steps=len(timer.times), noised_images=timer.images,
                      seconds=seconds, examples_per_step=examples, noise_multiplicity=plan.noise_multiplicity,
                      num_params=sum(p.numel() for p in module.denoiser.net.parameters()),
                      device=device_description(dev), experiment=experiment, dp_engine=cfg.get("dp_engine"))


class _StepTimer(pl.Callback):
    """Wall time of each training step (one DP-SGD step), after `skip` warm-up steps."""

    def __init__(self, K: int, skip: int):
        self.K, self.skip = K, skip
        self.seen, self.images, self.times = 0, 0, []
        self._t0, self._n = 0.0, 0

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._n = int(batch[0].shape[0])
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        dt = time.perf_counter() - self._t0
        self.seen += 1
        if self.seen > self.skip:
            self.times.append(dt)
            self.images += self._n * self.K
