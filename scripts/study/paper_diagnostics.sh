#!/usr/bin/env bash
# Split the difference between the CPU-sized protocol (12,000 samples: 10,000 + 2,000 held out, CNN up to 30
# epochs, patience 5) and the paper's (60,000 + 10,000, 50 epochs) for one run that
# scripts/study/paper_protocol.sh scored, appending a row per case to results/study/paper_protocol_diagnostics.jsonl:
#   A: the paper's 70,000 with the CPU protocol's stopping (30 epochs, patience 5): the effect of n alone
#   B: the CPU protocol on samples 12,000-23,999 of the 70,000 (none of the table's 12,000): another draw
# Each row holds its dpdm-evaluate command. Sampling is post-processing: no privacy is spent.
#
#   bash scripts/study/paper_diagnostics.sh <run dir>     e.g. runs/study/cpu_presets/mnist_eps1_cpu/dp
#
# 6.5 min for mnist_eps10_cpu on 2 cores (A stops when the held-out accuracy has not risen for 5 epochs).
set -euo pipefail
run=${1%/}
bin=${BIN:-.venv/bin}
rows=${ROWS_DIR:-results/study}/paper_protocol_diagnostics.jsonl
npz=$run/samples_paper/samples.npz
[ -f "$npz" ] || { echo "no $npz: score the run at the paper's n first (bash scripts/study/paper_protocol.sh <preset> $run)" >&2; exit 2; }

"$bin/python" -c '
import numpy as np, sys
d = np.load(sys.argv[1])
np.savez(sys.argv[2], x=d["x"][12000:24000], y=d["y"][12000:24000], dataset=d["dataset"])' "$npz" "$run/samples_paper/second12000.npz"
cnn="evaluation.metrics=[downstream] evaluation.downstream.classifiers=[cnn]"
for case in A B; do
  if [ $case = A ]; then
    input=$npz o="$cnn evaluation.downstream.max_epochs=30 evaluation.downstream.patience=5"
    what="the 70,000 (60,000 + 10,000 held out), CNN up to 30 epochs, patience 5 (the CPU protocol's stopping at the paper's n)"
  else
    input=$run/samples_paper/second12000.npz
    o="$cnn evaluation.downstream.val_size=2000 evaluation.downstream.max_epochs=30 evaluation.downstream.patience=5"
    what="samples 12,000-23,999 of the 70,000 (none of the table's 12,000), the CPU protocol (10,000 + 2,000, 30 epochs, patience 5)"
  fi
  # shellcheck disable=SC2086
  "$bin/dpdm-evaluate" "$input" $o out="$run/samples_paper/diag_$case"
  "$bin/python" - "$run" "$run/samples_paper/diag_$case/eval.json" "$rows" "$case" "$what" "dpdm-evaluate $input $o" <<'PY'
import json, sys, time
from pathlib import Path
from dpdm.experiments.study import append_row, machine_line, run_facts
run, path, rows, case, what, command = sys.argv[1:7]
m = json.load(open(path))["metrics"]
row = {"study": "paper_protocol_diagnostics", "run_dir": run, "train_wall_s": run_facts(Path(run))["train_wall_s"],
       "case": case, "what": what, "acc_cnn": m["eval/acc_cnn"], "best_epoch_cnn": m["eval/best_epoch_cnn"],
       "val_acc_cnn": m["eval/val_acc_cnn"], "command": command,
       "machine": machine_line(), "time": time.strftime("%Y-%m-%d")}
append_row(rows, row)
print(json.dumps(row))
PY
done
