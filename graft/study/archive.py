"""A study's archive: the small files of each finished run (config, metrics, summary, the
runner's study.json and weights.json), from which the report is made and by which a run counts
as finished."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError, upgrade_setup
from .plan import Run

ARCHIVED = ("config.yaml", "metrics.jsonl", "summary.json", "study.json")


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


def final_weights(run_dir: Path, networks: int, thresholds=(0.1, 0.01)) -> dict | None:
    """What the last epoch's checkpoints of a finished run say about its networks together
    (weights.json), each network against its ring peer and averaged over the networks:

    - ``final_distance``: the mean over layers of ``||W_peer - W_self|| / ||W_self||``
      (``core.peer_distances``, which the training logs at each graft). Near 0, the networks have
      become one network and an ensemble of them gains nothing.
    - ``invalid_in_both``: per threshold, the invalid filters whose filter at the same position in
      the peer is invalid too (``core.invalid_in_both``): those a graft cannot revive.

    None with fewer than 2 networks, or without every network's last checkpoint."""
    from .. import checkpoint
    from ..core import invalid_in_both, make_plan, peer_distances

    finals = [files[-1] for files in (checkpoint.epoch_files(run_dir, k) for k in range(networks)) if files]
    if networks < 2 or len(finals) < networks or len({epoch for epoch, _ in finals}) > 1:
        return None
    states = [checkpoint.load(path) for _, path in finals]
    models = [state["model"] for state in states]
    # The layers as training grouped them (module_plan), found from the state dict alone: the same
    # for every model whose normalization layers keep running statistics.
    reference = upgrade_setup(states[0].get("setup") or {}).get("grafting.criterion") == "reference"
    layers = make_plan(models[0], "reference" if reference else "default").layers
    per_network = [peer_distances(models[k], models[k - 1], layers).mean().item() for k in range(networks)]
    both = [invalid_in_both(models[k], models[k - 1], thresholds) for k in range(networks)]
    return {"final_distance": sum(per_network) / networks, "per_network": per_network,
            "invalid_in_both": {str(t): sum(b[t] for b in both) / networks for t in both[0]},
            "invalid_in_both_per_network": [{str(t): n for t, n in b.items()} for b in both],
            "epoch": finals[0][0], "layers": len(layers)}


def write_weights(run: Run) -> None:
    """weights.json in the archive of a finished run, from its checkpoints where they still are
    (also for runs archived before weights.json, or its invalid-filter overlap, existed); an
    older weights.json stays when the checkpoints are gone."""
    from ..config import load_config
    from ..errors import CheckpointError

    path = run.archive / "weights.json"
    if not finished(run) or (path.exists() and "invalid_in_both" in read_json(path)):
        return
    try:
        thresholds = load_config(run.archive / "config.yaml").invalid_thresholds
        record = final_weights(run.dir, run.arm.networks, thresholds)
    except (CheckpointError, ConfigError) as e:  # the run itself is fine; the report shows no figure for it
        print(f"graft-study: warning: {run.label}: no new weights.json: {e}", file=sys.stderr)
        return
    if record is not None:
        write_json(path, record)


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


