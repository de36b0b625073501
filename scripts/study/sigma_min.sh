#!/usr/bin/env bash
# The step-340 checkpoint of mnist_eps10_cpu sampled (2,000, seeds 0..1999) without guidance at σ_min 0.05
# and 0.3, scored with the learning-curve protocol (CNN, a fifth held out, real test set); plus the
# σ_min 0.05 set after a 3x3 median filter (post-processing: is the speckled background what costs accuracy?).
set -e
cd "$(dirname "$0")/../.." && source .venv/bin/activate
RUN=runs/study/cpu_presets/mnist_eps10_cpu/dp
CK="$RUN/checkpoints/last.ckpt"
D=runs/study/postproc
for smin in 0.05 0.3; do
  out=$D/w0_smin$smin
  [ -f $out/samples.npz ] || dpdm-sample ckpt=$CK n=2000 out=$out batch_size=500 overwrite=true sampler.guidance=0 sampler.sigma_min=$smin > $out.log 2>&1
done
python scripts/study/score_npz.py results/study/cpu_sigma_min.jsonl \
  "w0_smin0.05=$D/w0_smin0.05/samples.npz" "w0_smin0.3=$D/w0_smin0.3/samples.npz" \
  "w0_smin0.05+median3=$D/w0_smin0.05/samples.npz"
# The w = 2 rows (the same seeds as the learning curve's step-340 point of the w = 2 preset), raw and cleaned up.
out=$D/w2_smin0.05
[ -f $out/samples.npz ] || dpdm-sample ckpt=$CK n=2000 out=$out batch_size=500 overwrite=true sampler.guidance=2 sampler.sigma_min=0.05 > $out.log 2>&1
python scripts/study/score_npz.py results/study/cpu_sigma_min.jsonl \
  "w2_smin0.05=$out/samples.npz" "w2_smin0.05+median3=$out/samples.npz" \
  "w2_smin0.05+threshold63=$out/samples.npz" "w2_smin0.05+threshold102=$out/samples.npz"
