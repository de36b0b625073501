"""dpdm-sample: draw samples from a checkpoint's EMA denoiser with any sampler.

    dpdm-sample ckpt=<run>/checkpoints/last.ckpt out=<dir> n=1000 sampler=stochastic_ddim \
        sampler.num_steps=1000 sampler.guidance=1.0 classes=balanced   # or classes=3, classes=null

Interrupted, the same command goes on where it stopped (dpdm.utils.sample_parts).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from dpdm.cli import CONFIG_DIR
from dpdm.cli.errors import exit_on_user_error
from dpdm.utils.checksums import sha256_file
from dpdm.utils.files import atomic_path
from dpdm.utils.sample_parts import SampleParts

log = logging.getLogger("dpdm.sample")


def class_labels_for(classes, n: int, num_classes: int) -> torch.Tensor | None:
    """Labels for n samples: `balanced` cycles through the classes, an int fixes one, None: no labels."""
    if classes is None or (num_classes == 0 and classes == "balanced"):
        return None
    if num_classes == 0:
        raise ValueError(f"classes={classes} asks for a class, but the model is unconditional; "
                         "use classes=null")
    if classes == "balanced":
        return torch.arange(n) % num_classes
    c = int(classes)
    if not 0 <= c < num_classes:
        raise ValueError(f"classes={c} is outside 0..{num_classes - 1}")
    return torch.full((n,), c)


def grid_rows(y: torch.Tensor, per_row: int = 10, max_rows: int = 10) -> tuple[torch.Tensor, int]:
    """Indices for grid.png: one row per class (the first `per_row` samples of each, in class order);
    unlabelled samples (y = -1) fill up to max_rows rows in order."""
    classes = sorted(c for c in set(y.tolist()) if c >= 0)
    if not classes:
        return torch.arange(min(len(y), per_row * max_rows)), per_row
    per_class = min(per_row, min(int((y == c).sum()) for c in classes[:max_rows]))
    picks = [torch.nonzero(y == c).flatten()[:per_class] for c in classes[:max_rows]]
    return torch.cat(picks), per_class


def draw_samples(denoiser, *, n: int, labels, seed: int, sampler_cfg, batch_size: int,
                 image_shape, device, start: int = 0, on_batch=None) -> torch.Tensor:
    """Samples start … n − 1 (uint8); sample i uses seed + i for its latent and its sampling noise.
    `on_batch(first_index, images, seconds)` is called with each batch as it is drawn."""
    from dpdm.diffusion.samplers import sample_from_seeds, sample_in_batches
    from dpdm.utils.configs import to_plain
    from dpdm.utils.images import to_uint8

    spec = dict(to_plain(sampler_cfg))

    def draw(seeds, lab):
        t0 = time.perf_counter()
        x = to_uint8(sample_from_seeds(denoiser, seeds, sampler=spec, class_labels=lab, shape=image_shape,
                                       device=device))
        if on_batch is not None:
            on_batch(seeds[0] - seed, x, time.perf_counter() - t0)
        return x

    if start >= n:
        return torch.empty((0, *image_shape), dtype=torch.uint8)
    return sample_in_batches(draw, n=n - start, labels=None if labels is None else labels[start:],
                             seed=seed + start, batch_size=batch_size,
                             progress=lambda done, total: log.info("sampled %d / %d", start + done, n))


def run_sampling(cfg: DictConfig) -> Path:
    from dpdm.diffusion.inference import prepare_for_sampling
    from dpdm.diffusion.samplers import check_null_label_trained
    from dpdm.training.checkpoint import (
        checkpoint_dataset,
        checkpoint_label_dropout,
        load_checkpoint,
        load_denoiser,
        sampler_for,
        sampler_on_command_line,
    )
    from dpdm.utils.images import save_image_grid
    from dpdm.utils.jsonio import write_json_atomic

    if cfg.n < 1:
        raise ValueError(f"n must be >= 1, got {cfg.n}")
    out = Path(cfg.out)
    target = out / "samples.npz"
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=true or choose another out=")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ckpt = load_checkpoint(cfg.ckpt)
    denoiser = prepare_for_sampling(load_denoiser(ckpt), device, channels_last=cfg.channels_last,
                                    compile=cfg.compile)
    labels = class_labels_for(cfg.classes, cfg.n, denoiser.net.num_classes)
    sampler = sampler_for(ckpt, cfg.sampler, sampler_on_command_line(), log=log.info)
    check_null_label_trained(denoiser, checkpoint_label_dropout(ckpt), sampler, unconditional=labels is None)
    # Each batch goes to disk as it is drawn; a call interrupted earlier (a session's end, a killed job)
    # left its batches under a name that says what drew them, and this call goes on after them.
    parts = SampleParts(out, {"ckpt_sha256": sha256_file(cfg.ckpt), "sampler": sampler, "seed": int(cfg.seed),
                              "classes": cfg.classes})
    done, earlier_s = parts.drawn(cfg.n)
    start = 0 if done is None else len(done)
    if start:
        log.info("resuming: samples 0-%d were drawn by an earlier call with this checkpoint, sampler and "
                 "seed (%s); drawing %d more", start - 1, parts.dir, cfg.n - start)
    t0 = time.perf_counter()
    rest = draw_samples(denoiser, n=cfg.n, labels=labels, seed=cfg.seed, sampler_cfg=sampler,
                        batch_size=cfg.batch_size, image_shape=denoiser.image_shape, device=device, start=start,
                        on_batch=lambda first, images, s: parts.add(first, images.numpy(), s))
    draw_s = earlier_s + time.perf_counter() - t0
    x = rest if done is None else torch.cat([torch.from_numpy(done), rest])
    y = labels if labels is not None else torch.full((cfg.n,), -1)
    # The dataset's name travels with the samples, so dpdm-evaluate and dpdm-audit memorization know
    # which real data to compare with.
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez_compressed(tmp, x=x.numpy(), y=y.numpy().astype(np.int64),
                            dataset=np.array(checkpoint_dataset(ckpt) or ""))
    # What drew them, for whoever reuses the samples (a study redraws when its sampler changed).
    # draw_s: the seconds spent drawing, over every call that drew part of the set.
    write_json_atomic(out / "sampler.json", {"ckpt": str(cfg.ckpt), "n": int(cfg.n), "seed": int(cfg.seed),
                                             "sampler": sampler, "draw_s": round(draw_s, 1)})
    rows, nrow = grid_rows(y, per_row=10)
    save_image_grid(x[rows], out / "grid.png", nrow=nrow)
    parts.remove()  # the set is whole in samples.npz
    log.info("wrote %s (%d samples) and %s", target, cfg.n, out / "grid.png")
    return target


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    run_sampling(cfg)


def main() -> None:
    from dpdm.utils.allocator import retain_freed_memory

    retain_freed_memory()  # every step frees and reallocates the same activations: keep them mapped
    _hydra_main()


if __name__ == "__main__":
    main()
