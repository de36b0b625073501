"""dpdm-evaluate on a samples.npz written by dpdm-sample and on a checkpoint; the training callbacks.

Kept fast: a tiny denoiser (checkpoint in dpdm-train's format, written directly instead of training),
a few sampler steps, a real-data CNN trained briefly on 2,000 images and reference statistics of the
test split only (both cached for the module), one downstream epoch. FID is unavailable here (no
Inception weights) and must say so.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dpdm.cli.evaluate import positional_input_to_override
from dpdm.data import load_split
from dpdm.diffusion.preconditioning import Denoiser
from tests.helpers import BIN, REPO, cli_env, compose_config

FAST = {"reference_splits": ["test"], "real_classifier": {"num_train": 2000, "max_epochs": 2, "lr": 1e-3},
        "downstream": {"max_epochs": 1, "val_size": 20, "classifiers": ["logreg", "cnn"]}}


def _fast_overrides(cache_dir):
    return [f"evaluation.cache_dir={cache_dir}", "evaluation.reference_splits=[test]",
            "evaluation.real_classifier.num_train=2000", "evaluation.real_classifier.max_epochs=2",
            "evaluation.real_classifier.lr=1e-3",
            "evaluation.downstream.max_epochs=1", "evaluation.downstream.val_size=20",
            "evaluation.downstream.classifiers=[logreg,cnn]"]


_compose = compose_config


def _env(tmp):
    # TORCH_HOME points at an empty directory: FID must be reported unavailable, not downloaded.
    return cli_env(TORCH_HOME=str(tmp / "torch_home"))


def _run(args, tmp):
    return subprocess.run(args, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=600)


def _evaluate(args, tmp):
    # The console script once pyproject declares it; the module otherwise (same main()).
    script = BIN / "dpdm-evaluate"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dpdm.cli.evaluate"]
    return _run([*cmd, *args], tmp)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def checkpoint(work):
    """A checkpoint as dpdm-train writes it (EMA weights + build config), for an untrained tiny net."""
    cfg = _compose("train", ["experiment=smoke", "net.model_channels=8"])
    build = {k: OmegaConf.to_container(cfg[k], resolve=False) for k in ("net", "preconditioning")}
    build["data"] = {"name": "mnist"}
    torch.manual_seed(0)
    denoiser = Denoiser(instantiate(cfg.net), instantiate(cfg.preconditioning))
    path = work / "tiny.ckpt"
    torch.save({"state_dict": {f"ema.{k}": v for k, v in denoiser.state_dict().items()},
                "dpdm": {"build_config": build, "plan": {"enabled": False}}}, path)
    return path


def test_positional_input_becomes_an_override():
    assert positional_input_to_override(["run/samples.npz", "device=cpu"]) == ["input=run/samples.npz", "device=cpu"]
    assert positional_input_to_override(["--cfg", "job", "a.npz"]) == ["--cfg", "job", "input=a.npz"]
    assert positional_input_to_override(["input=x.npz"]) == ["input=x.npz"]
    assert positional_input_to_override(["my dir/s.npz"]) == ["input='my dir/s.npz'"]


def test_evaluate_a_samples_npz_written_by_dpdm_sample(checkpoint, work):
    from dpdm.cli.sample import run_sampling

    out = work / "sampled"
    # dpdm-sample's own code path, in process (its console script is tested in test_train_cli.py).
    run_sampling(_compose("sample", [f"ckpt={checkpoint}", "n=60", f"out={out}", "sampler.num_steps=2"]))
    proc = _evaluate([str(out / "samples.npz"), *_fast_overrides(work / "cache")], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    m = result["metrics"]
    for key in ("eval/fd_classifier_test", "eval/real_cnn_acc_on_synthetic",
                "eval/acc_logreg", "eval/acc_cnn", "eval/val_acc_cnn", "eval/best_epoch_cnn"):
        assert np.isfinite(m[key]), key
    assert not any(k.startswith("eval/fid") for k in m)
    assert "fid.weights_path=" in result["unavailable"]["fid"]
    assert result["details"]["num_samples"] == 60 and result["details"]["class_counts"] == [6] * 10
    assert result["details"]["downstream"]["num_held_out"] == 20
    # The table: one line per metric, FID marked unavailable with the reason.
    assert "eval/fd_classifier_test " in proc.stdout and "eval/fid" in proc.stdout
    assert "unavailable" in proc.stdout and "fid.weights_path=" in proc.stdout
    assert "dataset: mnist" in proc.stdout


def test_evaluate_a_checkpoint_draws_and_keeps_its_samples(checkpoint, work, monkeypatch):
    from dpdm.cli.evaluate import run_evaluation

    monkeypatch.setenv("TORCH_HOME", str(work / "torch_home"))
    out = work / "from_ckpt"
    result = run_evaluation(_compose("evaluate", [
        f"input={checkpoint}", f"out={out}", "num_samples=30", "sampler.num_steps=2", "device=cpu",
        "evaluation.metrics=[fd_classifier,real_cnn_on_synthetic,fid]", *_fast_overrides(work / "cache")]))
    assert json.loads((out / "eval.json").read_text())["metrics"] == result["metrics"]
    assert result["dataset"] == "mnist" and result["dataset_source"] == "input"
    assert result["sampler"]["num_steps"] == 2 and result["privacy"] == {"enabled": False}
    assert set(result["metrics"]) == {"eval/fd_classifier_test", "eval/real_cnn_acc_on_synthetic"}
    assert "fid" in result["unavailable"]
    saved = np.load(out / "eval_samples.npz")
    assert saved["x"].shape == (30, 1, 28, 28) and saved["x"].dtype == np.uint8
    assert str(saved["dataset"]) == "mnist"
    # Same seeds, labels and sampler as dpdm-sample: the very same images.
    from dpdm.cli.sample import run_sampling

    run_sampling(_compose("sample", [f"ckpt={checkpoint}", "n=30", f"out={work / 'ref30'}",
                                     "sampler.num_steps=2", "batch_size=7"]))
    reference = np.load(work / "ref30" / "samples.npz")
    np.testing.assert_array_equal(saved["x"], reference["x"])
    np.testing.assert_array_equal(saved["y"], reference["y"])


def test_precision_recall_tells_real_images_from_an_untrained_nets(checkpoint, work, monkeypatch):
    """Opt-in precision and recall in the real-data CNN's features: 200 real test images (held apart from
    the 200 they are compared with only by chance) score far higher than an untrained net's samples."""
    from dpdm.cli.evaluate import run_evaluation
    from dpdm.cli.sample import run_sampling

    monkeypatch.setenv("TORCH_HOME", str(work / "torch_home"))
    images, labels = load_split("mnist", "test")
    keep = torch.cat([torch.nonzero(labels == c).flatten()[-20:] for c in range(10)])
    real_npz = work / "real200" / "samples.npz"
    real_npz.parent.mkdir()
    np.savez(real_npz, x=images[keep].numpy(), y=labels[keep].numpy(), dataset="mnist")
    run_sampling(_compose("sample", [f"ckpt={checkpoint}", "n=200", f"out={work / 'junk200'}",
                                     "sampler.num_steps=2"]))
    scores = {}
    for name, npz in (("real", real_npz), ("junk", work / "junk200" / "samples.npz")):
        result = run_evaluation(_compose("evaluate", [
            f"input={npz}", "evaluation.metrics=[precision_recall]", *_fast_overrides(work / "cache")]))
        scores[name] = result["metrics"]
        assert set(result["metrics"]) == {"eval/precision_test", "eval/recall_test", "eval/class_precision_test",
                                          "eval/class_recall_test"}
        assert result["details"]["precision_recall"]["num_points"] == {"test": 200}
    for key in scores["real"]:
        assert scores["real"][key] > scores["junk"][key], (key, scores)
    # Pooled precision flatters near-identical junk (it can fall inside one large real ball); recall and
    # the per-class figures cannot be fooled that way.
    for key in ("eval/recall_test", "eval/class_recall_test", "eval/class_precision_test"):
        assert scores["real"][key] > scores["junk"][key] + 0.3, (key, scores)


def test_missing_input_is_a_user_error(work):
    from dpdm.cli.errors import _user_errors
    from dpdm.cli.evaluate import run_evaluation

    with pytest.raises(_user_errors(), match="does not exist"):
        run_evaluation(_compose("evaluate", [f"input={work / 'nope.npz'}"]))


# ---- callbacks ----------------------------------------------------------------------------------------

class RealImageGenerator(pl.LightningModule):
    """Stands in for DPDiffusionModule: `sample` returns real test images of the requested classes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.denoiser = nn.Module()
        self.denoiser.net = nn.Module()
        self.denoiser.net.num_classes = 10
        images, labels = load_split("mnist", "test")
        self.by_class = [images[labels == c] for c in range(10)]

    def sample(self, *, seeds, class_labels=None, sampler=None):
        x = torch.stack([self.by_class[int(c)][s] for s, c in zip(seeds, class_labels, strict=True)])
        return x.float() / 127.5 - 1

    def epsilon_spent(self):
        return 1.0

    def training_step(self, batch, batch_idx):
        return (self.w ** 2).sum() + batch[0].sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)


def test_callback_logs_the_same_names_to_csv_and_json(work, tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from dpdm.training.eval_callbacks import SyntheticDataEvaluation

    callback = SyntheticDataEvaluation(
        output_dir=str(tmp_path), dataset="mnist", data_dir=str(REPO / "data"), every_n_epochs=1,
        num_samples=100, sampler={"name": "edm_heun", "num_steps": 18}, num_steps=2,
        evaluation={"metrics": ["fd_classifier", "real_cnn_on_synthetic", "downstream"],
                    "cache_dir": str(work / "cache"),
                    **FAST, "real_classifier": {**FAST["real_classifier"], "train_split": "test"}})
    assert callback.sampler == {"name": "edm_heun", "num_steps": 2}
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv", version=""),
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(RealImageGenerator())
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("eval/fd_classifier_test", "eval/real_cnn_acc_on_synthetic", "eval/acc_cnn", "eval/val_acc_cnn"):
        assert key in header, key
    col = header.index("eval/real_cnn_acc_on_synthetic")
    logged = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert len(logged) == 2                            # two epoch ends; the final result reuses the last
    files = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert files == ["eval_epoch_0000.json", "eval_epoch_0001.json", "eval_final.json"]
    final = json.loads((tmp_path / "eval" / "eval_final.json").read_text())
    assert final["metrics"]["eval/real_cnn_acc_on_synthetic"] == pytest.approx(logged[-1])
    assert final["epsilon"] == 1.0 and final["details"]["downstream"]["num_train"] == 100
    # Real images scored by a (briefly trained) real-data CNN: far above chance.
    assert final["metrics"]["eval/real_cnn_acc_on_synthetic"] > 0.3


@pytest.mark.parametrize("evaluation,words", [
    ({"metrics": ["fid"], "reference_splits": ["train", "test"]}, "fid against the training split"),
    ({"metrics": ["fd_classifier"], "reference_splits": ["test"]}, "trained on the training split"),
    ({"metrics": ["real_cnn_on_synthetic"], "reference_splits": ["test"]}, "trained on the training split"),
    ({"metrics": ["precision_recall"], "reference_splits": ["test"]}, "trained on the training split"),
    ({"metrics": ["precision_recall"], "reference_splits": ["train"], "real_classifier": {"train_split": "test"}},
     "precision_recall against the training split"),
])
def test_callback_refuses_the_private_training_split_unless_nonprivate_metrics_are_on(evaluation, words, tmp_path):
    from dpdm.training.eval_callbacks import SyntheticDataEvaluation

    with pytest.raises(ValueError, match=words):
        SyntheticDataEvaluation(output_dir=str(tmp_path), dataset="mnist", evaluation=evaluation)
    SyntheticDataEvaluation(output_dir=str(tmp_path), dataset="mnist", evaluation=evaluation,
                            log_nonprivate_metrics=True)  # opt-in: allowed, and labelled (below)


def test_opted_in_training_split_metrics_are_labelled_nonprivate():
    from dpdm.evaluation.protocol import EvalSettings, private_data_metrics

    metrics = {"eval/fid": 1.0, "eval/fid_test": 2.0, "eval/fd_classifier": 3.0, "eval/fd_classifier_test": 4.0,
               "eval/real_cnn_acc_on_synthetic": 0.5, "eval/acc_cnn": 0.9}
    paper = EvalSettings.from_dict({"reference_splits": ["train", "test"]})
    assert private_data_metrics(paper, metrics) == {"eval/fid", "eval/fd_classifier", "eval/fd_classifier_test",
                                                    "eval/real_cnn_acc_on_synthetic"}
    public = EvalSettings.from_dict({"reference_splits": ["test"], "real_classifier": {"train_split": "test"}})
    assert private_data_metrics(public, metrics) == set()


def test_callbacks_eval_config_composes_with_the_defaults():
    cfg = _compose("train", ["callbacks=eval", "output_dir=/tmp/unused"])
    assert {"model_checkpoint", "privacy_ledger", "sample_grid", "eval_fid", "eval_downstream"} <= set(cfg.callbacks)
    fid_cb = instantiate(cfg.callbacks.eval_fid)
    down_cb = instantiate(cfg.callbacks.eval_downstream)
    assert fid_cb.every == 10 and fid_cb.num_samples == 5000 and "fid" in fid_cb.settings.metrics
    assert fid_cb.sampler["name"] == cfg.sampler.name
    assert down_cb.every is None and down_cb.at_end and down_cb.settings.downstream.max_epochs == 50
    # Private by default: public test-split references and a CNN trained on public data only.
    assert fid_cb.settings.reference_splits == ("test",) and fid_cb.settings.real_classifier.train_split == "test"
    with pytest.raises(Exception, match="training split is the private data"):
        instantiate(_compose("train", ["callbacks=eval", "output_dir=/tmp/unused",
                                       "callbacks.eval_fid.evaluation.reference_splits=[train]"]).callbacks.eval_fid)


def test_privacy_of_a_checkpoint_counts_the_steps_that_ran_not_the_plan():
    """A run stopped early spent less than planned: eval.json states the ε of the accountant's history."""
    from dpdm.cli.evaluate import _privacy_of
    from dpdm.privacy.accounting import mechanism_epsilon

    plan = {"enabled": True, "noise_multiplier": 0.8, "sample_rate": 0.01, "delta": 1e-5, "accountant": "rdp",
            "planned_steps": 1000}
    ckpt = {"dpdm": {"plan": plan, "accountant": {"history": [[0.8, 0.01, 120], [0.8, 0.01, 30]]}}}
    got = _privacy_of(ckpt)
    assert got["steps"] == 150
    assert got["epsilon"] == pytest.approx(mechanism_epsilon(noise_multiplier=0.8, sample_rate=0.01, steps=150,
                                                         delta=1e-5), rel=1e-12)
    assert got["epsilon"] < mechanism_epsilon(noise_multiplier=0.8, sample_rate=0.01, steps=1000, delta=1e-5)
