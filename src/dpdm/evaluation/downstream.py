"""The downstream protocol: train on synthetic data, select on held-out synthetic data, test on real data.

DPDM (Dockhorn et al. 2023, Sec. 5) following GS-WGAN / DP-Sinkhorn: logistic regression, an MLP and a
CNN, Adam (lr 3e-4), batch 128, up to 50 epochs; the epoch reported is the one with the best accuracy
on *held-out synthetic* data, never on the real test set (that would leak test labels into the model
choice). Images are uint8 (N, C, H, W) everywhere outside this module and float in [-1, 1] inside it.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from dpdm.nets.classifiers import make_classifier
from dpdm.utils.images import from_uint8

__all__ = [
    "ClassifierResult",
    "LabeledImages",
    "TrainSettings",
    "accuracy",
    "class_counts",
    "evaluate_downstream",
    "seeded",
    "split_held_out",
    "to_model_input",
    "train_classifier",
]


@dataclass(frozen=True)
class LabeledImages:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> LabeledImages:
        return LabeledImages(self.images[index], self.labels[index])


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one downstream classifier; the defaults are the paper's."""

    max_epochs: int = 50
    batch_size: int = 128
    lr: float = 3e-4
    patience: int | None = None  # stop after this many epochs without held-out improvement (None: never)
    eval_batch_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("max_epochs, batch_size and eval_batch_size must be >= 1")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")


@dataclass
class ClassifierResult:
    name: str
    test_acc: float            # real test set, at the selected epoch
    val_acc: float | None      # held-out synthetic data, at the selected epoch (None: no selection)
    best_epoch: int            # 1-based epoch whose weights were kept
    epochs_run: int
    train_seconds: float
    val_history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def to_model_input(images: torch.Tensor, *, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1], the scaling the classifiers are trained with."""
    return from_uint8(images, device=device)


def class_counts(labels: torch.Tensor, *, num_classes: int) -> list[int]:
    return torch.bincount(labels.clamp_min(0), minlength=num_classes).tolist()


def split_held_out(data: LabeledImages, *, size: int, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """(train, held-out) with `size` held-out examples drawn class by class (stratified), seeded."""
    n = len(data)
    if not 0 < size < n:
        raise ValueError(f"cannot hold out {size} of {n} synthetic samples for model selection; "
                         "choose a held-out size between 1 and N - 1")
    gen = torch.Generator().manual_seed(seed)
    # Stratify by giving each class's examples a random rank, then taking the lowest ranks
    # proportionally: ordering by (rank within class / class size) interleaves classes evenly.
    perm = torch.randperm(n, generator=gen)
    labels = data.labels[perm]
    position = torch.empty(n, dtype=torch.float64)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        position[idx] = (torch.arange(len(idx), dtype=torch.float64) + 0.5) / len(idx)
    order = perm[torch.argsort(position, stable=True)]
    held, kept = order[:size].sort().values, order[size:].sort().values
    return data.subset(kept), data.subset(held)


@torch.no_grad()
def accuracy(model: nn.Module, data: LabeledImages, *, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = to_model_input(data.images[start:start + batch_size], device=device)
        y = data.labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / max(len(data), 1)


@contextmanager
def seeded(seed: int, *, device: torch.device | str = "cpu") -> Iterator[None]:
    """Global RNG seeded for the block and restored afterwards.

    Classifier initialisation and dropout draw from the global RNG; the callbacks train classifiers
    in the middle of a diffusion run, whose random stream must not move.
    """
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


EpochHook = Callable[[int, "float | None"], None]


def train_classifier(model: nn.Module | Callable[[], nn.Module], *, train: LabeledImages,
                     val: LabeledImages | None, settings: TrainSettings, device: torch.device | str = "cpu",
                     on_epoch: EpochHook | None = None) -> tuple[nn.Module, ClassifierResult]:
    """Adam + cross-entropy; keeps the weights of the epoch with the best held-out accuracy.

    Without `val` there is no selection: the last epoch is kept. `model` may be a factory, which is
    then called under `settings.seed` too, so initialisation is seeded as well. `on_epoch(epoch,
    held-out accuracy or None)` reports progress.
    """
    with seeded(settings.seed, device=device):
        if not isinstance(model, nn.Module):
            model = model()
        return _train(model.to(device), train=train, val=val, settings=settings, device=device,
                      on_epoch=on_epoch or (lambda epoch, acc: None))


def _train(model, *, train, val, settings, device, on_epoch):
    t0 = time.perf_counter()
    x_all = to_model_input(train.images, device=device)
    y_all = train.labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    shuffle = torch.Generator().manual_seed(settings.seed)
    best_state, best_acc, best_epoch, history, stale = None, -1.0, 0, [], 0
    for epoch in range(1, settings.max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(train), generator=shuffle).split(settings.batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is None:
            best_epoch = epoch
            on_epoch(epoch, None)
            continue
        acc = accuracy(model, val, batch_size=settings.eval_batch_size, device=device)
        history.append(acc)
        on_epoch(epoch, acc)
        if acc > best_acc:
            best_acc, best_epoch, stale = acc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if settings.patience is not None and stale >= settings.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result = ClassifierResult(name=type(model).__name__.lower(), test_acc=float("nan"),
                              val_acc=best_acc if val is not None else None, best_epoch=best_epoch,
                              epochs_run=epoch, train_seconds=time.perf_counter() - t0,
                              val_history=history)
    return model, result


def evaluate_downstream(*, train: LabeledImages, val: LabeledImages, test: LabeledImages,
                        classifiers: Sequence[str] = ("logreg", "mlp", "cnn"), num_classes: int = 10,
                        settings: TrainSettings = TrainSettings(), device: torch.device | str = "cpu",
                        log: Callable[[str], None] | None = None) -> dict[str, ClassifierResult]:
    """Each classifier trained on synthetic `train`, selected on synthetic `val`, scored on real `test`.
    `log` gets a line per epoch (the paper's n takes 12-25 min on 2 CPU cores) and each test accuracy."""
    results = {}
    for name in classifiers:
        t0 = time.perf_counter()
        on_epoch = None if log is None else (
            lambda epoch, acc, name=name, t0=t0: log(
                f"downstream {name}: epoch {epoch}/{settings.max_epochs}"
                + ("" if acc is None else f", held-out synthetic accuracy {acc:.4f}")
                + f" ({time.perf_counter() - t0:.0f}s)"))
        model, result = train_classifier(lambda name=name: make_classifier(name, num_classes=num_classes),
                                         train=train, val=val, settings=settings, device=device,
                                         on_epoch=on_epoch)
        # The real test set is touched once, after selection.
        result.name = name
        result.test_acc = accuracy(model, test, batch_size=settings.eval_batch_size, device=device)
        if log is not None:
            log(f"downstream {name}: epoch {result.best_epoch} kept, {result.test_acc:.4f} on the real test set")
        results[name] = result
    return results
