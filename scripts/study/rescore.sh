#!/usr/bin/env bash
# Rescore one samples.npz the way docs/recipes.md compares recipes, appending rows:
#   - the downstream CNN under protocol seeds 1..3 → <prefix>_protocol_seeds.jsonl, and seed 0 copied there
#     from the study's own row of the run (dpdm.experiments.protocol_seeds), when it scored by the same protocol
#   - improved precision / recall against the real test set → <prefix>_precision_recall.jsonl
#
#   bash scripts/study/rescore.sh "<recipe label>" <run>/samples_preset/samples.npz
#   (SEEDS="1 2 3" by default; PREFIX=fmnist by default, e.g. PREFIX=mnist_eps1 for an MNIST ε = 1 run;
#    PR=0 skips precision / recall, for samples whose row is already there: SEEDS="" scored it earlier)
#
# Each score is a plain dpdm-evaluate call (its command is in the row); about 1.5 min each on 2 cores.
set -euo pipefail
label=$1 npz=$2
bin=${BIN:-.venv/bin}
rows=${ROWS_DIR:-results/study}
prefix=${PREFIX:-fmnist}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

append() {  # $1 eval.json, $2 rows file, $3 study name, $4 the dpdm-evaluate overrides, $5 protocol seed or ""
  "$bin/python" - "$@" "$label" "$npz" <<'EOF'
import json, os, sys, time
from pathlib import Path
from dpdm.experiments.study import append_row, machine_line, run_facts
path, rows, study, overrides, seed, label, npz = sys.argv[1:8]
m = json.load(open(path))["metrics"]
row = {"study": study, "recipe": label, "samples": npz}
# The training run the samples came from, named as the study's rows name it (dir and wall time, from
# run_facts), so that dpdm-study / dpdm-reproduce can point this row at the run's new name when they move it.
run = os.path.dirname(os.path.dirname(os.path.normpath(npz)))
if os.path.exists(os.path.join(run, "summary.json")):
    row.update(run_dir=run, train_wall_s=run_facts(Path(run))["train_wall_s"])
if study.endswith("_protocol_seeds"):
    row.update(protocol_seed=int(seed), classifier="cnn", val_size=2000, max_epochs=30, patience=5,
               acc_cnn=m["eval/acc_cnn"], best_epoch=int(m["eval/best_epoch_cnn"]))
else:
    row.update({k.removeprefix("eval/"): v for k, v in m.items() if "precision" in k or "recall" in k})
row.update(command=f"dpdm-evaluate <samples> {overrides}", machine=machine_line(),
           time=time.strftime("%Y-%m-%d"))
append_row(rows, row)
print(json.dumps(row))
EOF
}

val_size=2000 max_epochs=30 patience=5   # the downstream protocol of every seed below
seeds=${SEEDS-1 2 3}
for seed in $seeds; do  # SEEDS="" scores precision and recall only
  o="evaluation.metrics=[downstream] evaluation.downstream.classifiers=[cnn]"
  o="$o evaluation.downstream.val_size=$val_size evaluation.downstream.max_epochs=$max_epochs"
  o="$o evaluation.downstream.patience=$patience evaluation.downstream.seed=$seed"
  # shellcheck disable=SC2086
  "$bin/dpdm-evaluate" "$npz" $o out="$tmp/seed$seed" > "$tmp/seed$seed.log" 2>&1 || { tail "$tmp/seed$seed.log"; exit 1; }
  append "$tmp/seed$seed/eval.json" "$rows/${prefix}_protocol_seeds.jsonl" "${prefix}_protocol_seeds" "$o" "$seed"
done
if [ -n "$seeds" ]; then
  "$bin/python" -m dpdm.experiments.protocol_seeds "$label" "$npz" "$rows" "$rows/${prefix}_protocol_seeds.jsonl" \
    "{\"val_size\": $val_size, \"max_epochs\": $max_epochs, \"patience\": $patience}" "$seeds"
fi
[ "${PR:-1}" = 0 ] && exit 0
o="evaluation.metrics=[precision_recall] evaluation.reference_splits=[test]"
# shellcheck disable=SC2086
"$bin/dpdm-evaluate" "$npz" $o out="$tmp/pr" > "$tmp/pr.log" 2>&1 || { tail "$tmp/pr.log"; exit 1; }
append "$tmp/pr/eval.json" "$rows/${prefix}_precision_recall.jsonl" "${prefix}_precision_recall" "$o" ""
