"""The LightningModule a composed `train` config describes: the one builder behind dpdm-train, the
throughput benchmarks and dpdm-reproduce (which runs dpdm-train)."""
from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dpdm.train")


def build_module(cfg: DictConfig, dm):
    """The DP diffusion module and its privacy plan for `cfg` on the data module `dm` (set up).

    Hydra instantiates the module from the `model` group (net, preconditioning, noise levels, optimizer
    partial); the plan is added here because σ and q depend on the size of the data actually trained on.
    """
    from dpdm.training.privacy_plan import make_privacy_plan

    p = cfg.privacy
    plan = make_privacy_plan(
        enabled=p.enabled, epsilon=p.epsilon, delta=p.delta, max_grad_norm=p.max_grad_norm,
        accountant=p.accountant, noise_multiplier=p.noise_multiplier,
        batch_size=cfg.data.batch_size, dataset_size=dm.num_train,
        epochs=cfg.trainer.max_epochs, noise_multiplicity=cfg.loss.noise_multiplicity,
        step_limit=cfg.trainer.get("max_steps"))
    changed = fit_net_to_data(cfg, dm)
    if changed:
        log.info("the network follows the data: %s", ", ".join(changed))
    module = module_from_config(cfg, plan)
    module.examples_per_person = getattr(dm, "examples_per_person", 1)  # reported, not part of the mechanism
    # Enough to rebuild the denoiser from a checkpoint alone, the sampler its preset chose (dpdm-sample),
    # and the loss (whether label dropout trained the unconditional model that guidance needs).
    # Each part is resolved in place, against the whole config (data.data_dir points into paths).
    module.build_config = {key: OmegaConf.to_container(cfg[key], resolve=True)
                           for key in ("net", "preconditioning", "data", "sampler", "loss")}
    return module, plan


def fit_net_to_data(cfg: DictConfig, dm) -> list[str]:
    """The data decides the net's image size, channels and classes (one source of truth, nothing to edit
    twice): `cfg.net` is set from `dm`; returns what changed. A net configured unconditional (num_classes
    0) stays so on labelled data. The model group reads the net through its `${net}` interpolation, so
    the config must not be resolved before this runs (dpdm-train resolves it after building)."""
    if "model" in cfg and not OmegaConf.is_interpolation(cfg.model, "net"):
        raise ValueError("model.net no longer interpolates ${net} (the config was resolved before the net was "
                         "fitted to the data): build the module first, then resolve the config")
    c, h, w = dm.image_shape
    if h != w:
        raise ValueError(f"the data's images are {h}×{w}; the U-Net needs square images (data.resolution=)")
    wanted = {"img_resolution": h, "in_channels": c, "out_channels": c,
              "num_classes": dm.num_classes if cfg.net.get("num_classes", 0) else 0}
    changed = [f"net.{k} {cfg.net.get(k)} → {v}" for k, v in wanted.items() if cfg.net.get(k) != v]
    for k, v in wanted.items():
        cfg.net[k] = v
    return changed


def module_from_config(cfg: DictConfig, plan, **objects):
    """`cfg.model` instantiated with `plan` and any `objects` (tensors, a ready net) no config can hold.

    Hydra builds the model as a partial, so the plan (a dataclass, which Hydra would read as config) and the
    objects are passed as themselves; an object named like a config entry (net=) replaces it.
    """
    return instantiate(cfg.model, _partial_=True)(plan=plan, **objects)


def describe_plan(plan, examples_per_person: int = 1) -> str:
    """The mechanism in one line, stated before training starts."""
    if not plan.enabled:
        return f"privacy: none (non-private baseline), {plan.planned_steps} steps"
    line = (f"privacy: (ε={plan.target_epsilon}, δ={plan.delta}) with {plan.accountant.upper()}; "
            f"σ={plan.noise_multiplier:.4f}, C={plan.max_grad_norm}, q={plan.sample_rate:.5f} "
            f"(B={plan.expected_batch_size} of N={plan.dataset_size}), K={plan.noise_multiplicity}, "
            f"{plan.planned_steps} steps ({plan.steps_per_epoch}/epoch); unit: one example")
    if examples_per_person > 1:
        from dpdm.privacy.accounting import group_privacy

        eps_k, delta_k = group_privacy(plan.target_epsilon, plan.delta, examples_per_person)
        line += f"; per person ({examples_per_person} examples each): ε={eps_k:.4g}, δ={delta_k:.3g}"
    return line
