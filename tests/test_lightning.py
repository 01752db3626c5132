"""graft.lightning.GraftCallback with a real Lightning Trainer on the CPU, under graft-run."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning")

from graft import core  # noqa: E402
from graft.rules import graft_state_dict  # noqa: E402
from helpers import ROOT, env  # noqa: E402
from workers.lightning_script import make_model  # noqa: E402

SCRIPT = ROOT / "tests" / "workers" / "lightning_script.py"


def run(tmp_path, name, epochs, ckpt=None):
    args = [str(tmp_path / name / "net{network}"), "{network}", str(epochs)]
    if ckpt:
        args.append(str(tmp_path / name / "net{network}" / ckpt))
    proc = subprocess.run([sys.executable, "-m", "graft.launch", "--standalone", "--nproc_per_node=2", str(SCRIPT),
                           *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / name / f"net{k}" / f"log{'-resumed' if ckpt else ''}.pt", weights_only=False)
            for k in range(2)]


def test_the_callback_grafts_after_validation_and_not_after_the_last_epoch(tmp_path):
    logs = run(tmp_path, "whole", 3)
    plan = core.module_plan(make_model())
    for k, log in enumerate(logs):
        order = [entry[:2] for entry in log["log"]]
        assert order == [(what, e) for e in range(3) for what in ("validated", "before", "after", "epoch end")]
        before = {e: s for what, e, *rest in log["log"] if what == "before" for s in rest}
        after = {e: s for what, e, *rest in log["log"] if what == "after" for s in rest}
        theirs = {e: s for what, e, *rest in logs[1 - k]["log"] if what == "before" for s in rest}
        for e in (0, 1):
            expected, _ = graft_state_dict(before[e], theirs[e], plan=plan)
            assert all(torch.equal(after[e][x], expected[x]) for x in expected)
        assert all(torch.equal(after[2][x], before[2][x]) for x in before[2])  # the last epoch: no graft


def test_a_run_bounded_by_max_steps_is_not_grafted_after_its_last_partial_epoch(tmp_path):
    logs = run(tmp_path, "steps", "steps=9")  # 6 steps per epoch: epoch 2 ends after 3 of them
    for log in logs:
        assert [entry[:2] for entry in log["log"] if entry[0] == "after"] == [("after", 0), ("after", 1)]
        before, after = ({e: s for what, e, *rest in log["log"] if what == w for s in rest}
                         for w in ("before", "after"))
        assert any(not torch.equal(after[0][x], before[0][x]) for x in before[0])  # epoch 1: grafted
        assert all(torch.equal(after[1][x], before[1][x]) for x in before[1])  # the last, partial epoch: not


def test_a_run_resumed_from_lightnings_checkpoint_grafts_as_an_uninterrupted_one(tmp_path):
    """Lightning's checkpoint is written after validation, before the epoch's graft: the resumed
    run does that graft first, and ends with the weights of a run never stopped."""
    whole = run(tmp_path, "whole", 3)
    run(tmp_path, "cut", 2)  # ends after epoch 2, ungrafted, as the last epoch of a 2-epoch run
    resumed = run(tmp_path, "cut", 3, ckpt="last.ckpt")
    for w, r in zip(whole, resumed):
        assert all(torch.equal(w["final"][x], r["final"][x]) for x in w["final"])
