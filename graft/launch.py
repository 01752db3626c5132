"""graft-run: torchrun for graft, in plain words, for graft's trainer or any training script.

    graft-run [torchrun options] --config FILE [key=value ...]          graft's own trainer
    graft-run [torchrun options] [--data-parallel G] SCRIPT.py [args]   any script, graft.Grafter inside
    graft-run [torchrun options] [--data-parallel G] -m MODULE [args]

With a config (or key=value overrides alone) it checks the config, and that the data is where it
says, before any worker starts, then starts ``python -m graft.train``. With a script it gives each
network a torch.distributed world of its own (graft.script_worker), so that the script's
samplers, DDP, metric reductions and rank-0 saving stay within one network, while
``graft.Grafter()`` joins graft's ring apart from them. Workers start through
torch.distributed.run's own API, so every torchrun option works (--nproc_per_node, --nnodes,
--rdzv-*, --max-restarts, --standalone, --tee...); --nproc_per_node counts processes, networks
x G. When workers fail it prints each distinct ``graft: error:`` line once and exits 1, with no
launcher traceback; Ctrl-C (or a SIGTERM) ends in one line.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import signal
import sys
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousError

from . import cli
from .config import NOTHING_TO_RUN, dump_config, load_config
from .data import check_data
from .errors import REPORTED_BY_LAUNCHER, UserError

USAGE = ("graft-run [torchrun options] --config FILE [key=value ...]\n"
         "       graft-run [torchrun options] [--data-parallel G] SCRIPT.py [script args] | -m MODULE [args]")
ENTRY = "graft.train"
SCRIPT_ENTRY = "graft.script_worker"


def parse_args(argv: list[str]):
    """Returns (torchrun's arguments, set to start graft.train or graft.script_worker; the config
    file, or None for a script; the overrides, or the script and its arguments; whether to print
    the config and stop)."""
    parser = torchrun.get_args_parser()
    parser.prog, parser.usage, parser.description = "graft-run", USAGE, __doc__.split("\n\n")[2]
    parser.add_argument("--config", "-c", help="YAML config file (configs/quickstart.yaml is the smallest)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) as YAML and exit")
    parser.add_argument("--data-parallel", type=int, default=None, metavar="G",
                        help="replicas per network (DDP within the network); --nproc_per_node is networks x G")
    # torchrun's options end in the training script and its arguments: here that place holds the
    # key=value overrides or the script, and ENTRY closes it (so that no override is required).
    for action in parser._actions:  # argparse offers no public handle on an argument already added
        if action.dest == "training_script":
            action.metavar = "key=value | SCRIPT.py"
            action.help = "config overrides (dotted keys, e.g. epochs=30), or a training script and its arguments"
        elif action.dest == "training_script_args":
            action.help = argparse.SUPPRESS
    args = parser.parse_args([*argv, ENTRY])
    words = [args.training_script, *args.training_script_args][:-1]
    if args.no_python or args.run_path:
        parser.error("graft-run starts its workers with python itself: leave out --no-python and --run-path")
    if args.data_parallel is not None and args.data_parallel < 1:
        parser.error(f"--data-parallel must be >= 1; got {args.data_parallel}")
    if args.module and (args.config or args.print_config):
        parser.error(f"-m MODULE runs a script; with --config graft-run starts 'python -m {ENTRY}' itself")
    script = args.module or (args.config is None and not args.print_config and words and "=" not in words[0])
    if script:
        return _script_args(parser, args, words), None, words, False
    options = [word for word in words if word.startswith("-")]
    if options:
        parser.error(f"torchrun options and --config go before the key=value overrides: {' '.join(options)}")
    if args.config is None and not words and not args.print_config:
        parser.print_usage(sys.stderr)
        print(f"graft-run: {NOTHING_TO_RUN}, or a training script (graft-run --nproc_per_node=2 train.py)",
              file=sys.stderr)
        raise SystemExit(2)
    overrides = words + ([f"data_parallel={args.data_parallel}"] if args.data_parallel else [])
    args.module, args.training_script = True, ENTRY
    args.training_script_args = (["--config", args.config] if args.config else []) + overrides
    return args, args.config, overrides, args.print_config


def _script_args(parser, args, words: list[str]):
    """torchrun's arguments for a script: every worker starts graft.script_worker, which runs it."""
    if not words:
        parser.error("-m needs a module name")
    target = words[0]
    if args.module and target in (ENTRY, "graft.train", "graft"):  # it would train each network alone
        parser.error(f"graft-run starts 'python -m {ENTRY}' itself: give --config FILE and key=value overrides "
                     "without -m")
    if not args.module and not Path(target).is_file():
        parser.error(f"{target}: no such training script (graft-run SCRIPT.py [args], or -m MODULE [args]; "
                     "a config goes with --config)")
    args.training_script_args = ["-m" if args.module else "--", target, *words[1:]]
    args.module, args.training_script = True, SCRIPT_ENTRY
    return args


def gpus_of_this_node() -> str:
    """This node's GPUs, in the order local ranks take them ("" without CUDA): workers of a
    script then see their network's own (graft.script_worker)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible
    import torch

    return ",".join(str(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ""


def failure_lines(error: ChildFailedError, replicas: int | None = None) -> list[str]:
    """Each distinct line the failed workers left (see graft.cli.report_error), in rank order;
    for a worker that left none (killed, or a bug's traceback above), a line saying how it ended
    (with ``replicas``, for a script: which network, as the script's own messages count ranks
    within a network)."""
    lines: list[str] = []
    for rank, failure in sorted(error.failures.items()):
        line = failure.message if isinstance(failure.message, str) else ""
        who = f"rank {rank}" if replicas is None else f"network {rank // replicas} (its rank {rank % replicas})"
        if not line.startswith("graft: error:") and failure.exitcode < 0:
            line = f"graft: error: {who} was killed by {failure.signal_name()}"
        elif not line.startswith("graft: error:"):
            line = f"graft: error: {who} exited with code {failure.exitcode}; its output above says why"
        if line not in lines:
            lines.append(line)
    # A worker that failed makes torchrun stop the others with SIGTERM, and peers waiting on it
    # lose their connection or their leader's weights: those lines are its consequence, and the
    # failing worker's own line says what to do.
    causes = [line for line in lines if not CONSEQUENCE.search(line)]
    return merge_ranks(causes or lines)


CONSEQUENCE = re.compile(r": received SIG(TERM|INT): stopped between steps|was killed by SIG(TERM|INT)$"
                         r"|; a peer probably stopped first: see its error$"
                         r"|: rank \d+ refused to graft \(see its error\)")
RANK_PREFIX = re.compile(r"^graft: error: rank (\d+) \(network (\d+)\): ")


def merge_ranks(lines: list[str]) -> list[str]:
    """Lines that differ only in the rank they name (every network found the same bad data)
    become one line that names the ranks, where the first of them stood."""
    groups: dict[str, list[tuple[str, re.Match | None]]] = {}
    for line in lines:
        match = RANK_PREFIX.match(line)
        groups.setdefault(line[match.end():] if match else line, []).append((line, match))
    merged = []
    for body, entries in groups.items():
        matches = [m for _, m in entries]
        if len(entries) == 1 or None in matches:
            merged.append(entries[0][0])
            continue
        ranks = ", ".join(m.group(1) for m in matches)
        networks = ", ".join(dict.fromkeys(m.group(2) for m in matches))
        merged.append(f"graft: error: ranks {ranks} (networks {networks}): {body}")
    return merged


def quiet_torchrun_logs() -> None:
    """torchrun's agent logs its own account of a failure or a stop (and a banner about
    OMP_NUM_THREADS); graft-run says it in one line instead. LOGLEVEL, torchrun's own switch,
    brings the logs back."""
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # line by line into a file too (nohup, a Slurm log)
        sys.stdout.reconfigure(line_buffering=True)
    args, config, overrides, print_config = parse_args(sys.argv[1:] if argv is None else argv)
    script = args.training_script == SCRIPT_ENTRY
    output_dir, resume = None, "auto"  # None: not known here (resume=never picks it in the workers)

    def stopped(signum: int) -> str:
        what = ("stopped; the script's own checkpoints decide what a rerun resumes" if script
                else f"stopped between steps; {cli.after_stop(output_dir, resume)}")
        return f"graft: stopped by {signal.Signals(signum).name}: the workers {what}"

    try:
        if script:
            os.environ["GRAFT_REPLICAS"] = str(args.data_parallel or 1)
            os.environ[REPORTED_BY_LAUNCHER] = "script"  # the workers leave their one line for graft-run
            os.environ["GRAFT_GPUS"] = gpus_of_this_node()
        else:
            cfg = load_config(config, overrides)
            if cfg.resume != "never":
                output_dir = cfg.output_dir
            if print_config:
                print(dump_config(cfg), end="")
                return 0
            check_data(cfg.data)
            os.environ[REPORTED_BY_LAUNCHER] = "1"  # the workers inherit it
        quiet_torchrun_logs()
        torchrun.run(args)
        return 0
    except UserError as e:
        cli.say_error(str(e))
        return 1
    except ChildFailedError as e:
        print("\n".join(failure_lines(e, (args.data_parallel or 1) if script else None)), file=sys.stderr,
              flush=True)
        return 1
    except RendezvousError as e:
        cli.say_error(f"torchrun's rendezvous failed ({type(e).__name__}: {e}); check --nnodes and --rdzv-endpoint")
        return 1
    except SignalException as e:
        print(stopped(e.sigval), file=sys.stderr, flush=True)
        return 128 + e.sigval
    except KeyboardInterrupt:  # before torchrun's agent took the signals over
        print(stopped(signal.SIGINT), file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
