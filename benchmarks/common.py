"""Shared by the benchmarks: timing, the machine's description, and BENCHMARKS.md sections."""

import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from graft.engine import cpu_has_bf16, cpu_name

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    cpu = cpu_name()
    # "AMD EPYC" names several generations; whether bf16 is native decides the bf16 figures.
    bf16 = {True: " (native bf16)", False: " (no AVX512-BF16/AMX: bf16 emulated)", None: ""}[cpu_has_bf16()]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}{bf16}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def timeit(fn, repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, stamped with command, machine, date."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], BENCHMARKS_MD.parent)] + sys.argv[1:])
    stamp = (f"Command: `{command}`  \nMachine: {machine()}  \n"
             f"Date: {datetime.date.today().isoformat()}\n\n")
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    body = body.strip()
    heading = ""
    if body.startswith("## "):  # the section's title goes above the stamp
        heading, _, body = body.partition("\n")
        heading += "\n\n"
    block = f"{begin}\n{heading}{stamp}{body.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
    print(block)
