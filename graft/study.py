"""Run a study: every (arm, seed) of a plan as its own torchrun run, then a report.

    graft-study studies/cifar10_cpu.yaml            # run what is left, rewrite the report
    graft-study studies/cifar10_cpu.yaml --dry-run  # print the commands
    graft-study studies/cifar10_cpu.yaml --report   # only rewrite the report
    graft-study studies/paper/cifar10_resnet.yaml --only 'resnet32_*' data.download=true

A plan (YAML) names a base config, common overrides, the arms (name, networks, overrides), the
seeds and the study's name. Runs go to ``<root>/<name>/<arm>/seed<k>/`` one after another.
Finished runs are skipped and an interrupted one resumes (the launcher's ``resume: auto``), so
the same command continues a study after any stop. Each run records the code version it ran
(git commit, and whether the tree had changes) and the machine (CPU, cores, GPU) of each attempt
in ``study.json`` beside its outputs.

A finished run's small files (config.yaml, metrics.jsonl, summary.json, study.json; no
checkpoints) are copied to ``<results>/<name>/<arm>/seed<k>/``, with weights.json: how far apart
the networks' final weights are (``final_distance``). The report is made from these files
alone, they can be committed beside it as its evidence, and a run found there counts as
finished, so a study continues on another machine from the committed results. After every run
the report is rewritten: ``<results>/<name>.md`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import ConfigError, _build, load_config


@dataclass
class Arm:
    name: str = ""
    networks: int = 2             # networks; --nproc_per_node is this times the config's data_parallel
    config: str = ""              # this arm's own base config ("" = the plan's)
    overrides: list[str] = field(default_factory=list)
    nproc: int = 0                # set from the resolved config, not in plans
    setup: dict = field(default_factory=dict)  # the same: what its runs must train with (cfg.setup and epochs)


@dataclass
class Plan:
    name: str = ""
    config: str = ""              # the base config, relative to the directory graft-study runs in
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[Arm] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # for every arm
    reference: str = ""           # the arm the others are compared with ("" = the first)
    root: str = "runs/studies"
    results: str = "results"
    description: str = ""         # the recipe and why: copied into the report


@dataclass
class Run:
    arm: Arm
    seed: int
    dir: Path       # where it trains: checkpoints and all
    archive: Path   # where its small files go when it has finished

    @property
    def label(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"


ARCHIVED = ("config.yaml", "metrics.jsonl", "summary.json", "study.json")
# Set by graft-study for each run: an override of one would make every seed the same run, or
# send a run where the study does not look for it.
RESERVED = {"seed": "the plan's seeds: list gives them", "output_dir": "each run goes to <root>/<name>/<arm>/seed<k>",
            "resume": "interrupted runs always resume (resume=auto)"}


def _check_reserved(overrides, where: str) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED:
            raise ConfigError(f"{where}: {item}: graft-study sets {key} for each run ({RESERVED[key]})")


def load_plan(path: str | Path, extra=()) -> Plan:
    """Read and check a plan; every arm's config is resolved here, with ``extra`` (graft-study's
    own key=value arguments, which every run gets last), so a bad override fails now, naming the
    arm, and not hours later, and the process count follows an extra ``data_parallel``."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read plan: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    plan = _build(Plan, values, str(path))
    _check_reserved(plan.overrides, f"{path}: overrides")
    _check_reserved(extra, "command line")
    if not plan.name or "/" in plan.name:
        raise ConfigError(f"{path}: name: a study name without '/' is required")
    if not plan.arms:
        raise ConfigError(f"{path}: arms: at least one arm is required")
    if not plan.seeds or len(set(plan.seeds)) != len(plan.seeds):
        raise ConfigError(f"{path}: seeds: a list of distinct seeds is required; got {plan.seeds}")
    names = [a.name for a in plan.arms]
    for arm in plan.arms:
        if not arm.name or "/" in arm.name or names.count(arm.name) > 1:
            raise ConfigError(f"{path}: arms: each arm needs a distinct name without '/'; got {arm.name!r}")
        if arm.networks < 1:
            raise ConfigError(f"{path}: arms: {arm.name}: networks must be >= 1; got {arm.networks}")
        _check_reserved(arm.overrides, f"{path}: arm {arm.name}: overrides")
        arm.config = arm.config or plan.config
        if not arm.config:
            raise ConfigError(f"{path}: config: a base config is required (for the plan or for arm {arm.name})")
        try:
            cfg = load_config(arm.config, [*plan.overrides, *arm.overrides, *extra])
        except ConfigError as e:
            raise ConfigError(f"{path}: arm {arm.name}: {e}") from None
        arm.nproc = arm.networks * cfg.data_parallel
        arm.setup = run_setup(cfg, arm.networks)
    if plan.reference and plan.reference not in names:
        raise ConfigError(f"{path}: reference: no arm named {plan.reference!r} (arms: {', '.join(names)})")
    plan.reference = plan.reference or names[0]
    return plan


def run_setup(cfg, networks: int) -> dict:
    """What makes the runs of an arm one experiment: every setting that shapes training (as a
    checkpoint records it) and the number of epochs; not the seed, which each run sets."""
    setup = {**cfg.setup(networks), "epochs": cfg.epochs}
    setup.pop("seed")
    return setup


def runs_of(plan: Plan) -> list[Run]:
    """Seed by seed, arm by arm: every arm of a seed finishes before the next seed starts, so a
    study cut short already has paired comparisons."""
    root, archive = Path(plan.root) / plan.name, Path(plan.results) / plan.name
    return [Run(arm, seed, root / arm.name / f"seed{seed}", archive / arm.name / f"seed{seed}")
            for seed in plan.seeds for arm in plan.arms]


def command(plan: Plan, run: Run, python: str = sys.executable, extra=()) -> list[str]:
    """The run's torchrun command; ``extra`` overrides (from graft-study's command line) come last."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.arm.nproc}",
            "-m", "graft.train", "--config", run.arm.config, *plan.overrides, *run.arm.overrides,
            f"seed={run.seed}", f"output_dir={run.dir}", "resume=auto", "progress=false", *extra]


def read_json(path: Path):
    """A study's JSON file; a damaged one (a merge conflict in committed results, say) is named."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e}); restore it, or remove its run's folder to run it again") \
            from None


def read_state(run_dir: Path) -> dict:
    path = run_dir / "study.json"
    return read_json(path) if path.exists() else {"attempts": [], "wall_seconds": 0.0}


def write_json(path: Path, obj) -> None:
    """Whole or not at all: a stop during the write leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_state(run: Run, state: dict) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    write_json(run.dir / "study.json", state)


def finished(run: Run) -> bool:
    return read_state(run.archive).get("finished", False) and (run.archive / "summary.json").exists()


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


def final_distance(run_dir: Path, networks: int) -> dict | None:
    """How far apart the networks of a finished run end: the mean over layers of
    ``||W_peer - W_self|| / ||W_self||`` (``core.peer_distances``, which the training logs at each
    graft) between each network and its ring peer, on the last epoch's checkpoints, averaged over
    the networks. Near 0, the networks have become one network and an ensemble of them gains
    nothing. None with fewer than 2 networks, or without every network's last checkpoint."""
    from . import checkpoint
    from .core import make_plan, peer_distances

    finals = [files[-1] for files in (checkpoint.epoch_files(run_dir, k) for k in range(networks)) if files]
    if networks < 2 or len(finals) < networks or len({epoch for epoch, _ in finals}) > 1:
        return None
    states = [checkpoint.load(path) for _, path in finals]
    models = [state["model"] for state in states]
    # The layers as training grouped them (module_plan), found from the state dict alone: the same
    # for every model whose normalization layers keep running statistics.
    layers = make_plan(models[0], (states[0].get("setup") or {}).get("grafting.compat", "default")).layers
    per_network = [peer_distances(models[k], models[k - 1], layers).mean().item() for k in range(networks)]
    return {"final_distance": sum(per_network) / networks, "per_network": per_network,
            "epoch": finals[0][0], "layers": len(layers)}


def write_distance(run: Run) -> None:
    """weights.json in the archive of a finished run, from its checkpoints where they still are
    (also for runs archived before weights.json existed); nothing when they are gone."""
    from .checkpoint import CheckpointError

    if (run.archive / "weights.json").exists() or not finished(run):
        return
    try:
        record = final_distance(run.dir, run.arm.networks)
    except CheckpointError as e:  # the run itself is fine; the report shows no distance for it
        print(f"graft-study: warning: {run.label}: no weights.json: {e}", file=sys.stderr)
        return
    if record is not None:
        write_json(run.archive / "weights.json", record)


def archive(run: Run) -> None:
    """Copy a finished run's small files to its archive (the study.json last: it marks it done)."""
    run.archive.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED:
        shutil.copyfile(run.dir / name, run.archive / f".{name}.tmp")
        os.replace(run.archive / f".{name}.tmp", run.archive / name)


def code_version(results: str | Path | None = None, repo: Path | None = None) -> dict:
    """The git commit of the code that runs (``repo``: graft's own checkout), and whether its
    tracked files had changes. Files under ``results`` do not count: the study rewrites its own
    report there after every run."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=repo or Path(__file__).resolve().parent).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        changed = git("diff", "--name-only", "HEAD").splitlines()  # tracked files, staged or not
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    if results is not None:
        out = Path(results).resolve()
        changed = [p for p in changed if not (top / p).is_relative_to(out)]
    return {"commit": commit, "dirty": bool(changed)}


def run_one(plan: Plan, run: Run, extra=()) -> int:
    """One run, resumed if it was interrupted; its output goes to the terminal and to log.txt."""
    from .engine import machine_name  # torch: imported when a run starts, not for --dry-run or a plan error

    state = read_state(run.dir)
    state["attempts"].append({**code_version(plan.results), "machine": machine_name(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_state(run, state)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(run.dir / "log.txt", "a") as logfile:
        proc = subprocess.Popen(command(plan, run, extra=extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        try:
            for line in proc.stdout:
                logfile.write(line)
                logfile.flush()
                print(f"  {line.rstrip()}")
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the training stops between steps, the checkpoint stays
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        finally:
            state["wall_seconds"] += time.monotonic() - start
            state["finished"] = proc.poll() == 0 and (run.dir / "summary.json").exists()
            write_state(run, state)
    if state["finished"]:
        archive(run)
        write_distance(run)
    return code


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def study(plan: Plan, args) -> int:
    """What graft-study does with a plan it has read: dry run, report, or the runs left."""
    from .study_report import write_report

    runs = all_runs = runs_of(plan)
    if args.only:
        patterns = args.only.split(",")
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.arm.name, p) for p in patterns)]
        if not runs:
            print(f"graft-study: error: --only {args.only}: no arm matches (arms: "
                  f"{', '.join(a.name for a in plan.arms)})", file=sys.stderr)
            return 2
    left = [r for r in runs if not finished(r)]
    if args.dry_run:
        for r in left:
            print(f"# {r.label}" + (" (resumes)" if (r.dir / "checkpoints").exists() else ""))
            print(shlex.join(command(plan, r, "python", args.overrides)))
        return 0
    if args.report:
        for r in all_runs:
            write_distance(r)
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
            code = run_one(plan, run, args.overrides)
        except KeyboardInterrupt:
            print(f"interrupted: {run.label} stopped; the same command resumes it after its last finished epoch")
            return 130
        if code != 0 or not finished(run):
            why = f"exit {code}" if code != 0 else f"exit 0, but no {run.dir / 'summary.json'}"
            print(f"graft-study: error: {run.label} failed ({why}); see {run.dir / 'log.txt'}. "
                  "Fix the cause and run the same command to resume.", file=sys.stderr)
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
                        help="only rewrite the report from the finished runs (and add weights.json to those "
                        "archived without it whose checkpoints are still under the root)")
    parser.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: all)")
    parser.add_argument("--root", help="where the runs go (default: the plan's root, runs/studies)")
    parser.add_argument("--results", help="where the report goes (default: the plan's results, results/)")
    parser.add_argument("--only", help="comma-separated arm names or patterns (e.g. 'resnet32_*'): run only these")
    parser.add_argument("overrides", nargs="*", help="key=value added to every run, e.g. data.root=... "
                        "(give the same ones when continuing: a run resumes only with the settings it started with)")
    args = parser.parse_intermixed_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, into a file too
    signal.signal(signal.SIGTERM, _terminate)  # stop the run in hand as Ctrl-C does

    try:
        plan = load_plan(args.plan, args.overrides)
        plan.root, plan.results = args.root or plan.root, args.results or plan.results
        return study(plan, args)
    except ConfigError as e:  # a bad plan, override or archived file
        print(f"graft-study: error: {e}", file=sys.stderr)
        return 2


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
