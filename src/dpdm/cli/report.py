"""dpdm-report: one table of a sweep's jobs (or of any run dirs), as markdown and CSV.

    dpdm-report multirun/2026-01-01/12-00-00            # writes report.md + report.csv into the sweep dir
    dpdm-report runs/a runs/b --out reports/ab           # several run dirs or sweeps into one table

One row per job: the swept overrides, ε target and spent, K, steps, final loss, wall time, and the
evaluation metrics where the run was evaluated (callbacks=eval, or dpdm-evaluate below the run dir).
Nothing needs wandb: it reads the files every run writes (docs/experiments.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpdm.cli.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from dpdm.experiments.sweeps import collect, to_markdown, write_csv

    parser = argparse.ArgumentParser(prog="dpdm-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="sweep dirs (multirun/<date>/<time>) or run dirs")
    parser.add_argument("--out", help="directory for report.md and report.csv (default: the first path)")
    args = parser.parse_args(argv)
    rows = collect(args.paths)  # a missing path: FileNotFoundError → one message, exit 2
    if not rows:
        print(f"error: no dpdm-train run dirs under {', '.join(args.paths)} (a run dir holds "
              ".hydra/overrides.yaml or privacy.json)", file=sys.stderr)
        return 2
    out = Path(args.out or args.paths[0])
    out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(rows)
    (out / "report.md").write_text(table + "\n")
    write_csv(rows, out / "report.csv")
    print(table)
    print(f"\nwrote {out / 'report.md'} and {out / 'report.csv'} ({len(rows)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
