"""scripts/gpu_check.sh --cpu: every step of the GPU check with the CPU standing in, down to its table.

compile=true is left out here: inductor's C++ build of the model takes minutes on 2 shared cores
(the same launcher step as amp=bf16, with one more override); `scripts/gpu_check.sh --cpu` runs it.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, env

EXPECTED = {"unit": "pass", "two_networks": "pass", "fp16": "skip", "bf16": "pass", "compile": "skip",
            "hybrid": "pass", "resume": "pass", "throughput": "pass", "graft_step": "pass"}


def gpu_check(*args, timeout=3600, extra_env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # (its dataclass looks itself up there)
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows if cells[0] != "check"}


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    # CI's time budget: its launcher steps for bf16 and hybrid mode run the launcher step of
    # two_networks with one more override each, and test_train runs both kinds of run.
    ci = os.environ.get("CI") and os.environ.get("GRAFT_TEST_SLOW") != "1"
    left_out = ["compile", *(["bf16", "hybrid"] if ci else [])]
    out = tmp_path / "gpu_check.md"
    proc = gpu_check("--cpu", "--skip", ",".join(left_out), "--timeout", "600", "--work", str(tmp_path / "work"),
                     "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    rows = table_rows(out.read_text())
    expected = {name: "skip" if name in left_out else result for name, result in EXPECTED.items()}
    assert {name: cells[0] for name, cells in rows.items()} == expected, out.read_text()
    figures = {name: cells[2] for name, cells in rows.items()}
    assert "passed" in figures["unit"] and "failed" not in figures["unit"]
    for name in {"two_networks", "bf16", "hybrid"} - set(left_out):
        assert figures[name].startswith("gloo: ") and "img/s per network" in figures[name], figures[name]
    assert "resumed after epoch" in figures["resume"]
    assert "official-style loop" in figures["throughput"] and "img/s" in figures["throughput"]
    assert "ring" in figures["graft_step"] and "official file exchange" in figures["graft_step"]
    assert "CPU stand-ins (--cpu)" in out.read_text()


@pytest.mark.slow
def test_gpu_check_refuses_without_cuda_or_with_an_unknown_check(tmp_path):
    if not torch.cuda.is_available():
        proc = gpu_check("--work", str(tmp_path), timeout=120)
        assert proc.returncode == 2 and "no CUDA device visible; --cpu runs the same steps" in proc.stderr
        # Why: torch's build and the driver, not only that there is no device.
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        assert f"torch {torch.__version__}: {build}" in proc.stderr, proc.stderr
        assert "  driver: " in proc.stderr, proc.stderr
    proc = gpu_check("--cpu", "--skip", "compiel", "--work", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "unknown check(s) ['compiel']" in proc.stderr


def test_gpu_check_names_what_its_python_lacks(tmp_path):
    """A python3 found on the machine (a Docker image's) may have torch and not the test tools: one
    line before any check says what is missing and how to install it."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("pytest", "hypothesis"):  # first on PYTHONPATH after the project: as if not installed
        (hidden / f"{name}.py").write_text(f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
    proc = gpu_check("--cpu", "--work", str(tmp_path / "work"), timeout=120,
                     extra_env={"PYTHONPATH": str(hidden)})
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "lacks pytest, hypothesis; install with: " in line and "-m pip install 'pytest>=7' 'hypothesis>=6'" in line
    assert not (tmp_path / "work").exists()  # nothing started

    bare = tmp_path / "bare"  # a Python with nothing installed
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    proc = gpu_check("--cpu", timeout=120, extra_env={"GPU_CHECK_PYTHON": str(bare / "bin" / "python")})
    (line,) = proc.stderr.splitlines()
    assert proc.returncode == 2 and "lacks torch, torchvision, pytest, hypothesis" in line, proc.stderr
    assert "-m pip install -e '.[test]'" in line


@pytest.mark.slow
def test_gpu_check_budget_bounds_the_run(tmp_path):
    """--budget: the table comes within it, the checks it leaves no time for marked skip."""
    out = tmp_path / "gpu_check.md"
    proc = gpu_check("--cpu", "--budget", "5", "--work", str(tmp_path / "work"), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = table_rows(out.read_text())
    assert list(rows) == list(EXPECTED)
    assert all(cells[0] == "skip" and "--budget 5 s spent" in cells[2] for cells in rows.values()), rows


def test_no_cuda_diagnosis_compares_torch_with_the_driver():
    diagnose = gpu_check_module().no_cuda_diagnosis
    smi = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"
    text = diagnose("2.14.1+cu130", "13.0", smi, [], None)
    assert "torch 2.14.1+cu130: built for CUDA 13.0" in text
    assert "driver: 550.54.15, which supports CUDA up to 12.4" in text
    assert "torch's CUDA 13.0 is newer than the 12.4 the driver supports: update the driver" in text
    assert "minor version compatibility" in diagnose("2.9.1+cu128", "12.8", smi, [], None)
    text = diagnose("2.9.1+cu128", "12.8", "NVIDIA-SMI has failed because it couldn't communicate with the "
                    "NVIDIA driver.", ["CUDA initialization: The NVIDIA driver on your system is too old"], "")
    assert "nvidia-smi reports no driver: NVIDIA-SMI has failed" in text
    assert "torch warned: CUDA initialization: The NVIDIA driver on your system is too old" in text
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in text
    text = diagnose("2.14.1+cpu", None, None, [], None)
    assert "a CPU-only build (torch.version.cuda is None)" in text and "no nvidia-smi on PATH" in text
    assert "a CUDA 13 build of torch needs a recent driver" in text


def test_the_killed_run_outlasts_the_kill_on_a_fast_gpu(tmp_path):
    """The kill lands after the first checkpoints: on a GPU the run must have many epochs left then
    (an H100 trains one of the quick start's in a fraction of a second), the CPU stand-in few."""
    setup_cls = gpu_check_module().Setup
    gpu, cpu = setup_cls(False, tmp_path, "x"), setup_cls(True, tmp_path, "x")
    assert gpu.resume_epochs >= 30 and gpu.resume_epochs > gpu.epochs
    assert cpu.resume_epochs <= cpu.epochs + 2
