"""Data-parallel DP-SGD on Lightning: `DPDDPStrategy` (`trainer=ddp`).

Lightning's `DDPStrategy` wraps the module in torch's `DistributedDataParallel`, whose autograd hooks
all-reduce `p.grad` during every backward. In DP-SGD that gradient is never used: Opacus' optimizer
clips the per-example gradients in `p.grad_sample` and *overwrites* `p.grad` with the clipped sum
(+ noise). The reduction has to happen after clipping and noising, once per logical batch, not once per
micro-batch inside backward. So this strategy keeps everything of `DDPStrategy` (launchers, process group,
cluster environments: torchrun, SLURM, Lightning's own launcher; barriers, broadcast, checkpoint I/O on
rank 0) except the wrapper: the module is wrapped in Opacus' `DifferentiallyPrivateDistributedDataParallel`
instead, which only broadcasts rank 0's parameters when it wraps and has no gradient hooks. The gradient
reduction is done by Opacus' `DistributedDPOptimizer` (built by `make_dp_components` when world_size > 1):

    each rank r:  g_r = Σ_{i in local batch} clip(∇ℓ_i) (+ N(0, σ²C² I) on rank 0 only), divided by B/W
    all-reduce:   g = (1/W) Σ_r g_r = (Σ_{i in global batch} clip(∇ℓ_i) + N(0, σ²C² I)) / B

which is exactly the single-process update on the union of the local batches. Every rank then applies the
same Adam step to identical parameters, so parameters (and EMA weights) stay identical on all ranks.
"""
from __future__ import annotations

from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn

__all__ = ["DPDDPStrategy"]


class DPDDPStrategy(DDPStrategy):
    """`DDPStrategy` without torch's DDP gradient hooks, for DP-SGD with Opacus' DistributedDPOptimizer."""

    def configure_ddp(self) -> None:
        # No DistributedDataParallel: nothing all-reduces p.grad in backward. DPDDP makes every rank start
        # from rank 0's parameters (the EMA copy included: it is a submodule of the LightningModule).
        self.model = DPDDP(self.model)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if self.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError("trainer=ddp needs trainer.use_distributed_sampler=false: Poisson sampling of "
                             "each rank's shard at the global rate q is the privacy mechanism, and "
                             "Lightning's DistributedSampler would replace it.")
        for inner in self.optimizers:
            if self.world_size > 1 and not isinstance(inner, DistributedDPOptimizer):
                what = ("a non-private optimizer" if not isinstance(inner, DPOptimizer)
                        else "a single-process DPOptimizer")
                raise ValueError(
                    f"trainer=ddp runs DP-SGD across {self.world_size} processes and needs Opacus' "
                    f"DistributedDPOptimizer to sum the clipped gradients across ranks, but the module "
                    f"configured {what} ({type(inner).__name__}); without it the ranks would train "
                    "separate models. Non-private runs (privacy=none) are single-process only: use "
                    "trainer=default.")

    def teardown(self) -> None:
        if isinstance(self.model, DPDDP):
            self.model = self.lightning_module  # unwrap, as DDPStrategy does for its own wrapper
        super().teardown()
