"""DP-SGD training throughput (noised images per second) of a preset's network, appended to
benchmarks/results/training_throughput.json; dpdm-reproduce quotes the newest figure of this kind of
device when it refuses to start a paper run without a GPU.

    python benchmarks/training_throughput.py                          # mnist_eps10's network, K = 32
    python benchmarks/training_throughput.py --examples 128 --steps 5 # on a GPU: the paper's chunk size

The steps are dpdm-train's own (dpdm.experiments.throughput): per-example gradients of the K-averaged
loss, clipping, noise, accountant, EMA. Only the batch is small, so that a CPU measures in minutes; the
first step is warm-up. The load average is recorded with the figure: on a shared machine it is lower
than what the cores could do alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

from dpdm.experiments.throughput import measure_training_throughput

OUT = Path(__file__).resolve().parent / "results" / "training_throughput.json"


def main() -> int:
    from dpdm.utils.allocator import retain_freed_memory

    retain_freed_memory()  # as dpdm-train does
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="mnist_eps10")
    p.add_argument("--examples", type=int, default=4, help="expected examples per DP-SGD step")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    load_before = os.getloadavg()
    t = measure_training_throughput(args.experiment, examples=args.examples, steps=args.steps,
                                    warmup=args.warmup, device=args.device)
    record = {**t.to_dict(), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.exists() else []
    records.append(record)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"appended to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
