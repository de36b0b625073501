#!/usr/bin/env bash
# The GPU measurements of issues 6 and 7, as one device run. Prepare HERE first:
#   bash scripts/gpu/fetch_wheels.sh          # → .whl/
#   make data-mnist                           # → data/mnist (54 MB; the device has no network)
# then, through the device tool (it runs in the repo root; $OUT comes back):
#   run(command="bash scripts/gpu/checks.sh bench", carry=[".whl", "data/mnist"], timeout_s=420)
#   run(command="bash scripts/gpu/checks.sh fast",  carry=[".whl", "data/mnist"], timeout_s=600)
# Modes:
#   bench  benchmarks/train_step.py, paper network, 128 x K=32: fp32 and bf16 (issue 6's table)
#   fast   dpdm-reproduce mnist-fast: train -> sample -> CNN accuracy (issue 7's preset)
#   smoke  the same plumbing on a CPU with tiny settings (to test this script where there is no GPU)
set -uo pipefail
MODE=${1:-bench}
OUT=${OUT:-/tmp/dpdm-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$(dirname "$0")/../.."
REPO=$PWD

# Dependencies: the carried wheels into /tmp/site; dpdm itself from the source tree (its Hydra configs
# live in conf/ beside src/), with console-script shims so dpdm-reproduce's commands resolve.
if compgen -G ".whl/*.whl" > /dev/null; then
  "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$REPO/src
else
  export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
fi
PY=$(command -v "${PY:-python3}")  # on the H200 image, python3 is the one with torch
mkdir -p /tmp/dpdm-bin
for cmd in train sample evaluate data privacy report reproduce audit; do
  printf '#!/bin/sh\nexec %s -m dpdm.cli.%s "$@"\n' "$PY" "$cmd" > /tmp/dpdm-bin/dpdm-$cmd
  chmod +x /tmp/dpdm-bin/dpdm-$cmd
done
export PATH=/tmp/dpdm-bin:$PATH

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PY -c "import torch, opacus, pytorch_lightning as pl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'opacus', opacus.__version__, 'lightning', pl.__version__)"; } \
  2>&1 | tee "$OUT/env.txt"

case "$MODE" in
  bench)
    for prec in fp32 bf16; do
      timeout 200 $PY benchmarks/train_step.py --preset paper --precision "$prec" \
        --variants nonprivate,dpdm,dpdm_unfold,opacus --out "$OUT/train_step.json" 2>&1 \
        | grep -v Warning | tee "$OUT/bench_$prec.txt"
    done ;;
  fast)
    timeout 580 $PY -m dpdm.cli.reproduce mnist-fast --runs-dir "$OUT/runs" --results "$OUT/mnist_fast.md" \
      2>&1 | tail -n 200 | tee "$OUT/fast.txt"
    for f in "$OUT"/runs/*/privacy.json "$OUT"/runs/*/summary.json; do
      [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
    rm -rf "$OUT/runs" ;;  # checkpoints and samples do not come back (size); the tables and JSON do
  smoke)
    timeout 300 $PY benchmarks/train_step.py --device cpu --net ddpmpp_tiny --batch 2 --k 2 --steps 1 \
      --warmup 1 --rounds 1 --threads 1 --no-memory --variants nonprivate,dpdm,opacus \
      --out "$OUT/train_step.json" 2>&1 | grep -v Warning | tee "$OUT/bench_smoke.txt"
    timeout 600 $PY -m dpdm.cli.reproduce mnist-fast --shrink --allow-cpu --runs-dir "$OUT/runs" \
      --results "$OUT/mnist_fast.md" 2>&1 | tail -n 40 | tee "$OUT/fast.txt" ;;
  *) echo "usage: $0 bench|fast|smoke"; exit 2 ;;
esac
echo "files in $OUT:"; ls -la "$OUT"
