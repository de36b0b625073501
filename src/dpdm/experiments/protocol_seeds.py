"""A run's downstream CNN score under protocol seed 0, taken from the study row that scored it.

docs/recipes.md compares full runs by the downstream CNN's mean over four protocol seeds (the seed of the
classifier trained on the samples, not of the diffusion model). scripts/study/rescore.sh scores seeds 1..3;
seed 0 is the score the study itself computed when it sampled the run (`dpdm-study run --downstream` or
`dpdm-reproduce cpu`), so rather than train that classifier again, its row is copied from the study's rows,
marked with a `source`. It is copied only when the study scored with the same protocol as the rescoring
(held-out size, epochs, patience, optimiser): otherwise the four seeds would not be one measurement.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dpdm.evaluation.protocol import DownstreamSettings, EvalSettings
from dpdm.experiments.study import Study, append_row, of_run, read_rows, run_facts

RESCORED_SUFFIXES = ("_protocol_seeds", "_precision_recall")


def study_protocol(row: dict, study_dir: Path) -> dict | None:
    """The downstream settings a study row was scored with: recorded in the row since 2026-12-05, before
    that the study file's `evaluation:` as it is now (None when that file is gone)."""
    if row.get("downstream_protocol"):
        return row["downstream_protocol"]
    path = study_dir / f"{row['study']}.yaml"
    if not path.is_file():
        return None
    return EvalSettings.from_dict(Study.load(path).evaluation).downstream.protocol()


def study_row_of(npz: Path, rows_dir: Path) -> tuple[dict, Path] | None:
    """The newest study row that scored these samples with the downstream CNN: the same run (dir and
    training wall time, so not an earlier training in the same dir), the sampler whose dir holds them and
    as many samples (a study whose `sample: n` changed draws that dir again)."""
    import numpy as np

    run = npz.parent.parent
    sampler = npz.parent.name.removeprefix("samples_")
    wall = run_facts(run)["train_wall_s"]
    with np.load(npz, allow_pickle=False) as f:
        n = len(f["y"])
    found = None
    for path in sorted(rows_dir.glob("*.jsonl")):
        if path.stem.endswith(RESCORED_SUFFIXES):
            continue
        for r in read_rows(path):
            if (of_run(r, run, wall) and r.get("sampler") == sampler and r.get("sample_n") == n
                    and r.get("acc_cnn") is not None):
                found = (r, path)   # rows are appended, so the last one is the newest
    return found


def seed_row_from_study(npz: Path, label: str, rows_dir: Path, seeds_path: Path, protocol: dict,
                        rescored_seeds: list[int], study_dir: Path = Path("conf/study")) -> tuple[dict | None, str]:
    """The row for `seeds_path` that the study's own score gives these samples, or None and why not.
    `protocol` is the rescoring's downstream settings (as dpdm-evaluate overrides them)."""
    wanted = replace(DownstreamSettings(), **protocol).protocol()
    found = study_row_of(npz, rows_dir)
    if found is None:
        return None, (f"no study row in {rows_dir} scored these {npz} with the downstream CNN (dpdm-study "
                      "run --downstream writes one)")
    row, path = found
    theirs = study_protocol(row, study_dir)
    if theirs is None:
        return None, f"conf/study/{row['study']}.yaml is gone, so the protocol of {path}'s row is unknown"
    differs = sorted(k for k in wanted if k != "seed" and theirs.get(k) != wanted[k])
    if differs:
        was = ", ".join(f"{k} {theirs.get(k)}" for k in differs)
        now = ", ".join(f"{k} {wanted[k]}" for k in differs)
        return None, f"{path}'s row was scored with another protocol ({was} against {now}): not one of these seeds"
    seed = theirs.get("seed", 0)
    if seed in rescored_seeds:
        return None, f"protocol seed {seed} is rescored here, so {path}'s row is not copied"
    return {"study": seeds_path.stem, "recipe": label, "samples": str(npz),
            "run_dir": row["run_dir"], "train_wall_s": row["train_wall_s"], "protocol_seed": seed,
            "classifier": "cnn", "val_size": wanted["val_size"], "max_epochs": wanted["max_epochs"],
            "patience": wanted["patience"], "acc_cnn": row["acc_cnn"], "best_epoch": None,
            "source": f"the study's row in {path}", "machine": row.get("machine"), "time": row.get("time")}, ""


def already_there(rows_path: Path, new: dict) -> bool:
    """Whether the seeds file has this seed of these samples (rows written by hand before 2026-12-04 do not
    name the run's wall time; those name the samples alone)."""
    if not rows_path.exists():
        return False
    return any(r.get("protocol_seed") == new["protocol_seed"] and r.get("samples") == new["samples"]
               and r.get("train_wall_s", new["train_wall_s"]) == new["train_wall_s"] for r in read_rows(rows_path))


def main(argv: list[str]) -> int:
    """rescore.sh's seed-0 step: <label> <samples.npz> <rows dir> <protocol seeds file> <protocol json> <seeds>."""
    label, npz, rows_dir, seeds_path, protocol, seeds = argv
    new, why = seed_row_from_study(Path(npz), label, Path(rows_dir), Path(seeds_path), json.loads(protocol),
                                   [int(s) for s in seeds.split()])
    if new is None:
        print(f"protocol seed 0 not copied: {why}")
        return 0
    if already_there(Path(seeds_path), new):
        print(f"protocol seed {new['protocol_seed']}: already in {seeds_path}")
        return 0
    append_row(seeds_path, new)
    print(json.dumps(new))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
