"""The whole evaluation of a set of synthetic images, shared by `dpdm-evaluate` and the training callbacks.

`Evaluator` holds what is expensive to rebuild (real data, feature extractors, cached reference
statistics, the real-data CNN) so that a callback evaluating every few epochs pays for it once.
Every metric has one name (`eval/...`, see docs/evaluation.md) in eval.json, CSV and wandb alike. A
metric that cannot be computed is listed under `unavailable` with the reason, never estimated.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dpdm.evaluation.downstream import (
    LabeledImages,
    TrainSettings,
    accuracy,
    class_counts,
    evaluate_downstream,
    split_held_out,
)
from dpdm.evaluation.frechet import FeatureStats, FrechetDistance, cached_feature_stats
from dpdm.evaluation.inception import (
    INCEPTION_SHA256,
    INCEPTION_URL,
    FIDUnavailable,
    inception_frechet_distance,
    resolve_inception_weights,
)
from dpdm.evaluation.precision_recall import class_precision_recall, precision_recall
from dpdm.evaluation.real_classifier import (
    ClassifierFeatures,
    RealClassifier,
    RealClassifierSettings,
    classifier_frechet_distance,
    load_or_train_real_classifier,
)
from dpdm.utils.checksums import sha256_file

__all__ = ["DEFAULT_METRICS", "METRIC_GROUPS", "DownstreamSettings", "EvalReport", "EvalSettings", "Evaluator",
           "FIDSettings", "PrecisionRecallSettings", "metric_key", "private_data_metrics", "private_data_uses"]

log = logging.getLogger("dpdm.evaluate")

DEFAULT_METRICS = ("fid", "fd_classifier", "downstream", "real_cnn_on_synthetic")
# precision_recall is opt-in: a diagnostic of variety (docs/evaluation.md), not part of the paper's protocol.
METRIC_GROUPS = (*DEFAULT_METRICS, "precision_recall")
# The real-data CNN's features: every group below depends on the data that CNN was trained on.
_REAL_CNN_GROUPS = {"fd_classifier", "real_cnn_on_synthetic", "precision_recall"}
_PR_NAMES = ("precision", "recall", "class_precision", "class_recall")


def metric_key(group: str, split: str = "train") -> str:
    """`eval/fid` against the training set (the paper's reference), `eval/fid_test` against the test set."""
    return f"eval/{group}" if split == "train" else f"eval/{group}_{split}"


def private_data_uses(settings: EvalSettings) -> list[str]:
    """What these settings compute from the real *training* split (the private data of a dpdm run)."""
    uses = []
    distances = [g for g in ("fid", "fd_classifier", "precision_recall") if g in settings.metrics]
    if distances and "train" in settings.reference_splits:
        uses.append(f"{' and '.join(distances)} against the training split (evaluation.reference_splits)")
    if settings.real_classifier.train_split == "train" and _REAL_CNN_GROUPS & set(settings.metrics):
        uses.append("the real-data CNN of fd_classifier / real_cnn_on_synthetic / precision_recall, trained on "
                    "the training split (evaluation.real_classifier.train_split)")
    return uses


def private_data_metrics(settings: EvalSettings, metrics: dict[str, float]) -> set[str]:
    """The keys of `metrics` that depend on the real training split under these settings."""
    against_train = ("fid", "fd_classifier", *_PR_NAMES)
    out = {metric_key(g, "train") for g in against_train} if "train" in settings.reference_splits else set()
    if settings.real_classifier.train_split == "train":
        out |= {k for k in metrics if k.startswith("eval/fd_classifier")} | {"eval/real_cnn_acc_on_synthetic"}
        out |= {metric_key(g, split) for g in _PR_NAMES for split in ("train", "test")}
    return out & set(metrics)


@dataclass(frozen=True)
class FIDSettings:
    weights_path: str | None = None  # the standard Inception file; None: the torch hub cache
    verify_weights: bool = True      # require the standard file's sha256
    download: bool = True            # fetch the standard file into the torch hub cache when it is missing
    url: str = INCEPTION_URL         # where from (a mirror, or file:// for an offline copy)
    antialias: bool = False          # False: TF-1.x-compatible resize, as reference FIDs
    batch_size: int = 200


@dataclass(frozen=True)
class PrecisionRecallSettings:
    k: int = 3                       # the ball around each point reaches its k-th nearest neighbour (the paper's 3)
    num_points: int | None = None    # points per set; None: as many as the smaller of samples and split
    seed: int = 0                    # which points, when a set is cut down to num_points

    def __post_init__(self) -> None:
        if self.k < 1 or (self.num_points is not None and self.num_points <= self.k):
            raise ValueError(f"precision_recall needs k >= 1 and num_points > k, got k={self.k}, "
                             f"num_points={self.num_points}")


@dataclass(frozen=True)
class DownstreamSettings:
    classifiers: tuple[str, ...] = ("logreg", "mlp", "cnn")
    val_size: float = 10000          # held-out synthetic samples: a count (≥ 1) or a fraction (< 1)
    max_epochs: int = 50
    batch_size: int = 128
    lr: float = 3e-4
    patience: int | None = None
    seed: int = 0

    def train_settings(self) -> TrainSettings:
        return TrainSettings(max_epochs=self.max_epochs, batch_size=self.batch_size, lr=self.lr,
                             patience=self.patience, seed=self.seed)

    def protocol(self) -> dict:
        """What a classifier's score depends on besides the samples (which classifiers run does not)."""
        return {k: v for k, v in asdict(self).items() if k != "classifiers"}

    def held_out_count(self, n: int) -> int:
        return int(round(self.val_size * n)) if 0 < self.val_size < 1 else int(self.val_size)


@dataclass(frozen=True)
class EvalSettings:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    reference_splits: tuple[str, ...] = ("train", "test")
    fid: FIDSettings = FIDSettings()
    real_classifier: RealClassifierSettings = RealClassifierSettings()
    downstream: DownstreamSettings = DownstreamSettings()
    precision_recall: PrecisionRecallSettings = PrecisionRecallSettings()
    cache_dir: str | None = None     # None: <data_dir>/<dataset>/eval_cache

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRIC_GROUPS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRIC_GROUPS)}")
        bad = set(self.reference_splits) - {"train", "test"}
        if bad or not self.reference_splits:
            raise ValueError(f"reference_splits must be a non-empty subset of [train, test], got "
                             f"{list(self.reference_splits)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EvalSettings:
        """From a plain (Hydra / YAML) mapping; missing keys keep their defaults, unknown keys are refused."""
        d = dict(d or {})
        nested = {"fid": FIDSettings, "real_classifier": RealClassifierSettings,
                  "downstream": DownstreamSettings, "precision_recall": PrecisionRecallSettings}
        kwargs = {}
        for name, value in d.items():
            if name in nested:
                kwargs[name] = _build(nested[name], value or {})
            elif name in {f.name for f in fields(cls)}:
                kwargs[name] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"unknown evaluation setting {name!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {sorted(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class EvalReport:
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "unavailable": self.unavailable, "details": self.details}


class Evaluator:
    """Evaluates synthetic images of one dataset against its real splits."""

    def __init__(self, *, dataset: str, data_dir: str | Path | None = None,
                 settings: EvalSettings = EvalSettings(), device: torch.device | str = "cpu") -> None:
        from dpdm.data import dataset_dir, dataset_info

        self.dataset, self.data_dir = dataset, data_dir
        self.info = dataset_info(dataset)
        self.settings, self.device = settings, torch.device(device)
        self.cache_dir = (Path(settings.cache_dir) if settings.cache_dir
                          else dataset_dir(dataset, data_dir) / "eval_cache")
        self._real: dict[str, LabeledImages] = {}
        self._real_cnn: RealClassifier | None = None
        self._fd: dict[str, tuple[FrechetDistance, dict[str, FeatureStats], dict]] = {}
        self._fd_unavailable: dict[str, str] = {}  # looked up once per Evaluator, logged once
        self._real_features: dict[str, torch.Tensor] = {}

    # ---- lazily built, then reused ---------------------------------------------------------------
    def real(self, split: str) -> LabeledImages:
        if split not in self._real:
            from dpdm.data import load_split

            self._real[split] = LabeledImages(*load_split(self.dataset, split, data_dir=self.data_dir))
        return self._real[split]

    def real_cnn(self) -> RealClassifier:
        if self._real_cnn is None:
            s = self.settings.real_classifier
            train, check = self.real("train"), self.real("test")
            if s.train_split == "test":  # public data only: 4/5 of the test split to train, 1/5 to check
                test = self.real("test")
                perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(s.seed))
                n_check = len(test) // 5
                train, check = test.subset(perm[n_check:].sort().values), test.subset(perm[:n_check].sort().values)
            self._real_cnn = load_or_train_real_classifier(
                dataset=self.dataset, train=train, test=check,
                cache_dir=self.cache_dir, settings=self.settings.real_classifier,
                num_classes=self.info.num_classes, device=self.device, log=log.info)
        return self._real_cnn

    def _frechet(self, group: str) -> tuple[FrechetDistance, dict[str, FeatureStats], dict]:
        """(distance, reference stats per split, identity of the extractor) for `fid` / `fd_classifier`."""
        if group not in self._fd:
            fd, ident, stem = self._inception() if group == "fid" else self._classifier_features()
            refs = {split: cached_feature_stats(
                        path=self.cache_dir / f"{stem}_{split}.npz",
                        compute=lambda split=split: self._reference(fd, split, ident["batch_size"], group),
                        dataset=self.dataset, split=split, extractor=stem)
                    for split in self.settings.reference_splits}
            self._fd[group] = (fd, refs, ident)
        return self._fd[group]

    def _inception(self) -> tuple[FrechetDistance, dict, str]:
        s = self.settings.fid
        path = resolve_inception_weights(weights_path=s.weights_path, verify=s.verify_weights,
                                         download=s.download, url=s.url)
        digest = INCEPTION_SHA256 if s.verify_weights else sha256_file(path)
        fd = inception_frechet_distance(weights_path=path, antialias=s.antialias, device=self.device)
        ident = {"weights": str(path), "weights_sha256": digest, "verified": s.verify_weights,
                 "antialias": s.antialias, "features": "inception-v3 pool3 (2048)", "batch_size": s.batch_size}
        return fd, ident, f"inception2048_{digest[:12]}_aa{int(s.antialias)}"

    def _classifier_features(self) -> tuple[FrechetDistance, dict, str]:
        cnn = self.real_cnn()
        fd = classifier_frechet_distance(cnn=cnn.model, device=self.device)
        ident = {"weights": str(cnn.path), "weights_sha256": cnn.weights_sha256, "real_test_acc": cnn.test_acc,
                 "features": "real-data CNN hidden layer (128)", "batch_size": 1000}
        return fd, ident, f"fd_classifier_{cnn.weights_sha256[:12]}"

    def _reference(self, fd: FrechetDistance, split: str, batch_size: int, group: str) -> FeatureStats:
        log.info("computing %s reference statistics of the real %s split (once; cached in %s)",
                 group, split, self.cache_dir)
        return fd.feature_stats(self.real(split).images, batch_size=batch_size)

    # ---- the protocol ----------------------------------------------------------------------------
    def evaluate(self, samples: LabeledImages, *, held_out: LabeledImages | None = None,
                 metrics: Sequence[str] | None = None) -> EvalReport:
        """All requested metric groups on `samples` (uint8; labels −1 when unconditional).

        `held_out` is the synthetic model-selection set of the downstream protocol; without it, one is
        split off `samples` (stratified, `downstream.val_size`). Distances use `samples` only.
        """
        report = EvalReport()
        metrics = tuple(metrics or self.settings.metrics)
        report.details["num_samples"] = len(samples)
        labelled = bool((samples.labels >= 0).all())
        if labelled:
            report.details["class_counts"] = class_counts(samples.labels, num_classes=self.info.num_classes)
        for group in ("fid", "fd_classifier"):
            if group in metrics:
                self._distances(group, samples, report)
        if "precision_recall" in metrics:
            self._precision_recall(samples, labelled, report)
        for group, run in (("real_cnn_on_synthetic", self._reverse_check), ("downstream", self._downstream)):
            if group not in metrics:
                continue
            if not labelled:
                report.unavailable[group] = ("the samples carry no class labels (y = -1, unconditional); "
                                             "sample with classes=balanced from a class-conditional model")
                continue
            run(samples, held_out, report)
        return report

    def _distances(self, group: str, samples: LabeledImages, report: EvalReport) -> None:
        if group in self._fd_unavailable:
            report.unavailable[group] = self._fd_unavailable[group]
            return
        try:
            fd, refs, ident = self._frechet(group)
        except FIDUnavailable as e:
            self._fd_unavailable[group] = report.unavailable[group] = str(e)
            log.warning("%s", e)
            return
        generated = fd.feature_stats(samples.images, batch_size=ident["batch_size"])
        for split, ref in refs.items():
            report.metrics[metric_key(group, split)] = fd.distance(reference=ref, generated=generated)
        if {"train", "test"} <= refs.keys():
            # Real test vs real train: roughly what a perfect generator would score (10k samples).
            ident["real_test_vs_train"] = fd.distance(reference=refs["train"], generated=refs["test"])
        report.details[group] = {**ident, "reference_num_samples": {s: r.num_samples for s, r in refs.items()}}

    def _cnn_features(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        extractor = ClassifierFeatures(self.real_cnn().model)
        with torch.no_grad():
            return torch.cat([extractor(images[i:i + batch_size].to(self.device)).cpu()
                              for i in range(0, len(images), batch_size)])

    def _precision_recall(self, samples: LabeledImages, labelled: bool, report: EvalReport) -> None:
        s = self.settings.precision_recall
        generated = self._cnn_features(samples.images)
        details = report.details["precision_recall"] = {
            "k": s.k, "num_points": {}, "seed": s.seed, "features": "real-data CNN hidden layer (128)",
            "weights_sha256": self.real_cnn().weights_sha256}
        for split in self.settings.reference_splits:
            real = self.real(split)
            if split not in self._real_features:
                self._real_features[split] = self._cnn_features(real.images)
            # Both sets the same size: a denser set has smaller balls, which would tilt the comparison.
            n = min(len(real), len(samples), s.num_points or len(samples))
            gen = torch.Generator().manual_seed(s.seed)
            r_idx, g_idx = torch.randperm(len(real), generator=gen)[:n], torch.randperm(len(samples), generator=gen)[:n]
            r_feat, g_feat = self._real_features[split][r_idx], generated[g_idx]
            p, r = precision_recall(r_feat, g_feat, k=s.k)
            report.metrics[metric_key("precision", split)] = p
            report.metrics[metric_key("recall", split)] = r
            if labelled:
                cp, cr = class_precision_recall(r_feat, real.labels[r_idx], g_feat, samples.labels[g_idx],
                                                num_classes=self.info.num_classes, k=s.k)
                report.metrics[metric_key("class_precision", split)] = cp
                report.metrics[metric_key("class_recall", split)] = cr
            details["num_points"][split] = n

    def _reverse_check(self, samples: LabeledImages, held_out: LabeledImages | None, report: EvalReport) -> None:
        cnn = self.real_cnn()
        report.metrics["eval/real_cnn_acc_on_synthetic"] = accuracy(cnn.model, samples, device=self.device)
        report.details["real_cnn"] = {"weights": str(cnn.path), "weights_sha256": cnn.weights_sha256,
                                      "real_test_acc": cnn.test_acc, "settings": cnn.settings}

    def _downstream(self, samples: LabeledImages, held_out: LabeledImages | None, report: EvalReport) -> None:
        s = self.settings.downstream
        train = samples
        if held_out is None:
            size = s.held_out_count(len(samples))
            if not 0 < size < len(samples):
                report.unavailable["downstream"] = (
                    f"cannot hold out {size} of {len(samples)} synthetic samples for model selection; set "
                    "downstream.val_size to a smaller count or a fraction (e.g. 0.1)")
                return
            train, held_out = split_held_out(samples, size=size, seed=s.seed)
        results = evaluate_downstream(train=train, val=held_out, test=self.real("test"),
                                      classifiers=s.classifiers, num_classes=self.info.num_classes,
                                      settings=s.train_settings(), device=self.device, log=log.info)
        for name, r in results.items():
            report.metrics[f"eval/acc_{name}"] = r.test_acc
            report.metrics[f"eval/val_acc_{name}"] = r.val_acc
            report.metrics[f"eval/best_epoch_{name}"] = float(r.best_epoch)
        report.details["downstream"] = {
            "num_train": len(train), "num_held_out": len(held_out),
            "train_class_counts": class_counts(train.labels, num_classes=self.info.num_classes),
            "settings": asdict(s), "classifiers": {n: r.to_dict() for n, r in results.items()}}
