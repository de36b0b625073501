"""Evaluation as in the DPDM paper: FID and downstream classifiers trained on synthetic data.

Plus offline diagnostics in the feature space of a CNN trained on real data: `fd_classifier` (a Fréchet
distance, *not* FID), the real CNN's accuracy on the synthetic samples and, opt-in, improved precision
and recall.
See docs/evaluation.md for the protocol and every metric name.
"""
from dpdm.evaluation.downstream import (
                                        ClassifierResult,
                                        LabeledImages,
                                        TrainSettings,
                                        accuracy,
                                        evaluate_downstream,
                                        split_held_out,
                                        train_classifier,
)
from dpdm.evaluation.frechet import FeatureStats, FrechetDistance, cached_feature_stats
from dpdm.evaluation.inception import FIDUnavailable, inception_frechet_distance, resolve_inception_weights
from dpdm.evaluation.precision_recall import class_precision_recall, precision_recall
from dpdm.evaluation.protocol import (
                                        METRIC_GROUPS,
                                        DownstreamSettings,
                                        EvalReport,
                                        EvalSettings,
                                        Evaluator,
                                        FIDSettings,
                                        PrecisionRecallSettings,
                                        metric_key,
)
from dpdm.evaluation.real_classifier import (
                                        RealClassifierSettings,
                                        classifier_frechet_distance,
                                        load_or_train_real_classifier,
)
from dpdm.evaluation.synthetic import draw_synthetic_set, samples_from_npz

__all__ = [
    "METRIC_GROUPS",
    "ClassifierResult",
    "DownstreamSettings",
    "EvalReport",
    "EvalSettings",
    "Evaluator",
    "FIDSettings",
    "FIDUnavailable",
    "FeatureStats",
    "FrechetDistance",
    "LabeledImages",
    "PrecisionRecallSettings",
    "RealClassifierSettings",
    "TrainSettings",
    "accuracy",
    "cached_feature_stats",
    "class_precision_recall",
    "classifier_frechet_distance",
    "draw_synthetic_set",
    "evaluate_downstream",
    "inception_frechet_distance",
    "load_or_train_real_classifier",
    "metric_key",
    "precision_recall",
    "resolve_inception_weights",
    "samples_from_npz",
    "split_held_out",
    "train_classifier",
]
