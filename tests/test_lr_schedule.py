"""lr decay (lr_schedule.*): the curve against torch's own schedulers, the config's refusals, and a DP run that
decays over its planned steps and resumes on the same curve."""
import shutil
import subprocess

import pytest
import torch

from dpdm.training.lr_schedule import LrDecay, check_lr_schedule, make_lr_scheduler
from tests.helpers import BIN, REPO, cli_env, run_cli

LR, STEPS, FINAL = 3e-3, 37, 1 / 3


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps + 5):  # past the end too: the lr must stay at its final value
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _optimizer():
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=LR)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_matches_torchs_own_schedulers(kind):
    opt = _optimizer()
    ours = _lrs(make_lr_scheduler(opt, kind=kind, total_steps=STEPS, final_fraction=FINAL), opt, STEPS)
    ref_opt = _optimizer()
    if kind == "cosine":
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=STEPS, eta_min=LR * FINAL)
    else:
        ref = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1.0, end_factor=FINAL, total_iters=STEPS)
    expected = _lrs(ref, ref_opt, STEPS)
    # CosineAnnealingLR would climb again after T_max; the reference is its first half-period, then flat.
    expected = expected[:STEPS + 1] + [LR * FINAL] * (len(expected) - STEPS - 1)
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours[0] == pytest.approx(LR) and ours[-1] == pytest.approx(LR * FINAL)


def test_constant_needs_no_scheduler():
    assert make_lr_scheduler(_optimizer(), kind="constant", total_steps=10, final_fraction=0.1) is None
    assert make_lr_scheduler(_optimizer(), kind="cosine", total_steps=10, final_fraction=1.0) is None
    assert LrDecay("constant", 10, 0.1)(5) == 1.0


@pytest.mark.parametrize("kind, final, message", [("step", 0.5, "lr_schedule.kind='step'"),
                                                  ("cosine", 0.0, "lr_schedule.final_fraction=0.0"),
                                                  ("linear", 1.5, "must be in (0, 1]")])
def test_bad_settings_are_refused(kind, final, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_lr_schedule(kind, final)


def test_dpdm_train_refuses_a_bad_schedule_with_one_message(tmp_path):
    proc = run_cli("dpdm-train", "experiment=smoke", "debug=tiny", "lr_schedule.kind=exponential",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "lr_schedule.kind='exponential' is not one of constant, cosine, linear" in proc.stderr
    assert "Traceback" not in proc.stderr


# 40 examples, B = 10: 4 DP-SGD steps per epoch, 8 planned; a checkpoint after each epoch.
TINY = ["experiment=smoke", "debug=tiny", "trainer.max_epochs=2", "privacy.noise_seed=7", "data.sampler_seed=3",
        "optim.lr=1e-3", "lr_schedule.kind=cosine", "lr_schedule.final_fraction=0.2",
        "callbacks.model_checkpoint.save_top_k=-1"]


def _train(*extra):
    proc = subprocess.run([str(BIN / "dpdm-train"), *TINY, *extra], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_dp_run_decays_over_its_planned_steps_and_resumes_on_the_same_curve(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(f"hydra.run.dir={full}")
    mid_ckpt = tmp_path / "after_epoch_0.ckpt"  # Hydra's override grammar would read the '=' in its name
    shutil.copy(full / "checkpoints" / "epoch=0-step=4.ckpt", mid_ckpt)
    _train(f"hydra.run.dir={resumed}", f"ckpt_path={mid_ckpt}")
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for d in (full, resumed))
    mid = torch.load(full / "checkpoints" / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=True)
    expected_mid = 1e-3 * LrDecay("cosine", 8, 0.2)(4)
    assert mid["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(expected_mid)
    assert expected_mid == pytest.approx(0.6e-3)  # halfway down a cosine from 1 to 0.2
    for ckpt in (a, b):
        assert ckpt["global_step"] == 8
        assert ckpt["lr_schedulers"][0]["last_epoch"] == 8
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.2e-3)
    # Same noise seed, same sampler seed: the resumed run takes the same steps at the same lrs.
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
