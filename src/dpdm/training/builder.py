"""The LightningModule a composed `train` config describes: the one builder behind dpdm-train and the
throughput benchmarks."""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def build_diffusion(cfg: DictConfig):
    """The denoiser's preconditioning and the training noise levels, refused if they do not fit."""
    from dpdm.diffusion.noise_levels import check_compatible

    preconditioning, sigma_dist = instantiate(cfg.denoiser), instantiate(cfg.noise)
    check_compatible(preconditioning, sigma_dist)
    return preconditioning, sigma_dist


def build_module(cfg: DictConfig, dm):
    """The DP diffusion module and its privacy plan for `cfg` on the data module `dm` (set up)."""
    from dpdm.training.module import DPDiffusionModule
    from dpdm.training.privacy_plan import make_privacy_plan

    p = cfg.privacy
    plan = make_privacy_plan(
        enabled=p.enabled, epsilon=p.epsilon, delta=p.delta, max_grad_norm=p.max_grad_norm,
        accountant=p.accountant, noise_multiplier=p.noise_multiplier,
        batch_size=cfg.data.batch_size, dataset_size=dm.num_train,
        epochs=cfg.trainer.max_epochs, noise_multiplicity=cfg.loss.noise_multiplicity,
        step_limit=cfg.trainer.get("max_steps"))
    preconditioning, sigma_dist = build_diffusion(cfg)
    module = DPDiffusionModule(
        net=instantiate(cfg.net), plan=plan, preconditioning=preconditioning,
        sigma_dist=sigma_dist, label_dropout=cfg.loss.label_dropout,
        pixel_reduction=cfg.loss.pixel_reduction, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay, ema_rate=cfg.ema.rate,
        ema_warmup=cfg.ema.warmup,
        max_physical_batch_size=cfg.max_physical_batch_size, secure_mode=p.secure_mode,
        seed=cfg.seed, noise_seed=p.get("noise_seed"), dp_engine=cfg.get("dp_engine", "fold"),
        log_nonprivate_metrics=bool(p.get("log_nonprivate_metrics", False)))
    # Enough to rebuild the denoiser from a checkpoint alone, and the sampler its preset chose (dpdm-sample).
    module.build_config = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, ["net", "denoiser", "data", "sampler"]), resolve=True)
    return module, plan


def describe_plan(plan) -> str:
    if not plan.enabled:
        return f"privacy: none (non-private baseline), {plan.planned_steps} steps"
    return (f"privacy: (ε={plan.target_epsilon}, δ={plan.delta}) with {plan.accountant.upper()}; "
            f"σ={plan.noise_multiplier:.4f}, C={plan.max_grad_norm}, q={plan.sample_rate:.5f} "
            f"(B={plan.expected_batch_size} of N={plan.dataset_size}), K={plan.noise_multiplicity}, "
            f"{plan.planned_steps} steps ({plan.steps_per_epoch}/epoch)")
