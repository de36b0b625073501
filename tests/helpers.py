"""Small builders shared by tests."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import logging.config
import os
import subprocess
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from unittest import mock

import torch

from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.nets import DDPMppUNet
from dpdm.training.module import DPDiffusionModule

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent   # the venv's console scripts

# experiment=smoke shrunk for tests: 400 examples, 4 DP-SGD steps per epoch, 2 epochs, K = 2.
SHRINK = ["experiment=smoke", "data.subset_size=400", "data.batch_size=100", "trainer.max_epochs=2",
          "max_physical_batch_size=64", "callbacks.sample_grid.per_class=2",
          "callbacks.sample_grid.num_steps=3"]


def load_script(relative_path: str, name: str):
    """Import a script that is not part of the package (benchmarks/, scripts/) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_env(**extra) -> dict:
    """The environment of a CLI under test: wandb off, the checkout's datasets, plus `extra`."""
    return {**os.environ, "WANDB_MODE": "disabled", "DPDM_DATA_DIR": str(REPO / "data"), **extra}


def tiny_denoiser(*, dtype=torch.float64, seed: int = 0, num_classes: int = 3,
                  resolution: int = 8, attention: bool = True, patch_size: int = 1,
                  unpatch_channels: int = 0, full_res_blocks: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = DDPMppUNet(img_resolution=resolution, in_channels=1, out_channels=1,
                     num_classes=num_classes, model_channels=8, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=(resolution // patch_size // 2,) if attention else (),
                     dropout=0.0, zero_init=False, patch_size=patch_size, unpatch_channels=unpatch_channels,
                     full_res_blocks=full_res_blocks)
    return Denoiser(net, EDMPreconditioning()).to(dtype).train()


def compose_config(name: str, overrides=(), *, hydra_config: bool = False):
    """A config of conf/ (`train`, `sample`, `evaluate`) composed with overrides, as the CLI would see it."""
    from dpdm.utils.configs import compose

    return compose(name, overrides, hydra_config=hydra_config)


class RecordingModule(DPDiffusionModule):
    """The real module, recording the gradient that reaches the wrapped Adam at every real step (after
    clipping, noise, scaling and, under DDP, the all-reduce)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.recorded: list = []

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        inner = self.dp.optimizer.original_optimizer
        real_step = inner.step

        def step(*args, **kwargs):
            self.recorded.append([p.grad.detach().clone() for p in self.denoiser.parameters()])
            return real_step(*args, **kwargs)

        inner.step = step
        return opt


def run_cli(script: str, *args: str, env: dict | None = None, cwd=None):
    """Run a dpdm console script (`dpdm-train`, ...) in this process, as a subprocess would run it.

    Returns a CompletedProcess with the exit code (SystemExit's, 1 for an uncaught exception, whose
    traceback goes to stderr as the interpreter would print it) and the captured stdout/stderr. A
    subprocess pays ~10 s of imports (torch, Lightning, Opacus) on a 2-core CPU before the first line
    runs; tests of what a command does, not of how it is launched, run it here instead. Tests of the
    installed entry points themselves, of signals and of multi-process runs keep real subprocesses.
    """
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    main = ep.load()
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    # Hydra configures logging with dictConfig, which first closes *every* existing handler, pytest's
    # own capture handlers included; a subprocess has none. Clear only the handler registry instead.
    keep_handlers = mock.patch.object(logging.config, "_clearExistingHandlers", logging._handlers.clear)
    try:
        sys.argv = [script, *map(str, args)]
        os.environ.update(cli_env(**(env or {})))
        os.chdir(cwd or REPO)
        with keep_handlers, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                result = main()  # the console script runs sys.exit(main())
                rc = result if isinstance(result, int) else 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - a subprocess would print it and exit 1
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        for h in root.handlers:  # Hydra's console and run-dir file handlers for this run
            if h not in saved_handlers:
                h.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess([script, *args], rc, out.getvalue(), err.getvalue())
