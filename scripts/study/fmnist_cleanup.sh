#!/usr/bin/env bash
# Is the speckled background what holds fmnist_eps10_cpu's CNN at 75%? The preset's scored set (12,000
# samples of the B = 1536 DP run, Heun 14, w = 0, σ_min 0.05) scored raw, after a 3x3 median filter and
# after setting pixels below 51 (0.2) to background: data-independent post-processing of DP samples, so
# the guarantee is unchanged. The learning-curve protocol (CNN, a fifth held out, real test set), so the
# rows compare with each other, not with results/cpu.md's 10,000 + 2,000 protocol.
set -e
cd "$(dirname "$0")/../.." && source .venv/bin/activate
# The B = 1536 run was moved aside when the preset changed recipe (dpdm-reproduce keeps it as dp.old1).
S=runs/study/cpu_presets/fmnist_eps10_cpu/dp.old1/samples_preset/samples.npz
python scripts/study/score_npz.py results/study/fmnist_cleanup.jsonl \
  "w0=$S" "w0+median3=$S" "w0+threshold51=$S"
