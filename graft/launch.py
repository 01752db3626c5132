"""graft-run: torchrun for graft, in plain words.

    graft-run [torchrun options] --config FILE [key=value ...]

Checks the config, and that the data is where it says, before any worker starts; then starts
the workers (``python -m graft.train``) through torch.distributed.run's own API, so every
torchrun option works (--nproc_per_node, --nnodes, --rdzv-*, --max-restarts, --standalone...).
When workers fail it prints each distinct ``graft: error:`` line once and exits 1, with no
launcher traceback; Ctrl-C (or a SIGTERM) ends in one line.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousError

from . import cli
from .config import NOTHING_TO_RUN, dump_config, load_config
from .data import check_data
from .errors import REPORTED_BY_LAUNCHER, UserError

USAGE = "graft-run [torchrun options] --config FILE [key=value ...]"
ENTRY = "graft.train"


def parse_args(argv: list[str]):
    """Returns (torchrun's arguments, set to start graft.train; the config file; the overrides;
    whether to print the config and stop)."""
    parser = torchrun.get_args_parser()
    parser.prog, parser.usage, parser.description = "graft-run", USAGE, __doc__.split("\n\n")[2]
    parser.add_argument("--config", "-c", help="YAML config file (configs/quickstart.yaml is the smallest)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) as YAML and exit")
    # torchrun's options end in the training script and its arguments: here that place holds the
    # key=value overrides, and ENTRY closes it (so that no override is required).
    for action in parser._actions:  # argparse offers no public handle on an argument already added
        if action.dest == "training_script":
            action.metavar, action.help = "key=value", "config overrides (dotted keys), e.g. epochs=30 optim.lr=0.05"
        elif action.dest == "training_script_args":
            action.help = argparse.SUPPRESS
    args = parser.parse_args([*argv, ENTRY])
    overrides = [args.training_script, *args.training_script_args][:-1]
    if args.module or args.no_python or args.run_path:
        parser.error(f"graft-run starts 'python -m {ENTRY}' itself: leave out -m, --no-python and --run-path")
    options = [word for word in overrides if word.startswith("-")]
    if options:
        parser.error(f"torchrun options and --config go before the key=value overrides: {' '.join(options)}")
    if args.config is None and not overrides and not args.print_config:
        parser.print_usage(sys.stderr)
        print(f"graft-run: {NOTHING_TO_RUN}", file=sys.stderr)
        raise SystemExit(2)
    args.module, args.training_script = True, ENTRY
    args.training_script_args = (["--config", args.config] if args.config else []) + overrides
    return args, args.config, overrides, args.print_config


def failure_lines(error: ChildFailedError) -> list[str]:
    """Each distinct line the failed workers left (see graft.train.report_error), in rank order;
    for a worker that left none (killed, or a bug's traceback above), a line saying how it ended."""
    lines: list[str] = []
    for rank, failure in sorted(error.failures.items()):
        line = failure.message if isinstance(failure.message, str) else ""
        if not line.startswith("graft: error:") and failure.exitcode < 0:
            line = f"graft: error: rank {rank} was killed by {failure.signal_name()}"
        elif not line.startswith("graft: error:"):
            line = f"graft: error: rank {rank} exited with code {failure.exitcode}; its output above says why"
        if line not in lines:
            lines.append(line)
    return lines


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
    output_dir, resume = None, "auto"  # None: not known here (resume=never picks it in the workers)

    def stopped(signum: int) -> str:
        return (f"graft: stopped by {signal.Signals(signum).name}: the workers stopped between steps; "
                f"{cli.after_stop(output_dir, resume)}")

    try:
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
        print(f"graft: error: {e}", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as e:
        print("\n".join(failure_lines(e)), file=sys.stderr, flush=True)
        return 1
    except RendezvousError as e:
        print(f"graft: error: torchrun's rendezvous failed ({type(e).__name__}: {e}); check --nnodes and "
              "--rdzv-endpoint", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:
        print(stopped(e.sigval), file=sys.stderr, flush=True)
        return 128 + e.sigval
    except KeyboardInterrupt:  # before torchrun's agent took the signals over
        print(stopped(signal.SIGINT), file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
