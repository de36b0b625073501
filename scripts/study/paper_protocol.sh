#!/usr/bin/env bash
# Score one trained run by the paper's downstream protocol at the paper's n, appending a row to
# results/study/paper_protocol.jsonl:
#   - 70,000 class-balanced samples drawn with the sampler of the run's scored set (<run>/samples_preset,
#     its sampler.json), so the study's 12,000 are the first 12,000 of these (sample i uses seed i);
#   - LogReg / MLP / CNN trained on 60,000, the epoch chosen on the other 10,000 (synthetic), up to 50
#     epochs without early stopping, tested on the real test set (dpdm-evaluate's defaults: the paper's);
#   - agreement and fd_classifier on the same 70,000.
# The cpu_presets rows score 12,000 (10,000 + 2,000, 30 epochs, patience 5) to fit a CPU search; this says
# what that smaller n costs. Sampling is post-processing: no privacy is spent.
#
#   bash scripts/study/paper_protocol.sh <preset> <run dir>     e.g. mnist_eps1_cpu runs/study/cpu_presets/mnist_eps1_cpu/dp
#
# About half an hour per run on 2 cores: sampling took 10.8-14.8 min (fmnist_eps10_cpu's two blocks per resolution
# the slowest), scoring 11.9-12.8 min alone on the cores.
set -euo pipefail
preset=$1 run=${2%/}
bin=${BIN:-.venv/bin}
rows=${ROWS_DIR:-results/study}/paper_protocol.jsonl
out=$run/samples_paper
[ -f "$run/checkpoints/last.ckpt" ] || { echo "no $run/checkpoints/last.ckpt: train the run first (dpdm-study run conf/study/cpu_presets.yaml --modes dp --downstream --variants $preset)" >&2; exit 2; }
[ -f "$run/samples_preset/sampler.json" ] || { echo "no $run/samples_preset/sampler.json: score the run with its study first, which records the sampler to draw with" >&2; exit 2; }

# The exact sampler of the study's set, as dpdm-study passes it (whatever the checkpoint stores).
mapfile -t sampler < <("$bin/python" -c '
import json, sys
from dpdm.experiments.study import sampler_overrides
print("\n".join(sampler_overrides(json.load(open(sys.argv[1]))["sampler"])))' "$run/samples_preset/sampler.json")

if [ -f "$out/samples.npz" ]; then  # reused only if drawn with the sampler the 12,000 were drawn with
  "$bin/python" -c '
import json, sys
from dpdm.experiments.study import same_sampler
a, b = (json.load(open(p))["sampler"] for p in sys.argv[1:3])
sys.exit(0 if same_sampler(a, b) else f"{sys.argv[3]} was drawn with another sampler than {sys.argv[1]} ({a} "
         f"against {b}); move it aside to draw the 70,000 again")' "$run/samples_preset/sampler.json" "$out/sampler.json" "$out"
else
  "$bin/dpdm-sample" "ckpt='$run/checkpoints/last.ckpt'" n=70000 out="$out" batch_size=500 "${sampler[@]}"
fi
o="evaluation.metrics=[downstream,fd_classifier,real_cnn_on_synthetic] evaluation.reference_splits=[test]"
# shellcheck disable=SC2086
"$bin/dpdm-evaluate" "$out/samples.npz" $o out="$out/eval"

"$bin/python" - "$preset" "$run" "$out" "$rows" "dpdm-evaluate <samples> $o" <<'EOF'
import json, sys, time
from pathlib import Path
from dpdm.experiments.study import append_row, machine_line, run_facts
preset, run, out, rows, command = sys.argv[1:6]
m = json.load(open(f"{out}/eval/eval.json"))["metrics"]
facts = run_facts(Path(run))
drawn = json.load(open(f"{out}/sampler.json"))
row = {"study": "paper_protocol", "preset": preset, "run_dir": run, "train_wall_s": facts["train_wall_s"],
       "epsilon": facts.get("epsilon"), "samples": f"{out}/samples.npz",
       # draw_s: dpdm-sample's own count over every call that drew the set (an interrupted draw resumes)
       "sampler": drawn["sampler"], "sample_wall_s": drawn["draw_s"],
       "num_train": 60000, "val_size": 10000, "max_epochs": 50, "patience": None}
for name in ("logreg", "mlp", "cnn"):
    row[f"acc_{name}"] = m.get(f"eval/acc_{name}")
    row[f"best_epoch_{name}"] = m.get(f"eval/best_epoch_{name}")
row.update(agreement=m.get("eval/real_cnn_acc_on_synthetic"), fd_classifier_test=m.get("eval/fd_classifier_test"),
           command=command, machine=machine_line(), time=time.strftime("%Y-%m-%d"))
append_row(rows, row)
print(json.dumps(row))
EOF
