"""Deployment files: the shell scripts parse, name configs that exist, the Dockerfile follows the
rules, and a two-node torchrun (c10d rendezvous, both "nodes" on this machine) trains."""

import json
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
PAPER_PLANS = sorted((ROOT / "studies" / "paper").glob("*.yaml"))
SBATCH = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))
CONFIG_RE = re.compile(r"configs/[\w./-]+?\.yaml")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_scripts_exist():
    names = {rel(p) for p in SCRIPTS}
    for name in ("run.sh", "test.sh", "slurm/single_node.sbatch", "slurm/multi_node.sbatch"):
        assert f"scripts/{name}" in names
    plans = {p.stem for p in PAPER_PLANS}
    assert {"cifar10_resnet", "cifar100_resnet", "cifar10_mobilenetv2_networks", "cifar100_mobilenetv2_networks",
            "vgg16_layer_vs_filter", "ablation_A_c", "imagenet", "cifar_wrn28_10"} <= plans


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=rel)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def dry_run(plan: Path, *args: str) -> list[str]:
    """The commands a study plan would run (graft-study --dry-run prints them, runs nothing)."""
    result = subprocess.run([sys.executable, "-m", "graft.study", str(plan), "--dry-run", *args], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines, f"{rel(plan)} printed no command"
    return lines


def test_paper_plans_run_existing_configs_into_separate_dirs():
    seen = {}
    for plan in PAPER_PLANS:
        for config in CONFIG_RE.findall(plan.read_text()):  # the usage comments too
            assert (ROOT / config).is_file(), f"{rel(plan)} names a missing config: {config}"
        for cmd in dry_run(plan, "data.root=/data"):
            words = cmd.split()
            assert words[-1] == "data.root=/data", f"{rel(plan)} drops its arguments: {cmd}"
            config = words[words.index("--config") + 1]
            load_config(ROOT / config)
            (out,) = [w.partition("=")[2] for w in words if w.startswith("output_dir=")]
            assert out.startswith("runs/studies/"), cmd
            assert out not in seen, f"{rel(plan)} and {seen.get(out)} both write {out}"
            seen[out] = rel(plan)


def test_plan_only_picks_arms():
    cmds = dry_run(ROOT / "studies" / "paper" / "cifar10_mobilenetv2_networks.yaml", "--only", "baseline,n6")
    assert [c.split()[4] for c in cmds] == ["--nproc_per_node=1", "--nproc_per_node=6"]


@pytest.mark.parametrize("script", SBATCH, ids=rel)
def test_configs_named_in_scripts_exist(script):
    # Literal paths, in the code and in the usage comments alike.
    for config in CONFIG_RE.findall(script.read_text()):
        assert (ROOT / config).is_file(), f"{rel(script)} names a missing config: {config}"


def test_sbatch_scripts():
    for script in SBATCH:
        text = script.read_text()
        # The warning is USR1, not TERM: a plain scancel sends TERM to the batch shell too.
        for directive in ("--job-name", "--nodes", "--time", "--output", "--requeue", "--signal=B:USR1@"):
            assert re.search(rf"^#SBATCH {re.escape(directive)}", text, re.M), f"{rel(script)}: {directive}"
        assert "source scripts/slurm/_job.sh" in text and "wait_step $!" in text, rel(script)
        assert re.search(r"^#SBATCH --gpus", text, re.M), rel(script)
        assert "set -euo pipefail" in text and '--config "$CONFIG"' in text, rel(script)
        assert re.search(r"^srun\b.* torchrun ", text, re.M), rel(script)  # the form run under a real Slurm
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



def test_dockerfile_can_compile_and_run_the_gpu_check():
    """The image is not built here: its Dockerfile has what compile=true and scripts/gpu_check.sh
    need. A -devel base (the -runtime one has no C compiler for Inductor and Triton) with a torch
    pyproject.toml accepts; benchmarks/ and tests/ in the image, and pytest and hypothesis."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    (base,) = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    tag = base.partition(":")[2]
    assert tag.endswith("-devel"), f"{base}: compile=true needs a C compiler, which only -devel has"
    torch_version = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)\.\d+-cuda\d", tag).groups())
    assert torch_version >= (2, 6), f"{base}: pyproject.toml needs torch>=2.6"
    pyproject = (ROOT / "pyproject.toml").read_text()
    below = re.search(r'"torch>=[\d.]+,<(\d+)\.(\d+)"', pyproject).groups()
    assert torch_version < tuple(map(int, below)), f"{base}: above pyproject.toml's torch range"
    copies = {tuple(line.split()[1:]) for line in lines if line.upper().startswith("COPY ")}
    for folder in ("benchmarks", "tests", "scripts", "configs", "graft"):
        assert (folder, f"./{folder}") in copies, f"the image lacks {folder}/ (scripts/gpu_check.sh runs it)"
    # Joined continuation lines: the RUN that installs the package installs the test tools too.
    installs = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert any(re.search(r"-c /tmp/keep.txt \. ", line) for line in installs), installs  # torch stays pinned
    for tool in ("pytest", "hypothesis"):
        assert any(re.search(rf"[\s\"']{tool}\b", line) for line in installs), f"{tool} not installed: {installs}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for folder in ("benchmarks", "tests", "scripts", "configs", "graft"):
        assert not {folder, f"{folder}/", f"/{folder}", f"**/{folder}"} & set(ignored), folder


def test_local_cluster_counts_the_machines_cores():
    """nproc honours OMP_NUM_THREADS (1 in the tests' environment): nodes of 1 CPU would refuse
    every job of --cpus-per-task=2."""
    text = (ROOT / "scripts" / "slurm" / "local_cluster.sh").read_text()
    (line,) = [line.strip() for line in text.splitlines() if line.strip().startswith("cpus=")]
    assert "_NPROCESSORS_ONLN" in line or "nproc --all" in line, line
    assert not re.search(r"\bnproc\)", line), line

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
