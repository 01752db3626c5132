"""Every GPU-only path in one command, ending with a table: each check pass, fail or skip, with its
figure. Run through scripts/gpu_check.sh (which finds the Python environment):

    scripts/gpu_check.sh [--budget 540] [--out gpu_check.md] [--skip compile,throughput] [--work runs/gpu_check]
    scripts/gpu_check.sh --cpu ...   # the same steps with the CPU standing in (the test suite runs this)

The checks: the CUDA unit tests (pytest -m cuda); 2 networks (NCCL with 2+ GPUs, else both on one
GPU over gloo); amp=fp16, amp=bf16, compile=true, and hybrid mode (2 networks x 2 replicas, with
2+ GPUs), a few epochs of the quick start each; a kill and resume; training throughput of ours
against the official-style loop; the graft step against the official file exchange. Each has a
time limit, so one that hangs fails instead of stopping the rest, and --budget bounds them all: the
table comes within that many seconds, checks it leaves no time for marked skip. Logs and run
directories stay under --work; a failed check names its log. Without a CUDA device (and without
--cpu) it says why torch may see none: its build, the driver nvidia-smi reports, torch's warning.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402
from graft import checkpoint  # noqa: E402

FIXTURE = "tests/fixtures/cifar10_sample.tar.gz"
CHECKS = ("unit", "two_networks", "fp16", "bf16", "compile", "hybrid", "resume", "throughput", "graft_step")
MIN_START = 20.0  # seconds of --budget a check needs left to be started
_deadline = math.inf  # time.monotonic() by which every check must be done (--budget)


def time_left(limit: float) -> float:
    """``limit`` seconds, cut to what --budget leaves."""
    return min(limit, _deadline - time.monotonic())


class Failed(Exception):
    """The check ran and did not pass: the message says what was wrong."""


class Skipped(Exception):
    """The check does not apply here (no stand-in on the CPU, too few GPUs, --skip)."""


@dataclass
class Setup:
    cpu: bool
    work: Path
    data: str
    timeout: float = 300.0
    gpus: int = 0
    results: list = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def size(self) -> list[str]:
        """The quick start cut down: a few GPU seconds per run, or a few CPU seconds with --cpu."""
        if self.cpu:
            return ["model=resnet8", "epochs=2", "batch_size=50", "data.train_subset=200", "data.test_subset=100"]
        return ["epochs=3"]

    @property
    def epochs(self) -> int:
        return int(next(o for o in self.size if o.startswith("epochs=")).partition("=")[2])

    @property
    def resume_epochs(self) -> int:
        """The kill-and-resume run's epochs. The kill lands once both networks have saved their
        first epoch, and must land before the run ends: on a fast GPU an epoch of the quick start
        takes a fraction of a second (two more would end the run within about a second of its first
        checkpoints), so the GPU run gets 40, some seconds to spare; the stand-in's epochs on the
        CPU take seconds each."""
        return self.epochs + 2 if self.cpu else 40


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group (torchrun and its workers), output to ``log``. On
    timeout (or once --budget is spent) the whole group is killed and the check fails."""
    limit, timeout = timeout, max(1.0, time_left(timeout))
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            spent = "; --budget spent" if timeout < limit else ""
            raise Failed(f"no result within {timeout:.0f} s (killed{spent}); see {log}") from None
    return rc, log.read_text()


def last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if "error" in line.lower() or line.startswith("E ")]
    return (lines or text.strip().splitlines() or ["(no output)"])[-1][:300]


def launcher(setup: Setup, out: Path, nproc: int, overrides=()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "graft.train", "--config", "configs/quickstart.yaml", f"output_dir={out}",
            f"data.cache_dir={setup.work / 'cache'}", "progress=false", f"device={setup.device}",
            *setup.size, *overrides]


def train(setup: Setup, name: str, nproc: int, overrides=(), slow: float = 1, fresh: bool = True) -> str:
    """A launcher run into work/<name> (emptied first unless ``fresh`` is False), allowed ``slow``
    times the time limit; its output."""
    out = setup.work / name
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    log = setup.work / f"{name}.log"
    rc, text = run(launcher(setup, out, nproc, overrides), log, slow * setup.timeout)
    if rc != 0:
        raise Failed(f"exit {rc}: {last_error(text)} (see {log})")
    return text


def run_figure(setup: Setup, name: str, text: str, networks: int, backend: str, epochs: int | None = None) -> str:
    """Check a finished run (topology as expected, one record per network and epoch, a summary) and
    give its figures: images/s per network (last epoch), the graft step, final test accuracy."""
    out, epochs = setup.work / name, epochs or setup.epochs
    topology = re.search(r"backend (\w+); device (\w+)", text)
    if not topology or topology.groups() != (backend, setup.device):
        raise Failed(f"expected backend {backend} on {setup.device}, the run says "
                     f"{topology.group(0) if topology else 'nothing'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = collections.Counter((r["network"], r["epoch"]) for r in records)
    want = {(k, e): 1 for k in range(networks) for e in range(epochs)}
    if counts != want:
        raise Failed(f"{out}/metrics.jsonl: records per (network, epoch) {dict(counts)}, expected one each")
    if not (out / "summary.json").exists():
        raise Failed(f"{out}: no summary.json")
    last = [r for r in records if r["epoch"] == epochs - 1]
    grafts = [r["graft_seconds"] for r in records if r["graft_seconds"]]
    graft = f", graft step {1e3 * sum(grafts) / len(grafts):.1f} ms" if grafts else ""
    return (f"{backend}: {sum(r['images_per_sec'] for r in last) / len(last):.0f} img/s per network{graft}, "
            f"test acc {sum(r['test_acc'] for r in last) / len(last):.1f}% after {epochs} epochs")


# --------------------------------------------------------------------------------------------
# The checks: each returns its figure, or raises Failed / Skipped
# --------------------------------------------------------------------------------------------


def check_unit(setup: Setup) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if setup.cpu:
        env["GRAFT_TEST_DEVICE"] = "cpu"  # the same tests, the CPU standing in for the GPU
    log = setup.work / "unit.log"
    rc, text = run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"],
                   log, timeout=2 * setup.timeout, env=env)
    tally = re.findall(r"(\d+) (passed|failed|skipped|error)", text)
    if rc != 0:
        raise Failed(f"{', '.join(' '.join(t) for t in tally) or last_error(text)} (see {log})")
    if not any(kind == "passed" for _, kind in tally):
        raise Failed(f"nothing ran: {', '.join(' '.join(t) for t in tally)} (see {log})")
    return ", ".join(" ".join(t) for t in tally)


def two_network_backend(setup: Setup, processes: int) -> str:
    """What backend=auto should pick: NCCL when every process has a GPU of its own."""
    return "nccl" if not setup.cpu and setup.gpus >= processes else "gloo"


def check_two_networks(setup: Setup) -> str:
    return run_figure(setup, "two_networks", train(setup, "two_networks", 2), 2, two_network_backend(setup, 2))


def check_fp16(setup: Setup) -> str:
    if setup.cpu:
        raise Skipped("CUDA only (the CPU refuses amp=fp16)")
    text = train(setup, "fp16", 2, ["amp=fp16"])
    return run_figure(setup, "fp16", text, 2, two_network_backend(setup, 2))


def check_bf16(setup: Setup) -> str:
    return run_figure(setup, "bf16", train(setup, "bf16", 2, ["amp=bf16"]), 2, two_network_backend(setup, 2))


def check_compile(setup: Setup) -> str:
    text = train(setup, "compile", 2, ["compile=true"], slow=2)  # the compiler's first build
    return run_figure(setup, "compile", text, 2, two_network_backend(setup, 2))


def check_hybrid(setup: Setup) -> str:
    if not setup.cpu and setup.gpus < 2:
        raise Skipped(f"needs 2 GPUs, {setup.gpus} here")
    text = train(setup, "hybrid", 4, ["data_parallel=2"])
    return run_figure(setup, "hybrid", text, 2, two_network_backend(setup, 4))


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def check_resume(setup: Setup) -> str:
    """SIGKILL network 1's process once both networks have saved epoch 1, then rerun the same
    command: it resumes from the newest epoch both completed and finishes."""
    name, epochs = "resume", setup.resume_epochs
    out = setup.work / name
    shutil.rmtree(out, ignore_errors=True)
    first = [checkpoint.epoch_path(out, k, 0) for k in (0, 1)]
    log = setup.work / f"{name}-killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(launcher(setup, out, 2, [f"epochs={epochs}"]), cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + time_left(setup.timeout)
            while not all(p.exists() for p in first):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Failed(f"the first run ended or stalled before its first checkpoints (see {log})")
                time.sleep(0.05)
            workers = children(proc.pid)
            if len(workers) != 2:
                raise Failed(f"expected 2 worker processes under torchrun, found {workers}")
            os.kill(workers[1], signal.SIGKILL)
            try:
                rc = proc.wait(timeout=max(1.0, time_left(setup.timeout)))
            except subprocess.TimeoutExpired:
                raise Failed(f"torchrun did not end after its worker was killed (see {log})") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc == 0:
        raise Failed(f"the first run finished although a worker was killed (see {log})")
    text = train(setup, name, 2, [f"epochs={epochs}"], fresh=False)
    resumed = re.search(r"resuming after epoch (\d+)/", text)
    if not resumed:
        raise Failed(f"the second run did not resume (see {setup.work / name}.log)")
    run_figure(setup, name, text, 2, two_network_backend(setup, 2), epochs)
    return (f"network 1 killed (torchrun exit {rc}); the rerun resumed after epoch {resumed.group(1)} "
            f"and completed {epochs} epochs, one record each")


def markdown_row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row of a benchmark's output that starts with ``first_cell``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise Failed(f"no table row for {first_cell} in the benchmark's output")


def check_throughput(setup: Setup) -> str:
    model, sizes = ("resnet8", ["--pairs", "1", "--steps", "2", "--warmup", "1"]) if setup.cpu else \
        ("resnet32", ["--pairs", "2", "--steps", "60", "--warmup", "10"])
    log = setup.work / "throughput.log"
    rc, text = run([sys.executable, "benchmarks/bench_throughput.py", "--device", setup.device, "--data", setup.data,
                    "--models", model, *sizes], log, setup.timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if rc != 0:
        raise Failed(f"exit {rc}: {last_error(text)} (see {log})")
    _, ours, nchw, bf16, reference, ratio, ratio_bf16 = markdown_row(text, model)
    return (f"{model}: ours {ours} img/s (NCHW {nchw}, amp=bf16 {bf16}), official-style loop {reference} img/s: "
            f"{ratio} ({ratio_bf16} with bf16)")


def check_graft_step(setup: Setup) -> str:
    model, repeat = ("resnet8", "2") if setup.cpu else ("resnet56", "5")
    log = setup.work / "graft_step.log"
    rc, text = run([sys.executable, "benchmarks/bench_graft.py", "--device", setup.device, "--models", model,
                    "--networks", "2", "--repeat", repeat], log, setup.timeout,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if rc != 0:
        raise Failed(f"exit {rc}: {last_error(text)} (see {log})")
    cells = markdown_row(text, model)
    return (f"{model}, 2 networks on {two_network_backend(setup, 2)}: ring {cells[3]} ms, all_gather {cells[2]} ms; "
            f"official file exchange {cells[4]} ms ({cells[6]} faster without its poll wait)")


# --------------------------------------------------------------------------------------------


def nvidia_smi() -> str | None:
    """nvidia-smi's output (its header names the driver and the CUDA version it supports), None
    where there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi did not run: {e}"
    return proc.stdout + proc.stderr


def version(text: str | None) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text or "")[:2])


def no_cuda_diagnosis(torch_version: str, torch_cuda: str | None, smi: str | None, warned: list[str],
                      visible: str | None) -> str:
    """Why torch may see no GPU, from what this machine tells: torch's build (``torch.version.cuda``),
    the driver and the CUDA version it supports (nvidia-smi's header), what torch warned while
    looking, CUDA_VISIBLE_DEVICES. Lines for parser.error."""
    lines = ["no CUDA device visible; --cpu runs the same steps with the CPU standing in",
             f"  torch {torch_version}: " + (f"built for CUDA {torch_cuda} (torch.version.cuda)" if torch_cuda else
                                             "a CPU-only build (torch.version.cuda is None): install a CUDA build")]
    lines += [f"  torch warned: {' '.join(w.split())[:400]}" for w in warned]
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        lines.append(f"  CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    driver = re.search(r"Driver Version:\s*([\d.]+)", smi or "")
    supports = re.search(r"CUDA Version:\s*([\d.]+)", smi or "")
    if smi is None:
        lines.append("  driver: no nvidia-smi on PATH: no NVIDIA driver here (in a container: docker run --gpus all)")
    elif not driver:
        first = next((line.strip() for line in smi.splitlines() if line.strip()), "no output")
        lines.append(f"  driver: nvidia-smi reports no driver: {first[:300]}")
    else:
        lines.append(f"  driver: {driver.group(1)}, which supports CUDA up to "
                     f"{supports.group(1) if supports else '(not shown)'} (nvidia-smi)")
    if torch_cuda and supports and version(torch_cuda) > version(supports.group(1)):
        newer = f"  torch's CUDA {torch_cuda} is newer than the {supports.group(1)} the driver supports: "
        if version(torch_cuda)[0] > version(supports.group(1))[0]:
            lines.append(newer + f"update the driver, or install a torch built for CUDA {version(supports.group(1))[0]}"
                         " (https://pytorch.org/get-started/locally/ names its pip index)")
        else:
            lines.append(newer + "CUDA's minor version compatibility usually runs it; if not, update the driver")
    else:
        lines.append("  hint: a CUDA 13 build of torch needs a recent driver (580 or later): compare "
                     "torch.version.cuda with the CUDA version nvidia-smi reports")
    return "\n".join(lines)


def main(argv=None) -> int:
    global _deadline
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU standing in for the GPU (for the test suite)")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--skip", default="", help=f"checks to leave out, comma-separated: {','.join(CHECKS)}")
    parser.add_argument("--work", default="runs/gpu_check", help="logs and run directories")
    parser.add_argument("--data", default=FIXTURE, help="CIFAR-10 .tar.gz for the throughput benchmark")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds each run may take (the unit tests and compile=true twice that)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for everything: the table comes within them, checks left without "
                             f"{MIN_START:.0f} s are marked skip (540 keeps a 10-minute slot)")
    args = parser.parse_args(argv)
    if args.budget is not None:
        _deadline = time.monotonic() + args.budget
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(CHECKS):
        parser.error(f"--skip: unknown check(s) {sorted(skip - set(CHECKS))}; the checks: {', '.join(CHECKS)}")
    if not args.cpu:
        with warnings.catch_warnings(record=True) as warned:  # torch says why CUDA failed to start
            warnings.simplefilter("always")
            cuda = torch.cuda.is_available()
        if not cuda:
            parser.error(no_cuda_diagnosis(torch.__version__, torch.version.cuda, nvidia_smi(),
                                           [str(w.message) for w in warned],
                                           os.environ.get("CUDA_VISIBLE_DEVICES")))
    setup = Setup(args.cpu, (ROOT / args.work).resolve(), args.data, args.timeout,
                  gpus=0 if args.cpu else torch.cuda.device_count())
    setup.work.mkdir(parents=True, exist_ok=True)

    rows, start = [], time.perf_counter()
    for name in CHECKS:
        t0 = time.perf_counter()
        try:
            if name in skip:
                raise Skipped("--skip")
            if time_left(math.inf) < MIN_START:
                raise Skipped(f"not started: --budget {args.budget:.0f} s spent")
            result, figure = "pass", globals()[f"check_{name}"](setup)
        except Failed as e:
            result, figure = "FAIL", str(e)
        except Skipped as e:
            result, figure = "skip", str(e)
        except Exception as e:  # a fault of the check itself: the table still comes
            result, figure = "FAIL", f"{type(e).__name__}: {e}"
        rows.append((name, result, time.perf_counter() - t0, figure))
        print(f"[gpu_check] {name}: {result} ({rows[-1][2]:.0f} s) {figure}", flush=True)

    where = ("CPU stand-ins (--cpu)" if args.cpu
             else f"{setup.gpus} GPU(s), {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    table = "\n".join([
        "## GPU check", "",
        f"Command: `scripts/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Run on: {where}; {time.perf_counter() - start:.0f} s in all  ",
        f"Date: {datetime.date.today().isoformat()}", "",
        "| check | result | seconds | figure |", "|---|---|---|---|",
        *(f"| {name} | {result} | {seconds:.0f} | {figure} |" for name, result, seconds, figure in rows)])
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 1 if any(result == "FAIL" for _, result, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
