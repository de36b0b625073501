"""Score dpdm-sample files with the learning-curve protocol and append one JSON row per file.

    python scripts/study/score_npz.py <rows.jsonl> <label>=<samples.npz> [<label>=<samples.npz> ...]

The protocol of results/cpu.md's learning curve: the downstream CNN trained on the samples with a fifth
held out for model selection, tested on the real test split of the samples' dataset (stored in the
npz by dpdm-sample; MNIST when absent); plus agreement and fd_classifier against that test split. A label
ending in `+median3` or `+threshold<T>` scores the samples after that
data-independent clean-up (post-processing of DP samples: no private data is touched).
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from dpdm.evaluation.downstream import LabeledImages
from dpdm.evaluation.protocol import Evaluator
from dpdm.evaluation.synthetic import samples_from_npz
from dpdm.experiments.cpu_results import STUDY_FILE, curve_settings
from dpdm.experiments.study import Study, append_row


def median3(x: torch.Tensor) -> torch.Tensor:
    p = F.pad(x.float(), (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)
    return p.reshape(*p.shape[:4], 9).median(-1).values.to(torch.uint8)


def clean(label: str, s: LabeledImages) -> LabeledImages:
    if label.endswith("+median3"):
        return LabeledImages(median3(s.images), s.labels)
    if "+threshold" in label:  # pixels below T (0-255) become background
        t = int(label.rsplit("+threshold", 1)[1])
        return LabeledImages(torch.where(s.images < t, torch.zeros_like(s.images), s.images), s.labels)
    return s


def main(out: str, *pairs: str) -> None:
    # results/cpu.md's study settings (30 epochs, patience 5) under the curve's protocol.
    settings = curve_settings(Study.load(STUDY_FILE).evaluation)
    evaluators = {}
    for pair in pairs:
        label, path = pair.split("=", 1)
        samples, dataset = samples_from_npz(path)
        dataset = dataset or "mnist"
        if dataset not in evaluators:
            evaluators[dataset] = Evaluator(dataset=dataset, settings=settings,
                                            data_dir=os.environ.get("DPDM_DATA_DIR", "data"))
        t = time.time()
        m = evaluators[dataset].evaluate(clean(label, samples),
                        metrics=["downstream", "real_cnn_on_synthetic", "fd_classifier"]).metrics
        row = {"variant": label, "dataset": dataset, "n": len(samples), "samples": path,
               "acc_cnn": m.get("eval/acc_cnn"),
               "agreement": m.get("eval/real_cnn_acc_on_synthetic"),
               "fd_classifier": m.get("eval/fd_classifier_test"), "score_s": round(time.time() - t)}
        print(json.dumps(row), flush=True)
        append_row(out, row)


if __name__ == "__main__":
    main(*sys.argv[1:])
