"""dpdm-study: run a quality-per-compute study (conf/study/*.yaml) and print its table.

    dpdm-study run conf/study/quickstart_levers.yaml                  # every variant, DP + control
    dpdm-study run conf/study/quickstart_levers.yaml --variants patch2 --modes dp
    dpdm-study table results/study/quickstart_levers.jsonl            # markdown table of the rows
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dpdm.cli.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    from dpdm.experiments.study import Study, markdown_table, read_rows, run_study

    ap = argparse.ArgumentParser(prog="dpdm-study", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train, sample and score a study's runs")
    run.add_argument("study", type=Path, help="a study file, e.g. conf/study/quickstart_levers.yaml")
    run.add_argument("--variants", default=None, help="comma-separated subset of the study's variants")
    run.add_argument("--modes", default=None, help="dp, nonprivate or dp,nonprivate (default: the study's)")
    run.add_argument("--runs-dir", type=Path, default=Path("runs/study"), help="where the run dirs go")
    run.add_argument("--results", type=Path, default=Path("results/study"), help="where the rows go")
    run.add_argument("--downstream", action="store_true",
                     help="also the paper's LogReg/MLP/CNN protocol on the samples (slow on a CPU)")
    table = sub.add_parser("table", help="markdown table of a rows file")
    table.add_argument("rows", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "table":
        if not args.rows.is_file():
            raise FileNotFoundError(f"{args.rows} not found; dpdm-study run writes results/study/<study>.jsonl")
        print(markdown_table(read_rows(args.rows)))
        return
    study = Study.load(args.study)
    rows = run_study(study, runs_dir=args.runs_dir, results_dir=args.results,
                     variants=args.variants.split(",") if args.variants else None,
                     modes=args.modes.split(",") if args.modes else None, downstream=args.downstream)
    print(markdown_table(read_rows(rows)))


if __name__ == "__main__":
    main()
