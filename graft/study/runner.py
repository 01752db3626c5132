"""graft-study's runner and command line: every (arm, seed) of a plan as its own run, one after
another, then the report."""

from __future__ import annotations

import argparse
import fnmatch
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

from ..cli import say_error
from ..engine import machine_name
from ..errors import UserError
from ..report import writing
from .archive import archive, code_version, finished, read_state, write_state, write_weights
from .plan import Plan, Run, command, load_plan, runs_of
from .report import fmt_duration, write_report

WALL_TIME_EVERY = 60.0  # seconds between saves of a run's wall time while it trains (study.json)


def time_left(runs: list[Run], left: list[Run]) -> float | None:
    """Seconds the runs in ``left`` should take, each at the mean wall time of its arm's finished
    runs (an arm that grafts takes longer than one that does not), or of every finished run for
    an arm with none yet. None before any run has finished."""
    walls: dict[str, list[float]] = {}
    for r in runs:
        if finished(r):
            walls.setdefault(r.arm.name, []).append(read_state(r.archive)["wall_seconds"])
    every = [w for ws in walls.values() for w in ws]
    if not every:
        return None
    return sum(statistics.mean(walls.get(r.arm.name, every)) for r in left)


def run_one(plan: Plan, run: Run, extra=()) -> tuple[int, list[str]]:
    """One run, resumed if it was interrupted; its output goes to the terminal and to log.txt.
    Returns its exit code and its 'graft: error:' lines."""

    errors = []  # graft-run's one line per distinct error
    state = read_state(run.dir)
    state["attempts"].append({**code_version(plan.results), "machine": machine_name(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_state(run, state)
    before, start = state["wall_seconds"], time.monotonic()
    ended = threading.Event()

    def keep_time():  # a runner killed outright (a session's end) keeps all but the last minute
        while not ended.wait(WALL_TIME_EVERY):
            state["wall_seconds"] = before + time.monotonic() - start
            try:
                write_state(run, state)
            except OSError:  # the write at the end says it, with its advice
                pass

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(run.dir / "log.txt", "a") as logfile:
        proc = subprocess.Popen(command(plan, run, extra=extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        clock = threading.Thread(target=keep_time, daemon=True)
        clock.start()
        try:
            for line in proc.stdout:
                logfile.write(line)
                logfile.flush()
                print(f"  {line.rstrip()}")
                if line.startswith("graft: error:"):
                    errors.append(line.strip())
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the training stops between steps, the checkpoint stays
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        finally:
            ended.set()
            clock.join()
            state["wall_seconds"] = before + time.monotonic() - start
            state["finished"] = proc.poll() == 0 and (run.dir / "summary.json").exists()
            write_state(run, state)
    if state["finished"]:
        with writing(run.archive, "the run's archive", setting="--results"):
            archive(run)
        write_weights(run)
    return code, errors


def study(plan: Plan, args) -> int:
    """What graft-study does with a plan it has read: dry run, report, or the runs left."""
    runs = all_runs = runs_of(plan)
    if args.only:
        patterns = args.only.split(",")
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.arm.name, p) for p in patterns)]
        if not runs:
            say_error(f"--only {args.only}: no arm matches (arms: {', '.join(a.name for a in plan.arms)})",
                      "graft-study")
            return 2
    left = [r for r in runs if not finished(r)]
    if args.dry_run:
        for r in left:
            print(f"# {r.label}" + (" (resumes)" if (r.dir / "checkpoints").exists() else ""))
            print(shlex.join(command(plan, r, "python", args.overrides)))
        return 0
    if args.report:
        for r in all_runs:
            write_weights(r)
        print(f"report: {write_report(plan, all_runs, args.plan)}")
        return 0
    print(f"study {plan.name}: {len(runs) - len(left)} of {len(runs)} runs finished")
    done_now = 0
    for i, run in enumerate(left):
        if args.max_runs and done_now >= args.max_runs:
            print(f"stopped after {done_now} run(s) (--max-runs); the same command continues the study")
            return 0
        seconds = time_left(runs, left[i:])
        eta = "" if seconds is None else f"; about {fmt_duration(seconds)} left"
        print(f"[{len(runs) - len(left) + i + 1}/{len(runs)}] {run.label} -> {run.dir}{eta}")
        try:
            code, errors = run_one(plan, run, args.overrides)
        except KeyboardInterrupt:
            print(f"interrupted: {run.label} stopped; the same command resumes it after its last finished epoch")
            return 130
        if code != 0 or not finished(run):
            why = f"exit {code}" if code != 0 else f"exit 0, but no {run.dir / 'summary.json'}"
            said = "".join(f"\n  {line}" for line in errors)
            say_error(f"{run.label} failed ({why}); see {run.dir / 'log.txt'}. Fix the cause and run the same command "
                      f"to resume.{said}", "graft-study")
            return 1
        done_now += 1
        print(f"report: {write_report(plan, all_runs, args.plan)}")
    print(f"study {plan.name}: all {len(runs)} runs finished; report: {write_report(plan, all_runs, args.plan)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="graft-study", description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="the study plan (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the runs left, run nothing")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the report from the finished runs (and write weights.json for those "
                        "archived without it, or with an older one, whose checkpoints are still under the root)")
    parser.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: all)")
    parser.add_argument("--root", help="where the runs go (default: the plan's root, runs/studies)")
    parser.add_argument("--results", help="where the report goes (default: the plan's results, results/)")
    parser.add_argument("--only", help="comma-separated arm names or patterns (e.g. 'resnet32_*'): run only these")
    parser.add_argument("overrides", nargs="*", help="key=value added to every run, e.g. data.root=... "
                        "(give the same ones when continuing: a run resumes only with the settings it started with)")
    args = parser.parse_intermixed_args(argv)
    if args.max_runs < 0:
        parser.error(f"--max-runs must be >= 0 (0: all); got {args.max_runs}")
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, into a file too
    signal.signal(signal.SIGTERM, _terminate)  # stop the run in hand as Ctrl-C does

    try:
        plan = load_plan(args.plan, args.overrides, data=not (args.dry_run or args.report))
        plan.root, plan.results = args.root or plan.root, args.results or plan.results
        return study(plan, args)
    except UserError as e:  # a bad plan, override or archived file; a results folder it cannot write
        say_error(str(e), "graft-study")
        return 2


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
