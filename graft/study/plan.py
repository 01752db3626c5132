"""A study's plan: the arms, seeds and base config of a multi-run experiment, read and checked
at once (every arm's config resolved), and the runs it names."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, UniqueKeyLoader, build, load_config
from ..data import DataError, check_data


@dataclass
class Arm:
    name: str = ""
    networks: int = 2             # networks; --nproc_per_node is this times the config's data_parallel
    config: str = ""              # this arm's own base config ("" = the plan's)
    overrides: list[str] = field(default_factory=list)
    # Set by load_plan from the resolved config; init=False keeps them out of the keys a plan may give.
    nproc: int = field(default=0, init=False)
    setup: dict = field(default_factory=dict, init=False)  # what its runs must train with (cfg.setup and epochs)


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


# Set by graft-study for each run: an override of one would make every seed the same run, or
# send a run where the study does not look for it.
RESERVED = {"seed": "the plan's seeds: list gives them", "output_dir": "each run goes to <root>/<name>/<arm>/seed<k>",
            "resume": "interrupted runs always resume (resume=auto)"}


def _check_overrides(overrides, where: str) -> None:
    """Refuse what graft-study sets itself, and a key given twice in one list (the last would win
    silently)."""
    seen = set()
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in RESERVED:
            raise ConfigError(f"{where}: {item}: graft-study sets {key} for each run ({RESERVED[key]})")
        if key in seen:
            raise ConfigError(f"{where}: {key} is given twice; give it once")
        seen.add(key)


# A study's and an arm's names are folders: no separators, no '..'.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_plan(path: str | Path, extra=(), data: bool = True) -> Plan:
    """Read and check a plan; every arm's config is resolved here, with ``extra`` (graft-study's
    own key=value arguments, which every run gets last), so a bad override fails now, naming the
    arm, and not hours later, and the process count follows an extra ``data_parallel``. ``data``:
    check that each arm's data is where it says (not for a dry run or a report, which read none)."""
    try:
        values = yaml.load(Path(path).read_text(), UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read plan: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a YAML plan") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    plan = build(Plan, values, str(path))
    _check_overrides(plan.overrides, f"{path}: overrides")
    _check_overrides(extra, "command line")
    if not NAME.fullmatch(plan.name or ""):
        raise ConfigError(f"{path}: name: {plan.name!r}: a study needs a name of letters, digits, '_', '-' and '.' "
                          "(it is a folder under the root and the results)")
    if not plan.arms:
        raise ConfigError(f"{path}: arms: at least one arm is required")
    if not plan.seeds or len(set(plan.seeds)) != len(plan.seeds) or any(s < 0 for s in plan.seeds):
        raise ConfigError(f"{path}: seeds: a list of distinct seeds >= 0 is required; got {plan.seeds}")
    names = [a.name for a in plan.arms]
    checked_data = []
    for arm in plan.arms:
        if not NAME.fullmatch(arm.name or "") or names.count(arm.name) > 1:
            raise ConfigError(f"{path}: arms: each arm needs a distinct name of letters, digits, '_', '-' and '.' "
                              f"(a folder of the study); got {arm.name!r}")
        if arm.networks < 1:
            raise ConfigError(f"{path}: arms: {arm.name}: networks must be >= 1; got {arm.networks}")
        _check_overrides(arm.overrides, f"{path}: arm {arm.name}: overrides")
        arm.config = arm.config or plan.config
        if not arm.config:
            raise ConfigError(f"{path}: config: a base config is required (for the plan or for arm {arm.name})")
        try:
            cfg = load_config(arm.config, [*plan.overrides, *arm.overrides, *extra])
            if data and cfg.data not in checked_data:  # now, not when the arm's first run starts hours later
                check_data(cfg.data)
                checked_data.append(cfg.data)
        except (ConfigError, DataError) as e:
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
    """The run's graft-run command (a failing run ends in its one error line); ``extra``
    overrides (from graft-study's command line) come last."""
    return [python, "-m", "graft.launch", "--standalone", f"--nproc_per_node={run.arm.nproc}",
            "--config", run.arm.config, *plan.overrides, *run.arm.overrides,
            f"seed={run.seed}", f"output_dir={run.dir}", "resume=auto", "progress=false", *extra]


