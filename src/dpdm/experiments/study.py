"""Quality-per-compute studies: train variants of a recipe, sample them, score them, one JSON row each.

A study file (conf/study/*.yaml) names the base overrides shared by every run, the variants (extra
overrides), the samplers each trained model is scored with, and how many samples are scored:

    train: [experiment=quickstart]
    controls: true                 # each variant also runs with privacy=none: the cost of privacy
    sample: {n: 1000, batch_size: 500}
    samplers: {heun18: [sampler.num_steps=18], heun18_w2: [sampler.num_steps=18, sampler.guidance=2]}
    variants: {baseline: [], patch2: [net=ddpmpp_tiny_p2]}

A sampler given as the word `config` instead of a list means the variant's own `sampler:` as the config
files compose it *now*, passed explicitly to dpdm-sample: a preset whose sampler was changed after its
model was trained is scored with the new one (sampling is post-processing; the model needs no retraining).
Every sample set records the sampler that drew it (sampler.json), and one drawn with another sampler
than the one asked for is moved aside and drawn again.

Every run is the real `dpdm-train` / `dpdm-sample` in a subprocess (what a user runs, nothing
re-implemented), so a recipe found here carries over to a preset unchanged. Scores are the offline
diagnostics of docs/evaluation.md, cheap enough for a CPU search: the agreement of the real-data CNN
with the requested labels, and the Fréchet distance in that CNN's features to the real *test* split;
`--downstream` adds the paper's LogReg / MLP / CNN protocol for confirmation runs. Rows are appended to
results/study/<study>.jsonl; a finished training or sampling step is reused, so a killed study resumes.
A finished run is reused only while its recipe (RECIPE_KEYS) is what the study's overrides compose now:
after a preset changes, its old run is moved aside (kept) and trained again. A variant whose run would compose
the same recipe as another variant's finished one (the non-private controls of presets that differ only in ε)
reuses that run.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dpdm.nets import DDPMppUNet
from dpdm.utils.files import atomic_path
from dpdm.utils.jsonio import read_json
from dpdm.utils.machine import machine_line

DP, NONPRIVATE = "dp", "nonprivate"
# A samplers: entry naming the variant's configured sampler rather than a list of overrides.
CONFIG_SAMPLER = "config"
# Proxy runs set privacy.epsilon to at least this (with privacy.noise_multiplier by hand), so the budget
# guard never stops them; their rows say "proxy" instead of an ε.
PROXY_EPSILON = 1e5


@dataclass
class Study:
    name: str
    train: list[str]
    variants: dict[str, list[str]]
    samplers: dict[str, list[str] | str]   # overrides for dpdm-sample, or CONFIG_SAMPLER
    sample_n: int = 1000
    sample_batch_size: int = 500
    controls: bool = True
    description: str = ""
    evaluation: dict = field(default_factory=dict)
    # variant -> studies whose rows hold more full-size runs of its recipe (other training seeds); a
    # page of the study (results/cpu.md) shows the spread of every run it finds there beside its own
    more_runs: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Study:
        from omegaconf import OmegaConf

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study file {path} not found; the studies are in conf/study/")
        d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        unknown = set(d) - {"description", "train", "variants", "samplers", "sample", "controls", "evaluation",
                            "more_runs"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        if not d.get("variants"):
            raise ValueError(f"{path}: a study needs at least one entry under variants")
        more_runs = {k: [v] if isinstance(v, str) else list(v) for k, v in (d.get("more_runs") or {}).items()}
        if set(more_runs) - set(d["variants"]):
            raise ValueError(f"{path}: more_runs names {sorted(set(more_runs) - set(d['variants']))}, which are not "
                             f"variants of this study ({sorted(d['variants'])})")
        sample = d.get("sample") or {}
        samplers = {}
        for k, v in (d.get("samplers") or {"default": []}).items():
            if isinstance(v, str) and v != CONFIG_SAMPLER:
                raise ValueError(f"{path}: sampler {k!r} is {v!r}; give a list of overrides or {CONFIG_SAMPLER!r} "
                                 "(the variant's own configured sampler)")
            samplers[k] = v if isinstance(v, str) else list(v or [])
        return cls(name=path.stem, train=list(d.get("train") or []),
                   variants={k: list(v or []) for k, v in d["variants"].items()},
                   samplers=samplers,
                   sample_n=int(sample.get("n", 1000)), sample_batch_size=int(sample.get("batch_size", 500)),
                   controls=bool(d.get("controls", True)), description=str(d.get("description", "")),
                   evaluation=dict(d.get("evaluation") or {}), more_runs=more_runs)


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _run(cmd: list[str], log_path: Path) -> float:
    """Run cmd with its output appended to log_path; seconds of wall time. Raises on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"command failed (exit {rc}); see {log_path}:\n  {shlex.join(cmd)}")
    return time.perf_counter() - t0


# What a trained model and its privacy guarantee depend on. A run whose stored config.yaml differs from
# what the study's overrides compose now in any of these was trained for another recipe (a preset was
# changed since), so it is not reused. Samplers, callbacks and loggers are left out: they change no weights.
RECIPE_KEYS = ("seed", "data.name", "data.batch_size", "data.subset_size", "data.path", "data.resolution",
               "net", "preconditioning", "noise_levels", "loss", "optim", "ema", "lr_schedule", "trainer.max_steps",
               "trainer.max_epochs", "trainer.precision", "privacy.enabled", "privacy.epsilon", "privacy.delta",
               "privacy.max_grad_norm", "privacy.accountant", "privacy.noise_multiplier")
# Set by dpdm-train from the data (which the keys above compare), so never a change of recipe.
_FITTED_TO_DATA = {"net.img_resolution", "net.in_channels", "net.out_channels", "net.num_classes"}
# Config groups renamed since older runs were trained: their config.yaml has the old name.
_RENAMED_GROUPS = {"preconditioning": "denoiser", "noise_levels": "noise"}
# Keys added since older runs were trained (dotted: a group, or a leaf of a group they already had), with
# the value those runs had in effect.
_ADDED_KEYS = {"lr_schedule": {"kind": "constant", "final_fraction": 1.0}, "ema.warmup_offset": 10}


def run_overrides(study: Study, variant: str, mode: str) -> list[str]:
    return study.train + study.variants[variant] + (["privacy=none"] if mode == NONPRIVATE else [])


def recipe_changes(run_dir: Path, overrides: list[str]) -> list[str]:
    """'key: stored → now' for every RECIPE_KEYS leaf where the trained run's config.yaml differs from
    what `overrides` compose now; empty when the run is still the recipe asked for."""
    stored = _with_added_keys(_load_yaml(run_dir / "config.yaml"))
    now = composed_config(tuple(overrides))
    changes = []
    for key in RECIPE_KEYS:
        head, _, rest = key.partition(".")
        then = stored.get(head, stored.get(_RENAMED_GROUPS.get(head, head)))
        a, b = _leaves(_dig(then, rest)), _leaves(_dig(now.get(head), rest))
        for leaf in sorted(set(a) | set(b)):
            # Hydra's _target_/_partial_ keys that one side lacks come from a config layout, not a recipe.
            layout_only = leaf.rpartition(".")[2].startswith("_") and (leaf not in a or leaf not in b)
            if a.get(leaf) != b.get(leaf) and f"{key}{leaf}" not in _FITTED_TO_DATA and not layout_only:
                changes.append(f"{key}{leaf}: {a.get(leaf)} → {b.get(leaf)}")
    return changes


def _with_added_keys(cfg: dict) -> dict:
    """`cfg` with every _ADDED_KEYS entry it lacks set to the value older runs had in effect."""
    for dotted, value in _ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        group = _dig(cfg, ".".join(parents))
        if isinstance(group, dict):
            group.setdefault(leaf, copy.deepcopy(value))  # one copy per config: the table is shared
    return cfg


def _dig(d, dotted: str):
    for part in filter(None, dotted.split(".")):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _leaves(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d} if d is not None else {}
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}"))
    return out


def train_run(study: Study, variant: str, mode: str, runs_dir: Path, progress=print,
              rows_path: Path | None = None, on_moved: Callable[[Path, Path], None] | None = None) -> Path:
    """Train one (variant, mode) run unless a finished one (summary.json) of the same recipe exists;
    returns the run dir. A finished run of another recipe is moved aside (kept), and the rows in
    `rows_path` that scored it follow it there; then a run of the recipe asked for is reused where one
    exists (`_same_recipe_run`), else trained. Rows that name the run dir for a run not here (committed
    rows in a fresh checkout) are pointed at a free old name first, so they never score the new run.
    `on_moved(run_dir, new_name)` is told of each move, for whatever else is keyed by run dir (the
    stored learning curves)."""
    run_dir = runs_dir / study.name / variant / mode
    overrides = run_overrides(study, variant, mode)
    if (run_dir / "summary.json").exists():
        changes = recipe_changes(run_dir, overrides)
        if not changes:
            progress(f"[{study.name}] {variant}/{mode}: trained already ({run_dir})")
            return run_dir
        wall = run_facts(run_dir)["train_wall_s"]
        old = move_aside(run_dir, rows_path)
        progress(f"[{study.name}] {variant}/{mode}: the recipe changed since {run_dir} was trained "
                 f"({'; '.join(changes)}); moved it to {old.name}")
        for path, n in repoint_run(rows_path, run_dir, wall, old).items():
            progress(f"    {n} row(s) of {path} now name {old}")
        if on_moved is not None:
            on_moved(run_dir, old)
    if twin := _same_recipe_run(study, variant, mode, runs_dir):
        progress(f"[{study.name}] {variant}/{mode}: the same recipe as {twin} (trained for "
                 f"{twin.parent.name}), which it reuses")
        return twin
    if absent := set_aside_absent_runs(run_dir, rows_path):
        progress(f"[{study.name}] {variant}/{mode}: rows in {rows_path.parent} name {run_dir} for "
                 f"{len(absent)} run(s) not here; they now name {', '.join(p.name for p in absent)}")
        if on_moved is not None:   # the stored curve is that of the run most recently scored there
            on_moved(run_dir, absent[-1])
    progress(f"[{study.name}] {variant}/{mode}: training ({' '.join(overrides) or 'defaults'})")
    if run_dir.exists():  # a killed earlier attempt: start the run over, it has no result to keep
        import shutil

        shutil.rmtree(run_dir)
    wall = _run([_bin("dpdm-train"), *overrides, f"hydra.run.dir={run_dir}",
                 "+trainer.enable_progress_bar=false"], run_dir.parent / f"{mode}.log")
    progress(f"[{study.name}] {variant}/{mode}: trained in {wall:.0f}s")
    return run_dir


def _same_recipe_run(study: Study, variant: str, mode: str, runs_dir: Path) -> Path | None:
    """A finished run of this mode, other than the variant's own current one, whose recipe is this
    variant's: another variant's, or one moved aside when a preset changed (`<mode>.old<i>`, its own or
    another's). Non-private controls are where this happens: `privacy=none` makes mnist_eps10_cpu and
    mnist_eps1_cpu the same training run, and when mnist_eps10_cpu moves on, the run mnist_eps1_cpu still
    composes is the one moved aside; training it again would cost an hour for nothing."""
    overrides = run_overrides(study, variant, mode)
    own = runs_dir / study.name / variant / mode
    for other in study.variants:
        current = runs_dir / study.name / other / mode
        for run in (current, *sorted(current.parent.glob(f"{mode}.old*"))):
            if run != own and (run / "summary.json").exists() and not recipe_changes(run, overrides):
                return run
    return None


def configured_sampler(study: Study, variant: str) -> dict:
    """The `sampler:` of a variant's training config as conf/ composes it now (resolved)."""
    return composed_config((*study.train, *study.variants[variant]))["sampler"]


def composed_config(overrides: tuple[str, ...]) -> dict:
    """The train config `overrides` compose now (plain, resolved; a copy the caller may change)."""
    return copy.deepcopy(_composed(overrides))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict:
    # Composing costs a second or two; a study asks per (variant, mode, sampler), per curve and per page row.
    from dpdm.utils.configs import compose, to_plain

    return to_plain(compose("train", [*overrides, "output_dir=unused"]))


def sampler_overrides(spec: dict) -> list[str]:
    """dpdm-sample overrides that draw with exactly `spec`, whatever sampler the checkpoint stores."""
    from dpdm.utils.configs import override_value

    return [f"sampler={spec['name']}", *(f"++sampler.{k}={override_value(v)}" for k, v in spec.items()
                                         if k != "name")]


def drawn_with(out: Path, ckpt: Path) -> dict | None:
    """The sampler a sample set in `out` was drawn with: its sampler.json, else (older sets, drawn without
    sampler overrides) the one stored in the checkpoint. None when unknown."""
    record = read_json(out / "sampler.json")
    if record is not None:
        return record.get("sampler")
    if not ckpt.exists():
        return None
    return copy.deepcopy(_checkpoint_sampler(str(ckpt), ckpt.stat().st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _checkpoint_sampler(path: str, mtime_ns: int) -> dict | None:
    # Loading a checkpoint takes seconds; every older set and curve point of a run asks about the same one.
    from dpdm.training.checkpoint import checkpoint_sampler, load_checkpoint

    return checkpoint_sampler(load_checkpoint(Path(path)))


def same_sampler(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def of_run(row: dict, run_dir: Path | str, train_wall_s: float | None) -> bool:
    """Whether `row` scored the run trained in `run_dir` that took `train_wall_s` to train. A row names its
    run by directory and training wall time: a run trained again in the same directory (its recipe changed,
    or a rerun) is not the one an older row scored."""
    return row.get("run_dir") == str(run_dir) and row.get("train_wall_s") == train_wall_s


def repoint_rows(rows_path: Path, run_dir: Path, train_wall_s: float | None, moved_to: Path) -> int:
    """Point the rows that scored the run trained in `run_dir` (named by directory and training wall time,
    as `of_run` does) at `moved_to`, where that run now lies, with the sample sets they name inside it;
    the number of rows changed. Without this a row that another variant reuses (a shared control) would
    name whatever is trained there next."""
    rows = read_rows(rows_path) if rows_path.exists() else []
    scored = [r for r in rows if of_run(r, run_dir, train_wall_s)]
    for row in scored:
        row["run_dir"] = str(moved_to)
        inside = Path(row["samples"]) if row.get("samples") else None
        if inside is not None and inside.is_relative_to(run_dir):
            row["samples"] = str(moved_to / inside.relative_to(run_dir))
    if scored:
        with atomic_path(rows_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(scored)


def repoint_run(rows_path: Path | None, run_dir: Path, train_wall_s: float | None, moved_to: Path) -> dict:
    """`repoint_rows` over the study's rows file and the rows files beside it: {file: rows changed}."""
    files = rows_files(rows_path) if rows_path is not None else []
    return {p: n for p in files if (n := repoint_rows(p, run_dir, train_wall_s, moved_to))}


def rows_files(rows_path: Path) -> list[Path]:
    """The study's rows file and the rows files beside it (scripts/study/rescore.sh's rescoring of a run's
    samples): every row that names a run by dir and wall time follows it when it moves."""
    return [rows_path, *sorted(p for p in rows_path.parent.glob("*.jsonl") if p != rows_path)]


def free_old_name(path: Path, rows_path: Path | None = None) -> Path:
    """The first <name>.old<i> beside `path` that is free. A name that a row in `rows_path` (or in a rows
    file beside it) gives a run is not free even where that run is absent (a fresh checkout has no
    runs/): reusing it would hand that row, and the curve stored for it, another run."""
    named = {Path(r["run_dir"]).parts[-2:] for f in (rows_files(rows_path) if rows_path else [])
             if f.exists() for r in read_rows(f) if r.get("run_dir")}
    i = 1
    while (path.with_name(f"{path.name}.old{i}").exists()
           or (path.parent.name, f"{path.name}.old{i}") in named):
        i += 1
    return path.with_name(f"{path.name}.old{i}")


def move_aside(path: Path, rows_path: Path | None = None) -> Path:
    """Rename `path` to the first free <name>.old<i> (`free_old_name`), keeping what it holds."""
    target = free_old_name(path, rows_path)
    path.rename(target)
    return target


def set_aside_absent_runs(run_dir: Path, rows_path: Path | None) -> list[Path]:
    """Before a run is trained into `run_dir`, which holds no finished run: point the rows of `rows_path`
    and of the rows files beside it that name it (for runs not here, told apart by training wall time as
    `of_run` does) at a free old name per run. The names given, the run most recently scored last."""
    if rows_path is None:
        return []
    walls = [r.get("train_wall_s") for p in rows_files(rows_path) if p.exists() for r in read_rows(p)
             if r.get("run_dir") == str(run_dir)]
    names = []
    for wall in reversed(list(dict.fromkeys(reversed(walls)))):   # by each run's last row
        target = free_old_name(run_dir, rows_path)
        repoint_run(rows_path, run_dir, wall, target)
        names.append(target)
    return names


def draw(ckpt: Path, out: Path, *, n: int, batch_size: int, spec: dict | None, extra: list[str],
         log_path: Path, progress=print) -> float | None:
    """dpdm-sample of `n` samples into `out` (wall seconds), or None when `out` holds them already.

    With `spec` (a sampler dict) the set must have been drawn with it: a set drawn otherwise is moved
    aside and drawn again. Without it, `extra` overrides are passed and an existing set is reused.
    """
    if (out / "samples.npz").exists():
        if spec is None or same_sampler(drawn_with(out, ckpt), spec):
            return None
        old = move_aside(out)
        progress(f"    {out}: drawn with another sampler than {spec.get('name')} "
                 f"w={spec.get('guidance')}; moved to {old.name}, drawing again")
    overrides = sampler_overrides(spec) if spec is not None else extra
    # Quoted: Lightning's checkpoint names contain '=', which Hydra's override grammar rejects bare.
    return _run([_bin("dpdm-sample"), f"ckpt='{ckpt}'", f"n={n}", f"out={out}", f"batch_size={batch_size}",
                 "overwrite=true", *overrides], log_path)


def sample_run(study: Study, run_dir: Path, sampler: str, spec: dict | None = None,
               progress=print) -> tuple[Path, float | None]:
    """Samples of one trained run with one sampler; (samples.npz, wall seconds or None if reused).
    `spec`: the sampler dict a CONFIG_SAMPLER entry resolves to for this run's variant."""
    out = run_dir / f"samples_{sampler}"
    overrides = study.samplers[sampler]
    wall = draw(run_dir / "checkpoints" / "last.ckpt", out, n=study.sample_n, batch_size=study.sample_batch_size,
                spec=spec, extra=[] if isinstance(overrides, str) else overrides,
                log_path=run_dir / f"sample_{sampler}.log", progress=progress)
    if wall is None:
        timing = read_json(out / "timing.json") or {}
        return out / "samples.npz", timing.get("wall_s")
    # A set drawn over several calls (dpdm-sample resumes an interrupted one) took what dpdm-sample
    # counted over all of them (draw_s); this call's wall time is only the last part.
    wall = (read_json(out / "sampler.json") or {}).get("draw_s") or wall
    (out / "timing.json").write_text(json.dumps({"wall_s": wall}) + "\n")
    progress(f"    sampled {study.sample_n} with {sampler} in {wall:.0f}s")
    return out / "samples.npz", wall


def score(samples_path: Path, evaluator, downstream: bool) -> dict:
    """Offline scores of a samples.npz: agreement with the requested labels, fd_classifier vs test."""
    from dpdm.evaluation.synthetic import samples_from_npz

    samples, _ = samples_from_npz(samples_path)
    metrics = ["fd_classifier", "real_cnn_on_synthetic"] + (["downstream"] if downstream else [])
    report = evaluator.evaluate(samples, metrics=metrics)
    m = report.metrics
    row = {"agreement": m.get("eval/real_cnn_acc_on_synthetic"),
           "fd_classifier_test": m.get("eval/fd_classifier_test")}
    for name in ("logreg", "mlp", "cnn"):
        if f"eval/acc_{name}" in m:
            row[f"acc_{name}"] = m[f"eval/acc_{name}"]
    return row


def run_facts(run_dir: Path) -> dict:
    """What the run was: the mechanism from privacy.json, its compute, its wall time."""
    privacy = read_json(run_dir / "privacy.json") or {}
    summary = read_json(run_dir / "summary.json") or {}
    recipe = config_recipe(_load_yaml(run_dir / "config.yaml"))
    steps = int(summary.get("optimizer_steps") or 0)
    facts = {
        "epsilon": privacy.get("epsilon"), "target_epsilon": privacy.get("target_epsilon"),
        "delta": privacy.get("delta"), "sigma": privacy.get("noise_multiplier"), **recipe, "steps": steps,
        "noised_images": steps * recipe["batch_size"] * recipe["K"], "train_wall_s": summary.get("wall_time_s"),
    }
    if "resumed" in summary:  # which part of train_wall_s each call measured (docs/usage.md: Resume)
        facts["train_resumed"] = summary["resumed"]
    return facts


# Net options a config may omit, with DDPMppUNet's defaults: what a run whose config (or a row recorded
# before the option existed) lacks them was built with.
_NET_PARAMETERS = inspect.signature(DDPMppUNet).parameters
_NET_DEFAULTS = {k: _NET_PARAMETERS[k].default for k in ("patch_size", "unpatch_channels", "full_res_blocks")}


def config_recipe(cfg: dict) -> dict:
    """The recipe a row records (batch, K, lr and its decay, net shape, noise levels, training precision),
    from a train config."""
    net = cfg["net"]
    return {
        "batch_size": int(cfg["data"]["batch_size"]), "K": int(cfg["loss"]["noise_multiplicity"]),
        "lr": cfg["optim"]["lr"],
        "net": {k: net[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions") if k in net}
        | {k: net.get(k, default) for k, default in _NET_DEFAULTS.items()},
        # Runs before the `noise` group became `noise_levels` store it under "noise"; so do the rows.
        "noise": {k: v for k, v in (cfg.get("noise_levels") or cfg["noise"]).items() if k != "_target_"},
        # Runs from before lr decay existed trained at a constant lr.
        "lr_schedule": dict(cfg.get("lr_schedule") or _ADDED_KEYS["lr_schedule"]),
        # bf16-mixed rounds the forward and the per-example gradients' contractions: other weights.
        "precision": str(cfg.get("trainer", {}).get("precision", "32-true")),
    }


def preset_recipe(study: Study, variant: str, mode: str = DP) -> dict:
    """The recipe a variant's run of `mode` composes now, as its rows record it (steps: the step budget,
    when one is set; a run that stops after max_epochs records the steps its data gave)."""
    cfg = composed_config(tuple(run_overrides(study, variant, mode)))
    max_steps = int(cfg["trainer"]["max_steps"])
    return config_recipe(cfg) | ({"steps": max_steps} if max_steps > 0 else {})


def recipe_differences(row: dict, recipe: dict) -> list[str]:
    """The recipe fields in which a row differs from `recipe` (only those both record; a dict field, only
    on the keys both have, so a row from before a field existed is not called different for it, except the
    net options that have defaults: a row without one ran with its default)."""
    out = []
    for key, want in recipe.items():
        have = row.get(key)
        if have is None:
            continue
        if key == "net":  # a row from before a net option existed ran with its default
            have = _NET_DEFAULTS | have
        if isinstance(want, dict) and isinstance(have, dict):
            out += [f"{key}.{k}" for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
        elif have != want:
            out.append(key)
    return out


def run_dataset(run_dir: Path) -> str:
    """The dataset a trained run used (its config.yaml's data.name)."""
    return _load_yaml(run_dir / "config.yaml")["data"].get("name", "mnist")


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_study(study: Study, *, runs_dir: Path, results_dir: Path, variants: list[str] | None = None,
              modes: list[str] | None = None, downstream: bool = False, data_dir: str | None = None,
              progress=print, on_moved: Callable[[Path, Path], None] | None = None) -> Path:
    """Train, sample and score every requested (variant, mode, sampler); append rows; the rows file.
    `on_moved` is passed to `train_run`."""
    from dpdm.evaluation.protocol import EvalSettings, Evaluator

    chosen = variants or list(study.variants)
    missing = [v for v in chosen if v not in study.variants]
    if missing:
        raise ValueError(f"variants {missing} not in study {study.name}; it has {', '.join(study.variants)}")
    modes = modes or ([DP, NONPRIVATE] if study.controls else [DP])
    results_dir.mkdir(parents=True, exist_ok=True)
    rows_path = results_dir / f"{study.name}.jsonl"
    # fd_classifier against the public test split only; `evaluation:` in the study file overrides any
    # EvalSettings (e.g. a smaller real-data CNN for tests, the downstream protocol's epochs).
    settings = EvalSettings.from_dict({"reference_splits": ["test"], **study.evaluation})
    evaluators: dict = {}   # one per dataset: a study may mix MNIST and Fashion-MNIST presets
    for variant in chosen:
        for mode in modes:
            run_dir = train_run(study, variant, mode, runs_dir, progress, rows_path=rows_path, on_moved=on_moved)
            facts = run_facts(run_dir)
            dataset = run_dataset(run_dir)
            if dataset not in evaluators:
                evaluators[dataset] = Evaluator(dataset=dataset, settings=settings,
                                                data_dir=data_dir or os.environ.get("DPDM_DATA_DIR", "data"))
            evaluator = evaluators[dataset]
            for sampler, overrides in study.samplers.items():
                spec = configured_sampler(study, variant) if overrides == CONFIG_SAMPLER else None
                out = run_dir / f"samples_{sampler}"
                current = spec is None or same_sampler(drawn_with(out, run_dir / "checkpoints" / "last.ckpt"), spec)
                if current and _scored(rows_path, variant, mode, sampler, run_dir, study.sample_n, downstream,
                                       facts["train_wall_s"]):
                    progress(f"    {variant}/{mode}/{sampler}: scored already ({rows_path})")
                    continue
                samples, sample_wall = sample_run(study, run_dir, sampler, spec, progress)
                scores = score(samples, evaluator, downstream)
                row = {"study": study.name, "variant": variant, "mode": mode, "sampler": sampler,
                       "sampler_overrides": sampler_overrides(spec) if spec is not None else overrides,
                       "sampler_spec": (read_json(out / "sampler.json") or {}).get("sampler"),
                       "overrides": study.variants[variant],
                       **facts, "sample_n": study.sample_n, "sample_wall_s": sample_wall, **scores,
                       **({"downstream_protocol": settings.downstream.protocol()} if downstream else {}),
                       "run_dir": str(run_dir), "commit": _git_commit(), "machine": machine_line(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                append_row(rows_path, row)
                progress(f"    {variant}/{mode}/{sampler}: agreement {_pct(row['agreement'])}, "
                         f"fd_classifier {_num(row['fd_classifier_test'])}"
                         + (f", CNN {_pct(row.get('acc_cnn'))}" if "acc_cnn" in row else ""))
    return rows_path


def _scored(rows_path: Path, variant: str, mode: str, sampler: str, run_dir: Path, n: int, downstream: bool,
            train_wall_s: float | None = None) -> bool:
    """Whether this run's samples were scored already (with the downstream protocol, if asked for; the run
    as `of_run` names it)."""
    if not rows_path.exists():
        return False
    return any(r["variant"] == variant and r["mode"] == mode and r["sampler"] == sampler
               and of_run(r, run_dir, train_wall_s) and r.get("sample_n") == n
               and (not downstream or "acc_cnn" in r) for r in read_rows(rows_path))


def is_proxy(row: dict) -> bool:
    """A TAN proxy run: σ set by hand under a budget no real run would use, so its ε means nothing."""
    return (row.get("target_epsilon") or 0) >= PROXY_EPSILON


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def read_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}, is not a JSON row ({e.msg}): a rows file holds one JSON "
                                 "object per line, as dpdm-study run writes to results/study/<study>.jsonl "
                                 "(a study's .yaml is its recipe, not its rows)") from None
    return rows


def append_row(path: Path | str, row: dict) -> None:
    """Add one row to a rows file (one JSON object per line, as read_rows reads it); rows are only appended,
    so the last row of a run is its newest."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def latest_rows(rows: list[dict]) -> list[dict]:
    """The newest row of each (variant, mode, sampler): a re-run replaces, not duplicates."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        keep[(r["variant"], r["mode"], r["sampler"])] = r
    return list(keep.values())


def markdown_table(rows: list[dict]) -> str:
    """One line per (variant, sampler): DP and non-private control side by side."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in latest_rows(rows):
        by_key.setdefault((r["variant"], r["sampler"]), {})[r["mode"]] = r
    head = ("| variant | sampler | B | K | steps | noised img | σ | ε | train min | agreement DP | "
            "agreement non-private | fd_classifier DP | fd_classifier non-private | CNN DP |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (variant, sampler), modes in by_key.items():
        dp, np_ = modes.get(DP, {}), modes.get(NONPRIVATE, {})
        ref = dp or np_
        wall = ref.get("train_wall_s")
        eps = "proxy" if is_proxy(dp) else _num(dp.get("epsilon"))
        lines.append(
            f"| {variant} | {sampler} | {ref.get('batch_size')} | {ref.get('K')} | {ref.get('steps')} | "
            f"{ref.get('noised_images', 0) / 1e3:.0f}k | {_num(dp.get('sigma'))} | {eps} | "
            f"{'n/a' if wall is None else f'{wall / 60:.1f}'} | {_pct(dp.get('agreement'))} | "
            f"{_pct(np_.get('agreement'))} | {_num(dp.get('fd_classifier_test'))} | "
            f"{_num(np_.get('fd_classifier_test'))} | {_pct(dp.get('acc_cnn')) if 'acc_cnn' in dp else '–'} |")
    return "\n".join(lines)
