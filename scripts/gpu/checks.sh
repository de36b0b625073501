#!/usr/bin/env bash
# The GPU checks (issue 12, item 5; the tables of issues 6 and 7) as ONE device run that fits a session's
# device time: 15 minutes in all, a machine's start (1-2 min) included. Prepare HERE first:
#   bash scripts/gpu/fetch_wheels.sh          # → .whl/
#   make data-mnist                           # → data/mnist (54 MB with its eval cache; the device has no network)
# then, through the device tool (it runs in the repo root; $OUT comes back):
#   run(command="bash scripts/gpu/checks.sh all", carry=[".whl", "data/mnist"], timeout_s=540)
# That leaves about 4 minutes: enough to rerun a failure that came early (the failing stage alone, e.g.
# `BUDGET_S=200 bash scripts/gpu/checks.sh fast`), not the whole run. Give the machine back afterwards.
# Modes:
#   all    bench, then fast, within BUDGET_S seconds (default 510): the one to run
#   bench  benchmarks/train_step.py, paper network, 128 x K=32: fp32 (4 variants) and bf16 (2), short rounds;
#          BENCH_FULL=1 for the benchmark's own step counts (about 3 min more)
#   fast   dpdm-reproduce mnist-fast: train -> sample -> CNN accuracy. Training stops at whatever the budget
#          leaves after RESERVE_S seconds for sampling and evaluation (++trainer.max_time): the page then says
#          "stopped at step N of 580", with ε the accountant's for those N steps. 12,000 samples and the CPU
#          presets' protocol (2,000 held out, ≤ 30 epochs, patience 5: results/cpu.md), not the paper's 70,000.
#   smoke  all's plumbing on a CPU with tiny settings (tests/test_gpu_script.py; no GPU needed)
# What comes back (the device returns at most 8 files): env_bench.txt, train_step.json, fast.txt,
# mnist_fast.md, fast_run.tar.gz (privacy.json, summary.json, reproduce.json, eval.json, metrics.csv, the
# stage logs, the sample grid; no checkpoint, no samples).
set -uo pipefail
MODE=${1:-all}
OUT=${OUT:-/tmp/dpdm-gpu-out}
BUDGET_S=${BUDGET_S:-510}
RESERVE_S=${RESERVE_S:-150}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$(dirname "$0")/../.."
REPO=$PWD
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
hms() { printf '00:%02d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }  # Lightning's max_time

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
  2>&1 | tee "$OUT/env_bench.txt"

bench() {  # BENCH_ARGS: the network and device (default the paper preset); BENCH_ROUNDS: steps per variant
  local rounds=${BENCH_ROUNDS---steps 5 --warmup 2 --rounds 2}
  [ "${BENCH_FULL:-0}" = 1 ] && rounds=""
  local prec variants
  for spec in "fp32 nonprivate,dpdm,dpdm_unfold,opacus" "bf16 nonprivate,dpdm"; do
    read -r prec variants <<< "$spec"
    echo "== bench $prec ($(left) s of the budget left)" | tee -a "$OUT/env_bench.txt"
    # shellcheck disable=SC2086  # $rounds and $BENCH_ARGS are word lists
    timeout 120 $PY benchmarks/train_step.py --precision "$prec" --variants "$variants" $rounds \
      ${BENCH_ARGS:---preset paper} --out "$OUT/train_step.json" 2>&1 | grep -v Warning | tee -a "$OUT/env_bench.txt"
  done
}

fast() {  # $@: extra dpdm-reproduce arguments (smoke: --shrink --allow-cpu)
  local box=$(( $(left) - RESERVE_S ))
  if [ "$box" -lt 60 ]; then
    echo "fast: only $(left) s of the budget left, under RESERVE_S + 60 s of training; not started" | tee "$OUT/fast.txt"
    return 1
  fi
  echo "== fast: training stops after $box s at the latest ($(left) s of the budget left)" | tee "$OUT/fast.txt"
  timeout $(( $(left) - 5 )) $PY -m dpdm.cli.reproduce mnist-fast --runs-dir "$OUT/runs" \
    --results "$OUT/mnist_fast.md" --acc-samples 12000 --train-override "++trainer.max_time=$(hms "$box")" \
    --eval-override evaluation.downstream.val_size=2000 --eval-override evaluation.downstream.max_epochs=30 \
    --eval-override evaluation.downstream.patience=5 "$@" 2>&1 | tail -n 200 | tee -a "$OUT/fast.txt"
  local rc=${PIPESTATUS[0]}
  # dpdm-reproduce writes the page as it ends; one cut off by `timeout` did not: render what finished.
  [ "$rc" -eq 0 ] || $PY -m dpdm.cli.reproduce mnist-fast --runs-dir "$OUT/runs" --results "$OUT/mnist_fast.md" \
    --report-only "$@" >/dev/null 2>&1
  local run="$OUT/runs/mnist_eps10_fast"
  if [ -d "$run" ]; then
    (cd "$run" && tar czf "$OUT/fast_run.tar.gz" --ignore-failed-read privacy.json summary.json reproduce.json \
       config.yaml logs samples_accuracy/eval.json samples_accuracy/grid.png samples $(find . -name metrics.csv) \
       2>/dev/null)
  fi
  rm -rf "$OUT/runs"  # checkpoints and samples do not come back (size, and the 8-file limit)
  echo "fast: exit $rc after $(( $(date +%s) - START )) s" | tee -a "$OUT/fast.txt"
  return "$rc"
}

rc=0
case "$MODE" in
  all)   bench; fast || rc=$? ;;
  bench) bench ;;
  fast)  fast || rc=$? ;;
  smoke) BENCH_ARGS="--device cpu --net ddpmpp_tiny --batch 2 --k 2 --threads 1 --no-memory" \
         BENCH_ROUNDS="--steps 1 --warmup 1 --rounds 1" bench
         # --shrink draws 60 samples: hold out a fraction of them, not 2,000
         fast --shrink --allow-cpu --eval-override evaluation.downstream.val_size=0.2 || rc=$? ;;
  *) echo "usage: $0 all|bench|fast|smoke"; exit 2 ;;
esac
echo "files in $OUT:"; ls -la "$OUT"
exit "$rc"
