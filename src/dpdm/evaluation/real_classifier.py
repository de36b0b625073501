"""A CNN trained on the *real* training set: feature space of `fd_classifier`, and the reverse check.

Not part of the paper's protocol. It exists because FID needs weights that cannot be downloaded
everywhere: the Fréchet distance in this CNN's 128-d hidden layer works offline for tracking progress,
and its accuracy on class-y samples says whether they look like y. Its weights are cached (keyed by
dataset and training settings), because values are only comparable under the same weights: eval.json
records their sha256.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dpdm.evaluation.downstream import LabeledImages, TrainSettings, accuracy, to_model_input, train_classifier
from dpdm.evaluation.frechet import FrechetDistance
from dpdm.nets.classifiers import CNN
from dpdm.utils.checksums import sha256_file
from dpdm.utils.files import atomic_path

__all__ = ["ClassifierFeatures", "RealClassifier", "RealClassifierSettings", "classifier_frechet_distance",
           "load_or_train_real_classifier"]


@dataclass(frozen=True)
class RealClassifierSettings:
    max_epochs: int = 10        # reaches ≥ 98.5% on the MNIST test set (tests/test_classifiers.py, slow)
    num_train: int | None = None  # a seeded subset of the real training set for a faster CPU setting
    batch_size: int = 128
    lr: float = 3e-4
    seed: int = 0
    # train: the paper-style reference CNN, trained on the real training split (private when that split is
    # the private data). test: trained on 4/5 of the public test split, checked on the other fifth
    # (what training-time callbacks use by default: docs/privacy.md).
    train_split: str = "train"

    def __post_init__(self) -> None:
        if self.train_split not in ("train", "test"):
            raise ValueError(f"real_classifier.train_split must be train or test, got {self.train_split!r}")

    def cache_key(self, dataset: str) -> str:
        d = asdict(self)
        if d["train_split"] == "train":
            del d["train_split"]  # the key of CNNs cached before the option existed
        blob = json.dumps({"dataset": dataset, "arch": "cnn-v1", **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class RealClassifier:
    model: CNN
    path: Path
    weights_sha256: str
    test_acc: float
    settings: dict


class ClassifierFeatures(nn.Module):
    """uint8 images → the CNN's 128-d hidden layer in float64 (so torchmetrics returns float64 distances)."""

    def __init__(self, cnn: CNN) -> None:
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)
        self.num_features = cnn.num_features

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # frozen extractor: dropout must never be active

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cnn.features(to_model_input(images, device=images.device)).double()


def classifier_frechet_distance(*, cnn: CNN, device: torch.device | str = "cpu") -> FrechetDistance:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=ClassifierFeatures(cnn), normalize=False)
    return FrechetDistance(metric=metric, device=device)


def load_or_train_real_classifier(*, dataset: str, train: LabeledImages, test: LabeledImages,
                                  cache_dir: str | Path, settings: RealClassifierSettings = RealClassifierSettings(),
                                  num_classes: int = 10, device: torch.device | str = "cpu",
                                  log=print) -> RealClassifier:
    """The cached CNN for (dataset, settings), training it on `train` first if the cache lacks it."""
    path = Path(cache_dir) / f"real_cnn_{settings.cache_key(dataset)}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = CNN(num_classes=num_classes)
        model.load_state_dict(blob["state_dict"])
        return RealClassifier(model.to(device).eval(), path, sha256_file(path), float(blob["test_acc"]),
                              blob["settings"])
    if settings.num_train is not None and settings.num_train < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(settings.seed))
        train = train.subset(keep[: settings.num_train].sort().values)
    log(f"training the real-data CNN for fd_classifier ({len(train)} images, {settings.max_epochs} epochs); "
        f"cached afterwards at {path}")
    t0 = time.perf_counter()
    model, _ = train_classifier(
        lambda: CNN(num_classes=num_classes), train=train, val=None, device=device,
        settings=TrainSettings(max_epochs=settings.max_epochs, batch_size=settings.batch_size,
                               lr=settings.lr, seed=settings.seed),
        on_epoch=lambda epoch, _: log(f"real-data CNN: epoch {epoch}/{settings.max_epochs} "
                                      f"({time.perf_counter() - t0:.0f}s)"))
    test_acc = accuracy(model, test, device=device)
    log(f"real-data CNN: {test_acc:.4f} accuracy on the real test set")
    meta = {"dataset": dataset, **asdict(settings), "num_train_used": len(train)}
    _save_atomic({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                  "test_acc": test_acc, "settings": meta}, path)
    return RealClassifier(model.eval(), path, sha256_file(path), test_acc, meta)


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
