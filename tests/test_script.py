"""graft-run SCRIPT.py: any training script, two added lines, each network a torch.distributed
world of its own (CPU, gloo). The script (tests/workers/own_script.py) does what torchvision's
and timm's reference scripts do with torch.distributed and knows nothing else of graft."""

import re
import subprocess
import sys

import pytest
import torch

from graft import core
from graft.rules import graft_state_dict
from helpers import ROOT, env, torchrun
from workers.own_script import make_model

SCRIPT = ROOT / "tests" / "workers" / "own_script.py"


def run_script(tmp_path, nproc, *args, data_parallel=None, seed="{network}", name="out", timeout=300, extra_env=None):
    launcher = ["--standalone", f"--nproc_per_node={nproc}"]
    launcher += [f"--data-parallel={data_parallel}"] if data_parallel else []
    cmd = [sys.executable, "-m", "graft.launch", *launcher, str(SCRIPT),
           "--output", str(tmp_path / name / "net{network}"), "--seed", seed, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def logs(tmp_path, networks=2, name="out"):
    return [torch.load(tmp_path / name / f"net{k}" / "log.pt", weights_only=False) for k in range(networks)]


def assert_grafted_exactly(logs_):
    """Each graft is graft_state_dict of the two networks' pre-graft states, bit for bit, and the
    networks differed before it."""
    plan = core.module_plan(make_model())
    n = len(logs_)
    for k, log in enumerate(logs_):
        peer = logs_[(k - 1) % n]
        for mine, theirs in zip(log["epochs"], peer["epochs"]):
            if mine["peer"] is None:  # the last epoch: not grafted
                assert all(torch.equal(mine["before"][x], mine["after"][x]) for x in mine["before"])
                continue
            assert mine["peer"] == (k - 1) % n and mine["distance"] > 0
            assert any(not torch.equal(mine["before"][x], theirs["before"][x]) for x in plan.layers)
            expected, _ = graft_state_dict(mine["before"], theirs["before"], plan=plan)
            for key in expected:
                assert torch.equal(mine["after"][key], expected[key]), key


@pytest.mark.parametrize("nproc,replicas", [(2, 1), (4, 2)], ids=["2x1", "2x2"])
def test_each_network_is_a_world_of_its_own(tmp_path, nproc, replicas):
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}  # graft-run inside an srun step
    proc = run_script(tmp_path, nproc, data_parallel=replicas if replicas > 1 else None, extra_env=slurm)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs_ = logs(tmp_path)
    for k, log in enumerate(logs_):
        e = log["env"]
        assert (e["GRAFT_NETWORK"], e["GRAFT_NETWORKS"], e["GRAFT_REPLICAS"]) == (str(k), "2", str(replicas))
        if replicas == 1:  # as if started alone with python: no torch.distributed world at all
            assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(e)
        else:  # the network's replicas, with a rendezvous of their own
            assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) == ("0", "2", "0")
        assert "SLURM_PROCID" not in e["all"] and "SLURM_NTASKS" not in e["all"] and "SLURM_JOB_ID" in e["all"]
        for epoch in log["epochs"]:
            assert epoch["seen"] == list(range(48))  # the sampler covers the whole data set in each network
            assert epoch["samples"] == 48  # the all-reduced metric counts this network's replicas only
        assert (tmp_path / "out" / f"net{k}" / "checkpoint.pt").exists()  # rank-0 saving, per network
    assert logs_[0]["env"]["GRAFT_STORE"] == logs_[1]["env"]["GRAFT_STORE"]
    if replicas > 1:
        assert logs_[0]["env"]["MASTER_PORT"] != logs_[1]["env"]["MASTER_PORT"]
        for k in range(2):  # the graft leaves a network's replicas identical (BN statistics included)
            for epoch in (0, 1):
                a, b = (torch.load(tmp_path / "out" / f"net{k}" / f"replica{r}-epoch{epoch}.pt") for r in (0, 1))
                assert all(torch.equal(a[x], b[x]) for x in a)
    assert_grafted_exactly(logs_)


def test_a_resumed_script_run_equals_an_uninterrupted_one(tmp_path):
    """A 2-epoch run extended to 3 with the script's own --resume: the graft its old last epoch
    skipped is done at the resume (Grafter.state_dict in the script's checkpoint), and the weights
    end as a 3-epoch run's, bit for bit."""
    assert run_script(tmp_path, 2, "--epochs", 3, name="whole").returncode == 0
    first = run_script(tmp_path, 2, "--epochs", 2, name="cut")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script(tmp_path, 2, "--epochs", 3, "--resume", name="cut")
    assert second.returncode == 0, second.stderr[-3000:]
    for whole, cut in zip(logs(tmp_path, name="whole"), logs(tmp_path, name="cut")):
        assert [e["peer"] is None for e in cut["epochs"]] == [False, True, True]  # as it was logged at the time
        final_whole, final_cut = whole["epochs"][-1]["after"], cut["epochs"][-1]["after"]
        assert all(torch.equal(final_whole[k], final_cut[k]) for k in final_whole)


def test_one_seed_for_every_network_is_not_a_silent_no_op(tmp_path):
    """Both networks seeded alike (a script's seed + rank, with rank 0 in every network): they stay
    bit-identical and every graft changes nothing. It is said, once, with the likely causes."""
    proc = run_script(tmp_path, 2, seed="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "bit-identical" in line]
    assert len(warnings) == 2  # once per network, not once per graft
    assert "graft.network_seed(seed, network)" in warnings[0]


def test_a_missing_script_and_a_bad_split_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graft.launch", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "nope.py")], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2 and f"{tmp_path / 'nope.py'}: no such training script" in proc.stderr
    proc = run_script(tmp_path, 3, data_parallel=2, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [  # every rank finds it: one line, whichever rank failed first
        "graft: error: 3 processes do not split into networks of --data-parallel 2: start networks x 2 processes"]
    assert "Traceback" not in proc.stderr


def test_a_second_grafter_in_the_same_script_grafts_too(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graft.launch", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "workers" / "two_grafters.py"), "{network}"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The two processes share stdout: their lines may interleave.
    found = re.findall(r"network (\d) phase (\d) distance (\d\.\d+)", proc.stdout)
    assert sorted(f[:2] for f in found) == sorted((str(k), str(p)) for k in (0, 1) for p in (1, 2) for _ in range(2))
    assert all(float(f[2]) > 0 for f in found)


def test_a_second_grafter_under_plain_torchrun_checks_in_on_keys_of_its_own():
    """Each Grafter there builds a Topology of its own on the one store: the second one's first
    check-in must not pass on the first one's keys while network 1 is gone."""
    proc = torchrun(2, ROOT / "tests" / "workers" / "two_grafters.py", "absent", timeout=120)
    assert "network 0 phase 2: rank 0: network 1 (rank 1) did not arrive" in proc.stdout, proc.stderr[-3000:]
