"""Collect dpdm-train run dirs (a Hydra sweep dir, or single runs) into one table: dpdm-report.

Everything is read from files every run writes, so the table needs no wandb:
`.hydra/overrides.yaml` (the job's command-line overrides), `privacy.json` (ε target and spent, δ, σ,
K, steps), `summary.json` (final loss, wall time; its absence means the job did not finish),
`csv/metrics.csv` (the last nonprivate/train_loss if summary.json has none; only logged on request), and
evaluation results if any:
`eval/*_final.json` (callbacks=eval) and `eval.json` files below the run dir (dpdm-evaluate).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from dpdm.utils.jsonio import read_json

# One row per run; the CSV has these columns in this order. Accuracies are percentages.
COLUMNS = ["job", "status", "dataset", "overrides", "epsilon_target", "epsilon_spent", "delta", "noise_multiplicity",
           "steps", "planned_steps", "batch_size", "noise_multiplier", "nonprivate_final_loss", "wall_time_s",
           "acc_logreg_pct", "acc_mlp_pct", "acc_cnn_pct", "fid", "fid_note", "fd_classifier",
           "real_cnn_acc_on_synthetic_pct", "eval_files", "run_dir", "all_overrides"]
NUMERIC = {"epsilon_target", "epsilon_spent", "delta", "noise_multiplicity", "steps", "planned_steps",
           "batch_size", "noise_multiplier", "nonprivate_final_loss", "wall_time_s", "acc_logreg_pct", "acc_mlp_pct",
           "acc_cnn_pct", "fid", "fd_classifier", "real_cnn_acc_on_synthetic_pct"}
NO_INCEPTION = "not computed (no Inception weights)"


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or (path / "privacy.json").is_file()


def find_runs(root: str | Path) -> list[Path]:
    """Run dirs at or below `root` (a sweep dir holds one per job), in job order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass a sweep dir (multirun/<date>/<time>) "
                                "or run dirs")
    if is_run_dir(root):
        return [root]
    found = [p.parent.parent for p in root.rglob(".hydra/overrides.yaml")]
    found += [p.parent for p in root.rglob("privacy.json") if not (p.parent / ".hydra").is_dir()]
    return sorted(set(found), key=lambda p: _natural_key(p, root))  # jobs in numeric order: 2 before 10


def _natural_key(path: Path, root: Path):
    rel = path.relative_to(root).parts
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel]


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _dataset(run: Path) -> str | None:
    """The run's dataset, from the resolved config dpdm-train writes into the run dir."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.load(path), "data.name")


def _last_train_loss(run: Path) -> float | None:
    """The last non-private training loss in the run's CSV log (only there with the opt-in switch)."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    last = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("nonprivate/train_loss"):
                last = float(row["nonprivate/train_loss"])
    return last


def eval_files(run: Path) -> list[Path]:
    """Evaluation results of a run: callbacks=eval's final files, then dpdm-evaluate's eval.json files."""
    files = sorted((run / "eval").glob("*_final.json")) if (run / "eval").is_dir() else []
    files += sorted(p for p in run.rglob("eval.json") if "wandb" not in p.parts)
    return files


def fid_note(unavailable: dict) -> str | None:
    why = unavailable.get("fid")
    if why is None:
        return None
    return NO_INCEPTION if "were not found" in why else f"not computed ({why[:120]})"


def eval_metrics(files: list[Path]) -> tuple[dict[str, float], str | None]:
    """The union of the files' metrics (the first file that has a metric wins) and why FID is missing."""
    metrics: dict[str, float] = {}
    note = None
    for path in files:
        result = read_json(path) or {}
        for k, v in (result.get("metrics") or {}).items():
            metrics.setdefault(k, v)
        note = note or fid_note(result.get("unavailable") or {})
    if "eval/fid" in metrics:
        note = None
    return metrics, note


def collect_run(run: Path, root: Path | None = None) -> dict[str, Any]:
    run = Path(run)
    privacy = read_json(run / "privacy.json") or {}
    summary = read_json(run / "summary.json")
    if summary is not None:
        status = "done"
    elif (run / "checkpoints" / "last.ckpt").is_file():
        status = "unfinished"  # killed or still running; resumable from its last checkpoint
    else:
        status = "failed"
    overrides = _overrides(run)
    files = eval_files(run)
    metrics, note = eval_metrics(files)

    def pct(key):
        v = metrics.get(key)
        return None if v is None else 100.0 * v

    # Not DP: present only in runs with privacy.log_nonprivate_metrics=true (or privacy=none).
    final_loss = ((summary or {}).get("nonprivate") or {}).get("train_loss_last")
    if final_loss is None:
        final_loss = _last_train_loss(run)
    base = root if root is not None and run != root else run.parent
    return {
        "job": str(run.relative_to(base)) if run != base else run.name,
        "status": status,
        "dataset": _dataset(run),
        "overrides": " ".join(overrides),
        "epsilon_target": privacy.get("target_epsilon"),
        "epsilon_spent": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "noise_multiplicity": privacy.get("noise_multiplicity"),
        "steps": privacy.get("steps"),
        "planned_steps": privacy.get("planned_steps"),
        "batch_size": privacy.get("expected_batch_size"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "nonprivate_final_loss": final_loss,
        "wall_time_s": (summary or {}).get("wall_time_s"),
        "acc_logreg_pct": pct("eval/acc_logreg"),
        "acc_mlp_pct": pct("eval/acc_mlp"),
        "acc_cnn_pct": pct("eval/acc_cnn"),
        "fid": metrics.get("eval/fid"),
        "fid_note": note,
        "fd_classifier": metrics.get("eval/fd_classifier", metrics.get("eval/fd_classifier_test")),
        "real_cnn_acc_on_synthetic_pct": pct("eval/real_cnn_acc_on_synthetic"),
        "eval_files": " ".join(str(p.relative_to(run)) for p in files),
        "run_dir": str(run),
        "all_overrides": " ".join(overrides),
    }


def collect(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per run found under the given sweep dirs / run dirs. `overrides` keeps only the overrides
    that differ between the rows (the swept ones); `all_overrides` has them all."""
    rows = []
    for root in map(Path, paths):
        rows += [collect_run(run, root) for run in find_runs(root)]
    if len(rows) > 1:
        common = set(common_overrides(rows))
        for r in rows:
            r["overrides"] = " ".join(o for o in r["all_overrides"].split() if o not in common)
    return rows


def common_overrides(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    common = set.intersection(*(set(r["all_overrides"].split()) for r in rows))
    return [o for o in rows[0]["all_overrides"].split() if o in common]


# ---- output ------------------------------------------------------------------------------------------

def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The table a person reads: swept overrides, privacy, training and (if evaluated) the metrics."""
    evaluated = any(r["eval_files"] for r in rows)
    head = ["job", "status", "overrides", "ε target", "ε spent", "K", "steps", "final loss (non-private)",
            "wall time (s)"]
    if evaluated:
        head += ["LogReg %", "MLP %", "CNN %", "FID", "fd_classifier"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], r["status"], f"`{r['overrides']}`" if r["overrides"] else "",
                 _fmt(r["epsilon_target"]), _fmt(r["epsilon_spent"]), _fmt(r["noise_multiplicity"]),
                 _fmt(r["steps"]), _fmt(r["nonprivate_final_loss"]), _fmt(r["wall_time_s"], 6)]
        if evaluated:
            fid = _fmt(r["fid"]) or (r["fid_note"] or "" if r["eval_files"] else "")
            cells += [_fmt(r["acc_logreg_pct"]), _fmt(r["acc_mlp_pct"]), _fmt(r["acc_cnn_pct"]), fid,
                      _fmt(r["fd_classifier"])]
        lines.append("| " + " | ".join(cells) + " |")
    common = common_overrides(rows)
    if common and len(rows) > 1:
        lines.append("")
        lines.append("Common to all jobs: `" + " ".join(common) + "`")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})


def load_report_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a dpdm-report CSV with numbers as floats (None where empty): what the notebook plots."""
    out = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: (float(v) if v not in ("", None) else None) if k in NUMERIC else v
                        for k, v in row.items()})
    return out
