"""scripts/gpu_check.sh --cpu: every step of the GPU check with the CPU standing in, down to its table.

compile=true is left out here: inductor's C++ build of the model takes minutes on 2 shared cores
(the same launcher step as amp=bf16, with one more override); `scripts/gpu_check.sh --cpu` runs it.
"""

import subprocess

import torch

from helpers import ROOT, env

EXPECTED = {"unit": "pass", "two_networks": "pass", "fp16": "skip", "bf16": "pass", "compile": "skip",
            "hybrid": "pass", "resume": "pass", "throughput": "pass", "graft_step": "pass"}


def gpu_check(*args, timeout=3600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows if cells[0] != "check"}


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = gpu_check("--cpu", "--skip", "compile", "--timeout", "600", "--work", str(tmp_path / "work"),
                     "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    rows = table_rows(out.read_text())
    assert {name: cells[0] for name, cells in rows.items()} == EXPECTED, out.read_text()
    figures = {name: cells[2] for name, cells in rows.items()}
    assert "passed" in figures["unit"] and "failed" not in figures["unit"]
    for name in ("two_networks", "bf16", "hybrid"):
        assert figures[name].startswith("gloo: ") and "img/s per network" in figures[name], figures[name]
    assert "resumed after epoch" in figures["resume"]
    assert "official-style loop" in figures["throughput"] and "img/s" in figures["throughput"]
    assert "ring" in figures["graft_step"] and "official file exchange" in figures["graft_step"]
    assert "CPU stand-ins (--cpu)" in out.read_text()


def test_gpu_check_refuses_without_cuda_or_with_an_unknown_check(tmp_path):
    if not torch.cuda.is_available():
        proc = gpu_check("--work", str(tmp_path), timeout=120)
        assert proc.returncode == 2 and "no CUDA device visible; --cpu runs the same steps" in proc.stderr
    proc = gpu_check("--cpu", "--skip", "compiel", "--work", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "unknown check(s) ['compiel']" in proc.stderr
