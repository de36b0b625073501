"""dpdm-reproduce: the refusal without a GPU (through `make reproduce-mnist`), the whole code path
train → sample → evaluate → results page on a shrunk configuration, the compute-budget preset's
accounting, and notebooks/sweep_results.ipynb executed against the shrunk runs.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from dpdm.experiments.paper import HEADLINE
from dpdm.experiments.reproduce import (
    BENCHMARK_FILE,
    H200_REFERENCE_IMAGES_PER_S,
    RECIPES,
    format_duration,
    run_cost,
    stored_throughput,
)
from dpdm.experiments.sweeps import NO_INCEPTION
from tests.helpers import BIN, REPO, cli_env, compose_config


def _env(tmp: Path, **extra):
    # No GPU (even on a GPU machine: the test must not start a days-long run), no Inception weights
    # (TORCH_HOME is empty), wandb off.
    return {**cli_env(CUDA_VISIBLE_DEVICES="", TORCH_HOME=str(tmp / "torch_home")), **extra}


def test_make_reproduce_mnist_refuses_without_a_gpu_with_the_estimate(tmp_path):
    assert stored_throughput() is not None, f"{BENCHMARK_FILE} holds the CPU figure the estimate divides by"
    # -o: do not rebuild the venv even if pyproject.toml is newer than its stamp.
    proc = subprocess.run(["make", "-o", ".venv/.installed", "reproduce-mnist"], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    print(proc.stderr)
    assert proc.returncode != 0
    assert "dpdm-reproduce mnist: no GPU here" in proc.stderr and "refusing to start" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "results/cpu.md" in proc.stderr and "make reproduce-cpu" in proc.stderr  # what a CPU can do instead
    # The estimate: the recipe's noised images (steps × B × K of each run's privacy plan) ÷ the stored figure.
    costs = [run_cost(r) for r in RECIPES["mnist"].runs]
    total = sum(c["noised_images"] for c in costs)
    assert total == 3 * 4200 * 4096 * 32  # 300 epochs × ⌊60000/4096⌋ steps, B = 4096, K = 32
    assert f"{total:.4g} noised images in total" in proc.stderr
    t = stored_throughput(_cpu_device())
    assert f"estimated training time on this machine: {format_duration(total / t['images_per_s'])}" in proc.stderr
    assert "benchmark figure measured on" in proc.stderr  # says where the throughput comes from
    assert f"{format_duration(total / H200_REFERENCE_IMAGES_PER_S)} at 8000 noised images/s" in proc.stderr
    assert "[mnist_eps" not in proc.stdout  # no stage started


def _cpu_device():
    import torch

    from dpdm.experiments.throughput import device_description

    return device_description(torch.device("cpu"))


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """`dpdm-reproduce mnist --shrink` for ε = 10: every stage of the recipe on a tiny configuration."""
    tmp = tmp_path_factory.mktemp("reproduce")
    runs = tmp / "runs"
    args = [str(BIN / "dpdm-reproduce"), "mnist", "--shrink", "--epsilon", "10", "--runs-dir", str(runs)]
    proc = subprocess.run(args, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"runs": runs, "args": args, "tmp": tmp, "stdout": proc.stdout}


# The shrunk paper pipeline runs five CLI stages (~2 min on 2 cores): `make test-slow`. Each stage's command
# is tested on its own in the default suite (train, sample, evaluate).
@pytest.mark.slow
def test_shrunk_reproduction_runs_every_stage(shrunk):
    d = shrunk["runs"] / "mnist_eps10"
    state = json.loads((d / "reproduce.json").read_text())
    assert list(state["stages"]) == ["train", "sample_acc", "eval_acc", "sample_fid", "eval_fid"]
    assert all(rec["rc"] == 0 and rec["wall_s"] > 0 for rec in state["stages"].values())
    assert "sampler=paper_accuracy" in state["stages"]["sample_acc"]["command"]
    assert "sampler=paper_fid" in state["stages"]["sample_fid"]["command"]
    acc = json.loads((d / "samples_accuracy" / "eval.json").read_text())
    assert {"eval/acc_logreg", "eval/acc_mlp", "eval/acc_cnn"} <= set(acc["metrics"])
    fid = json.loads((d / "samples_fid" / "eval.json").read_text())
    assert "fid" in fid["unavailable"] and "eval/fid" not in fid["metrics"]
    assert not (shrunk["runs"] / "mnist_eps1").exists()  # --epsilon 10 only


@pytest.mark.slow
def test_results_page_puts_our_numbers_beside_the_papers(shrunk):
    page = (shrunk["runs"] / "mnist.md").read_text()
    print(page)
    assert "SHRUNK configuration" in page
    acc = json.loads((shrunk["runs"] / "mnist_eps10" / "samples_accuracy" / "eval.json").read_text())["metrics"]
    paper = HEADLINE[("mnist", 10.0)]
    row = next(line for line in page.splitlines() if line.startswith("| 10 (`mnist_eps10`)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "done"
    assert cells[3] == NO_INCEPTION and cells[4] == f"{paper['fid']:g}"
    for i, key in ((5, "logreg"), (7, "mlp"), (9, "cnn")):
        assert cells[i] == f"{100 * acc[f'eval/acc_{key}']:.2f}" and cells[i + 1] == f"{paper[key]:.1f}"
    privacy = json.loads((shrunk["runs"] / "mnist_eps10" / "privacy.json").read_text())
    assert cells[2] == f"{privacy['epsilon']:.4g}"
    assert re.search(r"\| 0\.2 \(`mnist_eps0\.2`\) \| not run \|", page)
    assert "## Hardware and wall time" in page and "no GPU; CPU" in page
    assert "Not measured on GPU" in page  # the compute-budget preset has not run
    # The exact commands, as recorded: the train command of this run is on the page.
    state = json.loads((shrunk["runs"] / "mnist_eps10" / "reproduce.json").read_text())
    for rec in state["stages"].values():
        assert rec["command"] in page


@pytest.mark.slow
def test_running_again_skips_finished_stages(shrunk):
    proc = subprocess.run(shrunk["args"], cwd=REPO, env=_env(shrunk["tmp"]), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier, skipped") == 5


@pytest.mark.slow
def test_notebook_executes_against_the_runs(shrunk, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "sweep_results.ipynb", as_version=4)
    os.environ["DPDM_SWEEP"] = str(shrunk["runs"])  # the kernel inherits it
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["DPDM_SWEEP"]
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "runs from" in text and "CNN accuracy: yes" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # ε plots, K plots
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and "| job | status |" in tables[0]


# ---- the compute-budget preset -----------------------------------------------------------------------

def test_fast_preset_accounting_is_exact_for_its_own_batch_and_epochs():
    from dpdm.privacy.accounting import mechanism_epsilon
    from dpdm.training.privacy_plan import make_privacy_plan

    cfg = compose_config("train", ["experiment=mnist_eps10_fast", "output_dir=unused"])
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.loss.noise_multiplicity) == (2048, 20, 2)
    assert cfg.privacy.epsilon == 10 and cfg.privacy.delta == 1e-5 and cfg.privacy.noise_multiplier is None
    assert (cfg.net.model_channels, list(cfg.net.channel_mult), cfg.net.num_blocks) == (32, [1, 2, 2], 2)
    plan = make_privacy_plan(enabled=True, epsilon=10, delta=1e-5, max_grad_norm=1.0, accountant="rdp",
                             noise_multiplier=None, batch_size=2048, dataset_size=60000, epochs=20,
                             noise_multiplicity=2)
    assert plan.planned_steps == 20 * (60000 // 2048) == 580
    eps = mechanism_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                        steps=plan.planned_steps, delta=1e-5, accountant="rdp")
    assert 9.9 < eps <= 10  # σ calibrated for exactly these steps: the whole budget, not more
    assert plan.max_steps == plan.planned_steps
    cost = run_cost(RECIPES["mnist-fast"].runs[0])
    assert cost["noised_images"] == 580 * 2048 * 2
    # Within the 6-minute budget at DESIGN.md's H200 figure, with room for start-up and sample grids.
    assert cost["noised_images"] / H200_REFERENCE_IMAGES_PER_S < 0.9 * 360
    assert cfg.max_physical_batch_size >= 2048  # one chunk per step: 4096+ rows per forward


def test_throughput_is_measured_on_real_dp_steps():
    from dpdm.experiments.throughput import measure_training_throughput

    tiny = ["net.model_channels=8", "net.channel_mult=[1]", "net.num_blocks=1", "net.attn_resolutions=[]",
            "trainer.accelerator=cpu", f"data.data_dir={REPO / 'data'}"]
    t = measure_training_throughput("smoke", examples=8, steps=2, warmup=1, device="cpu", overrides=tiny)
    assert t.steps == 2 and t.noise_multiplicity == 2 and t.experiment == "smoke"
    assert t.noised_images % 2 == 0 and t.noised_images > 0  # Poisson batches of ~8 examples × K = 2
    assert t.images_per_s == pytest.approx(t.noised_images / t.seconds)
    assert t.device.startswith("cpu (") and t.num_params > 0


def test_hardware_line_names_the_machine_facts_it_was_given(monkeypatch):
    # reproduce.json's `hardware` is utils.machine's facts under its own keys (cpu_cores, python): a
    # results page built from old reproduce.json files keeps reading them.
    import dpdm.utils.machine as machine
    from dpdm.experiments.reproduce import describe_hardware, hardware

    facts = {"cpu": "Some CPU", "cpu_isa": "AVX2", "cpu_bf16_flags": [], "cpu_bf16_kernels": False,
             "cpu_count": 3, "gpus": ["NVIDIA H200"], "torch": "9.9"}
    monkeypatch.setattr(machine, "machine_facts", lambda: dict(facts))
    hw = hardware()
    assert hw["cpu_cores"] == 3 and hw["gpus"] == ["NVIDIA H200"] and "python" in hw
    assert describe_hardware(hw) == "NVIDIA H200; CPU Some CPU (3 cores, AVX2); torch 9.9"


# ---- what a time-boxed GPU check (scripts/gpu/checks.sh) relies on -------------------------------------

def test_overrides_go_last_on_train_and_evaluate_commands(tmp_path):
    from dpdm.experiments.reproduce import stages

    plan = {st.name: st for st in stages(RECIPES["mnist-fast"].runs[0], tmp_path, acc_samples=12000,
                                         train_overrides=("++trainer.max_time=00:00:05:00",),
                                         eval_overrides=("evaluation.downstream.val_size=2000",))}
    assert plan["train"].argv[-1] == "++trainer.max_time=00:00:05:00"
    assert plan["eval_acc"].argv[-1] == "evaluation.downstream.val_size=2000"  # last: it wins over defaults
    assert "n=12000" in plan["sample_acc"].argv
    assert "max_time" not in plan["sample_acc"].command and "val_size" not in plan["train"].command
    # Without overrides the commands are the recipe's own, so finished stages of an earlier run still match.
    plain = {st.name: st for st in stages(RECIPES["mnist-fast"].runs[0], tmp_path)}
    assert plain["train"].argv == plan["train"].argv[:-1]


def _fast_row(steps: int, wall: float | None = 600.0, downstream: dict | None = None) -> dict:
    privacy = {"enabled": True, "steps": steps, "planned_steps": 580, "expected_batch_size": 2048,
               "noise_multiplicity": 2, "epsilon": 7.5}
    stages = {name: {"rc": 0} for name in ("train", "sample_acc", "eval_acc")}
    acc = {"metrics": {}, "details": {"downstream": downstream}} if downstream else None
    return {"spec": RECIPES["mnist-fast"].runs[0], "state": {"stages": stages}, "privacy": privacy,
            "summary": {"wall_time_s": wall}, "acc": acc}


def test_a_run_stopped_before_its_planned_steps_says_so():
    from dpdm.experiments.reproduce import status_of

    assert status_of(_fast_row(580)) == "done"
    assert status_of(_fast_row(290)) == "done; stopped at step 290 of 580"


def test_training_rate_and_protocol_cells():
    from dpdm.experiments.reproduce import protocol_of, training_rate

    assert training_rate(_fast_row(300, wall=600.0)) == pytest.approx(300 * 2048 * 2 / 600)
    assert training_rate(_fast_row(300, wall=None)) is None
    row = _fast_row(580, downstream={"num_train": 10000, "num_held_out": 2000, "settings": {"max_epochs": 30}})
    assert protocol_of(row["acc"]) == "10,000 + 2,000 held out, ≤ 30 epochs"
    assert protocol_of(None) == ""
