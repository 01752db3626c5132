"""Deployment files: the shell scripts parse, name configs that exist, the Dockerfile follows the
rules, and a two-node torchrun (c10d rendezvous, both "nodes" on this machine) trains."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from graft import launch
from graft.config import load_config
from helpers import ROOT, env, free_port

SCRIPTS = sorted(p for p in (ROOT / "scripts").rglob("*") if p.suffix in (".sh", ".sbatch"))
REPRODUCE = sorted((ROOT / "scripts" / "reproduce").glob("[!_]*.sh"))
SBATCH = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))
CONFIG_RE = re.compile(r"configs/[\w./-]+?\.yaml")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_scripts_exist():
    names = {rel(p) for p in SCRIPTS}
    for name in ("run.sh", "test.sh", "slurm/single_node.sbatch", "slurm/multi_node.sbatch",
                 "reproduce/cifar10_resnet.sh", "reproduce/cifar100_resnet.sh",
                 "reproduce/mobilenetv2_networks.sh", "reproduce/vgg16_layer_vs_filter.sh",
                 "reproduce/ablation_A_c.sh", "reproduce/imagenet.sh"):
        assert f"scripts/{name}" in names


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def dry_run(script: Path, *args: str) -> list[str]:
    """The commands a reproduce script would run (DRY_RUN=1 prints them, runs nothing)."""
    result = subprocess.run(["bash", str(script), *args], cwd="/", capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1"}, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert lines, f"{rel(script)} printed no command"
    return lines


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_reproduce_scripts_run_existing_configs_into_separate_dirs():
    seen = {}
    for script in REPRODUCE:
        text = script.read_text()
        assert "_launch.sh" in text or "set -euo pipefail" in text, rel(script)
        for cmd in dry_run(script, "epochs=1", "seed=3"):
            words = cmd.split()
            assert words[-2:] == ["epochs=1", "seed=3"], f"{rel(script)} drops its arguments: {cmd}"
            config = words[words.index("--config") + 1]
            assert (ROOT / config).is_file(), f"{rel(script)} runs a missing config: {config}"
            load_config(ROOT / config)
            (out,) = [w.partition("=")[2] for w in words if w.startswith("output_dir=")]
            assert out.startswith("runs/"), cmd
            assert out not in seen, f"{rel(script)} and {seen.get(out)} both write {out}"
            seen[out] = rel(script)


@pytest.mark.parametrize("script", REPRODUCE + SBATCH, ids=rel)
def test_configs_named_in_scripts_exist(script):
    # Literal paths, in the code and in the usage comments alike.
    for config in CONFIG_RE.findall(script.read_text()):
        assert (ROOT / config).is_file(), f"{rel(script)} names a missing config: {config}"


def test_sbatch_scripts():
    for script in SBATCH:
        text = script.read_text()
        for directive in ("--job-name", "--nodes", "--time", "--output", "--requeue", "--signal=B:TERM@"):
            assert re.search(rf"^#SBATCH {re.escape(directive)}", text, re.M), f"{rel(script)}: {directive}"
        assert re.search(r"^#SBATCH --gpus", text, re.M), rel(script)
        assert "set -euo pipefail" in text and '--config "$CONFIG"' in text, rel(script)
        assert re.search(r"^srun\b.* graft-run ", text, re.M), rel(script)
        assert 'output_dir="$RUN_DIR"' in text and '"$@"' in text, rel(script)
    multi = (ROOT / "scripts/slurm/multi_node.sbatch").read_text()
    for part in ("--nnodes \"$SLURM_NNODES\"", "--rdzv-backend c10d", "--rdzv-id \"$SLURM_JOB_ID\"",
                 "--max-restarts=3", "scontrol show hostnames", "data_parallel=2"):
        assert part in multi, part


def test_dockerfile():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert image == "pytorch/pytorch" and tag and tag != "latest", froms[0]
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:"), users
    entry = [json.loads(line.split(None, 1)[1]) for line in lines if line.upper().startswith("ENTRYPOINT")]
    assert entry == [["graft-run"]]
    cmd = [json.loads(line.split(None, 1)[1]) for line in lines if line.upper().startswith("CMD ")]
    assert cmd and cmd[-1][-2:] == ["--config", "configs/quickstart.yaml"]
    launch.parse_args(cmd[-1])  # what the entry point will be given parses
    assert "pip install --no-cache-dir" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    for name in (".venv", "runs", ".git"):
        assert name in ignored


def test_two_nodes_on_one_machine(tmp_path):
    """Two graft-run launches (as the multi-node sbatch script makes them) meet through c10d
    rendezvous, as on two SLURM nodes."""
    port, run_id = free_port(), f"graft-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "graft.launch", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
           "--config", "configs/quickstart.yaml", "data.name=synthetic",
           "model=resnet8", "epochs=1", "batch_size=64", "progress=false", f"output_dir={out}"]
    # c10d rendezvous waits for both nodes, so the launches must run at the same time.
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["network"] for r in records) == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary


def test_the_quick_start_examples_work_as_written():
    """The header of scripts/run.sh shows how to run with other settings: that run must not be
    refused as a resume of runs/quickstart with different settings."""
    text = (ROOT / "scripts" / "run.sh").read_text()
    (example,) = re.findall(r"^#\s+scripts/run.sh (.+)$", text, re.M)
    quickstart = load_config(ROOT / "configs" / "quickstart.yaml")
    other = load_config(ROOT / "configs" / "quickstart.yaml", example.split())
    assert other.setup(2) != quickstart.setup(2)  # another run...
    assert other.output_dir != quickstart.output_dir  # ...so another directory


def test_lint_is_part_of_the_test_command():
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert text.index("ruff check .") < text.index("python -m pytest")
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert re.search(r'^test = \[.*"ruff', pyproject, re.M)
    assert re.search(r'^select = \["E", "F", "W", "I", "B", "UP"\]$', pyproject, re.M)


def test_result_files_name_no_path_of_one_machine():
    for path in sorted((ROOT / "results").glob("*.md")):
        for data in re.findall(r"^Data: `([^`]+)`", path.read_text(), re.M):
            assert not Path(data).is_absolute(), f"{rel(path)}: {data}"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cifar10_small import project_path
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert project_path(str(ROOT.parent / "shared" / "data" / "x.tar.gz")) == "../shared/data/x.tar.gz"
    assert project_path("data/x.tar.gz") == "data/x.tar.gz"
