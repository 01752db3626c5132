"""The graft step under torchrun (CPU, gloo, tiny models): order, table identity, blend, partners,
hybrid mode, refusals, a dead peer."""

import subprocess
import sys
import time

import pytest
import torch

from graft import core
from graft.rules import graft_state_dict
from helpers import ROOT, env, free_port, torchrun

WORKER = ROOT / "tests" / "workers" / "exchange_worker.py"


def run_ring(tmp_path, nproc, replicas=1, exchange="auto", *settings):
    proc = torchrun(nproc, WORKER, tmp_path, replicas, exchange, *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nproc)], proc


@pytest.mark.parametrize("nproc,exchange", [(2, "auto"), (3, "auto"), (3, "all_gather")])
def test_ring_grafts_from_previous_network(tmp_path, nproc, exchange):
    outs, proc = run_ring(tmp_path, nproc, exchange=exchange)
    for k, out in enumerate(outs):
        peer = outs[(k - 1) % nproc]
        assert out["peer"] == (k - 1) % nproc
        # The table every network sees: row j is network j's own entropies.
        plan = core.make_plan(out["before"])
        torch.testing.assert_close(out["table"][k], core.plan_entropies(out["before"], plan))
        torch.testing.assert_close(out["table"], outs[0]["table"])
        # entropy_peer of network k equals entropy_self of network k-1, layer by layer.
        for mine, theirs in zip(out["records"], peer["records"]):
            assert mine["entropy_peer"] == theirs["entropy_self"]
        # The blend equals graft_state_dict applied to the two pre-graft states.
        expected, _ = graft_state_dict(out["before"], peer["before"])
        for key in expected:
            torch.testing.assert_close(out["after"][key], expected[key], rtol=0, atol=0)
        model_bytes = sum(t.numel() * t.element_size() for t in out["before"].values())
        hops = nproc - 1 if exchange == "all_gather" else 1
        assert out["bytes"] == hops * model_bytes


def test_two_networks_end_identical(tmp_path):
    outs, _ = run_ring(tmp_path, 2)
    for key in outs[0]["after"]:
        assert torch.equal(outs[0]["after"][key], outs[1]["after"][key]), key


def test_filter_level_over_the_ring(tmp_path):
    outs, _ = run_ring(tmp_path, 2, 1, "auto", "criterion=bn_scale")
    expected, _ = graft_state_dict(outs[1]["before"], outs[0]["before"], criterion="bn_scale")
    for key in expected:
        torch.testing.assert_close(outs[1]["after"][key], expected[key], rtol=0, atol=0)


def test_hybrid_two_networks_by_two_replicas(tmp_path):
    outs, _ = run_ring(tmp_path, 4, replicas=2)
    assert [o["network"] for o in outs] == [0, 0, 1, 1]
    for a, b in ((0, 1), (2, 3)):
        for key in outs[a]["after"]:
            assert torch.equal(outs[a]["after"][key], outs[b]["after"][key]), key
    expected, _ = graft_state_dict(outs[2]["before"], outs[0]["before"])
    for key in expected:
        torch.testing.assert_close(outs[3]["after"][key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("nproc", [2, 3])
def test_population_partner_blends_toward_the_mean_of_every_network(tmp_path, nproc):
    """PAPA's pull, restated: w <- alpha w + (1 - alpha) mean(w_0 .. w_{N-1}), floating tensors only."""
    outs, _ = run_ring(tmp_path, nproc, 1, "auto", "rule=papa")
    keys = [k for k, t in outs[0]["before"].items() if t.is_floating_point()]
    mean = {k: sum(o["before"][k] for o in outs) / nproc for k in keys}
    for out in outs:
        assert out["peer"] is None
        for key, own in out["before"].items():
            want = 0.99 * own + 0.01 * mean[key] if key in mean else own
            torch.testing.assert_close(out["after"][key], want, rtol=1e-6, atol=1e-7)
        model_bytes = sum(t.numel() * t.element_size() for t in out["before"].values() if t.is_floating_point())
        assert out["bytes"] == 2 * model_bytes


@pytest.mark.parametrize("differ, named", [("1", "A: "), ("bins:50", "bins: "), ("criterion:l1", "criterion: "),
                                           ("criterion:reference", "criterion: ")])  # another plan too
def test_networks_with_other_settings_are_refused_naming_the_setting(tmp_path, differ, named):
    proc = torchrun(2, WORKER, tmp_path, 1, "auto", f"differ={differ}", "named")
    assert proc.returncode != 0
    errors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["error"] for r in range(2)]
    assert errors[0] == errors[1], errors  # worded from what both gathered: one line, said once
    assert f": network 1 grafts with other settings than network 0 ({named}" in errors[0], errors[0]
    assert " in network 0, " in errors[0] and "every network must graft with the same settings" in errors[0]


def test_networks_with_another_exchange_are_refused_naming_both(tmp_path):
    proc = torchrun(2, WORKER, tmp_path, 1, "auto", "differ=exchange:all_gather")
    assert proc.returncode != 0
    errors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["error"] for r in range(2)]
    assert errors[0] == errors[1] == ("epoch 0: network 1 holds another exchange than network 0 (grafting.exchange: "
                                      "'ring' in network 0, 'all_gather' in network 1)"), errors


def test_nan_in_one_network_stops_every_network_unpoisoned(tmp_path):
    proc = torchrun(3, WORKER, tmp_path, 1, "auto", "nan")
    assert proc.returncode != 0
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    for r, out in enumerate(outs):
        assert "NaN or Inf weights in network 1 (layer '3.weight'); nobody grafts" in out["error"], out["error"]
        assert all(t.isfinite().all() for k, t in out["state"].items() if t.is_floating_point()) == (r != 1)


def test_nan_in_hybrid_mode_stops_the_replicas_too(tmp_path):
    proc = torchrun(4, WORKER, tmp_path, 2, "auto", "nan")  # 2 networks x 2 replicas
    assert proc.returncode != 0
    errors = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["error"] for r in range(4)]
    assert all("NaN or Inf weights in network 1" in e for e in errors[0::2])  # the leaders
    assert "rank 0 refused to graft" in errors[1] and "rank 2 refused to graft" in errors[3]  # their replicas


def test_dead_peer_is_named_within_the_timeout(tmp_path):
    port = free_port()
    procs = []
    for rank in range(3):
        e = env()
        e.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers" / "dead_peer_worker.py"), "5"],
                                      env=e, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    start = time.monotonic()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    elapsed = time.monotonic() - start
    assert results[1][0] == 9
    for code, err in (results[0], results[2]):
        assert code == 1, err
        assert "network 1 (rank 1) did not arrive" in err
    assert elapsed < 60


def test_dead_peer_during_training_is_named_by_the_launcher(tmp_path):
    """Without torchrun's agent (which would stop the others itself): rank 1 is killed while
    training; rank 0 names it at the end of the epoch instead of failing inside a collective."""
    port, out = free_port(), tmp_path / "run"
    procs = []
    for rank in range(2):
        e = env()
        e.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "graft.train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
             f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "model=resnet8", "epochs=20",
             "batch_size=50", "data.train_subset=400", "data.test_subset=100", "progress=false", "timeout=5"],
            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].kill()  # after epoch 0's records: rank 1 was training epoch 1
    start = time.monotonic()
    code, err = procs[0].wait(timeout=120), procs[0].stderr.read()
    procs[1].wait()
    assert code == 1 and time.monotonic() - start < 60
    assert "graft: error: rank 0: network 1 (rank 1) did not arrive at epoch 2 trained within 5 s" in err
    assert "Traceback" not in err


def test_the_first_layout_difference_is_named():
    """Another architecture is refused naming where it differs first, against network 0."""
    from graft.core import layout_difference

    a = [("conv.weight", (8, 3, 3, 3), "torch.float32"), ("fc.weight", (10, 8), "torch.float32")]
    names = ("network 0", "network 2")
    assert layout_difference(a, [a[0], ("head.weight", (10, 8), "torch.float32")], names) == \
        "key #1: 'fc.weight' in network 0, 'head.weight' in network 2"
    assert layout_difference(a, [a[0], ("fc.weight", (100, 8), "torch.float32")], names) == \
        "'fc.weight': shape (10, 8) in network 0, (100, 8) in network 2"
    assert layout_difference(a, [a[0], ("fc.weight", (10, 8), "torch.float16")], names) == \
        "'fc.weight': dtype torch.float32 in network 0, torch.float16 in network 2"
    assert layout_difference(a, a[:1], names) == "'fc.weight' only in network 0"
    assert layout_difference(a[:1], a, names) == "'fc.weight' only in network 2"
    assert layout_difference(a, list(a), names) is None
