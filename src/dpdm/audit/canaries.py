"""Gradient ("Dirac") canaries injected into real DP-SGD training, for the one-run audit.

Canary i is one fixed coordinate c_i of the denoiser's parameters; its per-example gradient is C·e_{c_i},
of norm exactly C: the largest contribution clipping lets through, which clipping leaves unchanged. Each
canary is in the training set with probability 1/2; an included canary joins each Poisson batch
independently with rate q, like a real example, and its gradient row is appended to the real per-example
gradients before Opacus clips and noises them. The auditor sees every privatized gradient (the white-box
threat model that DP-SGD's accounting covers). Per step it observes o_t = B·grad_t[c_i]: C + N(0, σ²C²)
in a step in which the canary was sampled, N(0, σ²C²) otherwise (plus the real examples' tiny share of
that coordinate). Two scores are kept:
  llr  Σ_t log[(1−q)·φ(o_t; 0, σC) + q·φ(o_t; C, σC)] / φ(o_t; 0, σC): the log-likelihood ratio of
       "member" (sampled at rate q each step) against "non-member", step by step — by Neyman–Pearson the
       most powerful per-step test of this mixture (default);
  sum  Σ_t o_t, the plain sum (about qT·C apart), weaker when σ is small.
Any score gives a valid lower bound; the choice only changes how tight it is.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from dpdm.audit.bounds import AuditBound, bound_from_scores
from dpdm.training.module import DPDiffusionModule
from dpdm.utils.seeds import os_seed


def step_log_likelihood_ratio(o: torch.Tensor, *, q: float, sigma: float, C: float) -> torch.Tensor:
    """log[(1−q)·φ(o; 0, σC) + q·φ(o; C, σC)] − log φ(o; 0, σC), elementwise, computed stably."""
    shift = (o - C / 2) / (sigma * sigma * C)  # log φ(o; C, σC) − log φ(o; 0, σC)
    return torch.logaddexp(torch.full_like(o, math.log1p(-q)), math.log(q) + shift)


def draw_canaries(num_params: int, m: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(coordinates, included): m distinct flat parameter coordinates and membership S_i = +1."""
    if not 1 <= m <= num_params:
        raise ValueError(f"need 1 <= canaries <= number of parameters ({num_params}), got {m}")
    coords = torch.randperm(num_params, generator=generator)[:m]
    included = torch.rand(m, generator=generator) < 0.5
    return coords, included


class CanaryAuditModule(DPDiffusionModule):
    """DPDiffusionModule that adds the sampled canaries' gradients to each DP-SGD step and scores them."""

    def __init__(self, *, canary_coords: torch.Tensor, canary_included: torch.Tensor,
                 canary_seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not self.plan.enabled:
            raise ValueError("the canary audit needs a DP run (privacy enabled)")
        self.canary_coords = canary_coords.long()
        self.canary_included = canary_included.bool()
        # The auditor's coin flips for which canaries join a batch: secret from the adversary like the real
        # Poisson sampler's (OS entropy unless a seed is given).
        self._canary_gen = torch.Generator().manual_seed(canary_seed if canary_seed is not None else os_seed())
        m = len(self.canary_coords)
        self.canary_scores = torch.zeros(m, dtype=torch.float64)  # Σ_t o_t
        self.canary_llr = torch.zeros(m, dtype=torch.float64)     # Σ_t step log-likelihood ratio
        self.canary_counts = torch.zeros(m, dtype=torch.long)  # times each canary was in a batch
        self._layout: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _params(self) -> list[torch.nn.Parameter]:
        return self.dp.optimizer.params  # exactly the tensors Opacus clips and noises

    def _canary_layout(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter: (canary ids, flat offsets inside that parameter), in the optimizer's order."""
        if self._layout is None:
            sizes = torch.tensor([p.numel() for p in self._params()])
            total = int(sizes.sum())
            if int(self.canary_coords.max()) >= total:
                raise ValueError(f"canary coordinate {int(self.canary_coords.max())} outside the {total} "
                                 "trainable parameters")
            starts = torch.cumsum(sizes, 0) - sizes
            owner = torch.searchsorted(torch.cumsum(sizes, 0), self.canary_coords, right=True)
            self._layout = [((owner == j).nonzero().flatten(),
                             self.canary_coords[owner == j] - starts[j]) for j in range(len(sizes))]
        return self._layout

    def before_dp_step(self) -> None:
        q = self.plan.sample_rate
        draw = torch.rand(len(self.canary_coords), generator=self._canary_gen) < q
        sampled = (draw & self.canary_included).nonzero().flatten()
        self.canary_counts[sampled] += 1
        n_rows = len(sampled)
        row_of = torch.full((len(self.canary_coords),), -1, dtype=torch.long)
        row_of[sampled] = torch.arange(n_rows)
        C = self.plan.max_grad_norm
        params = self._params()
        n_real = next((p.grad_sample.shape[0] for p in params
                       if getattr(p, "grad_sample", None) is not None), 0)
        for p, (ids, offsets) in zip(params, self._canary_layout(), strict=True):
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                # A parameter the chunk did not reach has a zero per-example gradient for every example.
                gs = torch.zeros((n_real, *p.shape), dtype=p.dtype, device=p.device)
            elif not torch.is_tensor(gs):
                raise TypeError("expected p.grad_sample to be one (n, *p.shape) tensor")
            rows = torch.zeros((n_rows, p.numel()), dtype=gs.dtype, device=gs.device)
            hit = row_of[ids] >= 0
            rows[row_of[ids][hit].to(gs.device), offsets[hit].to(gs.device)] = C
            p.grad_sample = torch.cat([gs, rows.view(n_rows, *p.shape)])

    def after_dp_step(self) -> None:
        scale = float(self.dp.optimizer.expected_batch_size)  # undo Opacus' division by it
        kw = dict(q=self.plan.sample_rate, sigma=self.plan.noise_multiplier, C=self.plan.max_grad_norm)
        for p, (ids, offsets) in zip(self._params(), self._canary_layout(), strict=True):
            if len(ids):
                o = p.grad.detach().flatten()[offsets.to(p.grad.device)].double().cpu() * scale
                self.canary_scores[ids] += o
                if 0 < kw["q"] < 1 and kw["sigma"] > 0:  # else no Gaussian mixture to test (σ=0 tests)
                    self.canary_llr[ids] += step_log_likelihood_ratio(o, **kw)


@dataclass(frozen=True)
class CanaryAuditConfig:
    epsilon: float = 1.0
    delta: float = 1e-5
    num_canaries: int = 1000
    batch_size: int = 50        # expected batch size B over real examples and included canaries
    epochs: int = 5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    beta: float = 0.05
    seed: int | None = None     # None: canaries, sampling and noise from OS entropy
    score: str = "llr"          # llr (per-step likelihood ratio) or sum (plain sum of observations)


@dataclass(frozen=True)
class CanaryAuditReport:
    config: CanaryAuditConfig
    num_real: int
    canaries_included: int
    dataset_size_nominal: int   # N' = N + m/2, the size q = B/N' is planned for
    dataset_size_realised: int  # N + canaries actually included
    sample_rate: float
    noise_multiplier: float
    steps: int
    epsilon_spent: float        # the accountant's ε for the steps that ran (the configured ε)
    mean_times_sampled: float   # per included canary
    bound: AuditBound
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bound"] = self.bound.to_dict()
        return d


def audit_overrides(image_shape: tuple[int, int, int], num_classes: int, *, seed: int, noise_seed: int | None,
                    max_physical_batch_size: int) -> list[str]:
    """The `train` config of the audited module: the real `model` group with a very small DDPM++ U-Net (the
    canaries live in gradient space, so the net only has to be real) and a fast EMA."""
    c, res, _ = image_shape
    return ["model._target_=dpdm.audit.canaries.CanaryAuditModule", "net=ddpmpp_tiny",
            f"net.img_resolution={res}", f"net.in_channels={c}", f"net.out_channels={c}",
            f"net.num_classes={num_classes}", "net.model_channels=8", "net.channel_mult=[1]", "net.num_blocks=1",
            "net.attn_resolutions=[]", "++net.zero_init=false", "ema.rate=0.9", f"seed={seed}",
            f"privacy.noise_seed={'null' if noise_seed is None else noise_seed}",
            f"max_physical_batch_size={max_physical_batch_size}", "output_dir=unused"]


def run_canary_audit(config: CanaryAuditConfig, images: torch.Tensor, labels: torch.Tensor, *,
                     net: torch.nn.Module | None = None) -> CanaryAuditReport:
    """Train with DP-SGD on (images, labels) plus m canaries through a real Lightning Trainer; audit."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from opacus.data_loader import DPDataLoader

    from dpdm.data.datamodule import UInt8ImageDataset, batch_passthrough
    from dpdm.training.builder import module_from_config
    from dpdm.training.privacy_plan import make_privacy_plan
    from dpdm.utils.configs import compose

    if config.score not in ("llr", "sum"):
        raise ValueError(f"score must be 'llr' or 'sum', got {config.score!r}")
    t0 = time.perf_counter()
    seed = config.seed
    seeds = [os_seed() if seed is None else seed + i for i in range(6)]
    m, n_real = config.num_canaries, int(images.shape[0])
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    cfg = compose("train", audit_overrides(tuple(images.shape[1:]), num_classes, seed=seeds[4],
                                           noise_seed=None if seed is None else seeds[3],
                                           max_physical_batch_size=max(256, config.batch_size)))
    torch.manual_seed(seeds[0])
    net = net if net is not None else instantiate(cfg.net)
    coords, included = draw_canaries(sum(p.numel() for p in net.parameters() if p.requires_grad), m,
                                     generator=torch.Generator().manual_seed(seeds[1]))
    # q must not depend on the secret S (a q computed from the realised N' would reveal how many canaries
    # are in), so the plan uses the expected size N' = N + m/2: q = B/N', and σ is calibrated for it.
    nominal = n_real + math.ceil(m / 2)
    plan = make_privacy_plan(enabled=True, epsilon=config.epsilon, delta=config.delta,
                             max_grad_norm=config.max_grad_norm, accountant=config.accountant,
                             noise_multiplier=None, batch_size=config.batch_size, dataset_size=nominal,
                             epochs=config.epochs, noise_multiplicity=1)
    module = module_from_config(cfg, plan, net=net, canary_coords=coords, canary_included=included,
                                canary_seed=seeds[2])
    loader = DPDataLoader(UInt8ImageDataset(images, labels), sample_rate=plan.sample_rate,
                          generator=torch.Generator().manual_seed(seeds[5]), collate_fn=batch_passthrough)
    trainer = pl.Trainer(max_epochs=config.epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    # The audit net's ops are far too small for intra-op parallelism; on a busy CPU, extra threads made
    # the same run about 10x slower (measured: 1.6 s with one thread, 20 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.set_num_threads(threads)
    inc = module.canary_included
    scores = module.canary_llr if config.score == "llr" else module.canary_scores
    bound = bound_from_scores(scores.numpy(), inc.numpy(), delta=config.delta, beta=config.beta)
    return CanaryAuditReport(
        config=config, num_real=n_real, canaries_included=int(inc.sum()), dataset_size_nominal=nominal,
        dataset_size_realised=n_real + int(inc.sum()), sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier, steps=module.steps_taken,
        epsilon_spent=module.epsilon_spent(),
        mean_times_sampled=float(module.canary_counts[inc].float().mean()) if inc.any() else 0.0,
        bound=bound, seconds=time.perf_counter() - t0)
