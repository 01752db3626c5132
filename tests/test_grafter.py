"""graft.Grafter in a script of one's own (torchrun, CPU, gloo), the example, and the launcher
with a model given as "package.module:callable"."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import graft
from graft import core, dist
from graft.errors import GraftError
from graft.grafter import unwrap
from helpers import ROOT, env, torchrun
from workers.grafter_worker import Freely, make_model

WORKER = ROOT / "tests" / "workers" / "grafter_worker.py"


def run_worker(tmp_path, nproc, mode):
    proc = torchrun(nproc, WORKER, tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def assert_grafted(after, own, peer, plan):
    """The grafted weights are graft_state_dict of the two pre-graft states, bit for bit."""
    expected, _ = graft.graft_state_dict(own, peer, plan=plan)
    assert after.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------ without torchrun

def test_layers_are_grouped_by_module_type_not_by_name():
    model = Freely()
    plan = core.module_plan(model)
    assert plan.layers == ("entry.weight", "squeeze.weight", "widen.weight", "readout.weight")
    for norm, conv in (("entry_scale", "entry"), ("squash", "squeeze"), ("groups", "widen")):
        assert plan.follows[f"{norm}.weight"] == plan.follows[f"{norm}.bias"] == f"{conv}.weight"
    assert plan.follows["squeeze.bias"] == "squeeze.weight" and plan.follows["readout.bias"] == "readout.weight"
    assert plan.bn_after["squeeze.weight"] == "squash" and plan.next_conv["squash"] == "widen.weight"
    # From key names alone a norm without running statistics, or a GroupNorm, is a layer of its own.
    by_keys = core.make_plan(model.state_dict())
    assert "squash.weight" in by_keys.layers and "groups.weight" in by_keys.layers


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg16_bn", "wrn16_2", "tv:resnet18"])
def test_module_plan_of_the_built_in_models_is_the_key_plan(name):
    from graft.models import build_model

    model = build_model(name, 10)
    a, b = core.module_plan(model), core.make_plan(model.state_dict())
    assert (a.layers, a.follows, a.bn_after, a.next_conv) == (b.layers, b.follows, b.bn_after, b.next_conv)


def test_a_model_with_nothing_to_graft_is_refused_in_one_line():
    for model in (nn.Module(), nn.Sequential(nn.ReLU())):
        with pytest.raises(GraftError, match="^Grafter: model: no floating-point tensor to graft"):
            graft.Grafter(topology=dist.Topology()).plan(model)


def test_complex_weights_are_refused_not_skipped():
    model = nn.Linear(3, 2)
    model.register_parameter("phase", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(GraftError, match=r"^Grafter: model: 'phase' holds complex values"):
        graft.Grafter(topology=dist.Topology()).plan(model)
    only_ints = nn.Module()
    only_ints.register_buffer("count", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(GraftError, match="no floating-point tensor"):
        graft.Grafter(topology=dist.Topology()).plan(only_ints)


def test_blended_weights_load_with_module_metadata():
    """MNASNet reads its version from the state dict's metadata when loading: a blend rebuilt
    without it failed ('version should be set to 1 or 2 instead of None')."""
    import torchvision

    from graft.grafter import load_blended

    model = torchvision.models.mnasnet0_5(weights=None)
    state = model.state_dict()
    load_blended(model, state, {k: v.clone() for k, v in state.items()})
    with pytest.raises(ValueError, match="version should be set"):
        model.load_state_dict({k: v.clone() for k, v in state.items()})  # what the Grafter did before


def test_unwrap_reaches_the_weights_inside_compile_and_data_parallel():
    model = Freely()
    compiled = torch.compile(model)  # not run: unwrapping must not need a compiled step
    assert unwrap(compiled) is model and unwrap(nn.DataParallel(compiled)) is model
    assert core.module_plan(unwrap(compiled)).layers[0] == "entry.weight"  # no _orig_mod. prefix
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got OrderedDict"):
        unwrap(model.state_dict())


@pytest.mark.parametrize("options,message", [
    (dict(criterion="filters"), "criterion: must be one of entropy, reference, bn_scale, l1, constant"),
    (dict(level="filter"), r"level: replaced by criterion \(level='filter' is criterion='bn_scale'"),
    (dict(exchange="allgather"), "exchange must be one of"),
    (dict(A=2.0), r"A: must be in \[0, 1\]"),
    (dict(c=float("inf")), "c: must be a finite number; got inf"),
    (dict(A=float("nan")), "A: must be a finite number; got nan"),
    (dict(bins=1), "bins: must be >= 2"),
    (dict(every_steps=-1), "every_steps: must be >= 0"),
    (dict(rule="papa", alpha=0.5), "alpha: rule papa sets alpha=0.99; got 0.5"),
    (dict(criterion="reference", partner="population"), "criterion: 'reference' reproduces the official code"),
    (dict(timeout=float("inf")), "timeout must be a finite number of seconds > 0"),
    (dict(epochs=0), "epochs must be None or an integer >= 1"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=f"^Grafter: {message}"):
        graft.Grafter(**options)


def test_one_process_has_no_partner_and_says_so(monkeypatch, caplog):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    grafter = graft.Grafter()
    model = make_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("WARNING", logger="graft"):
        assert grafter.graft(model) is None and grafter.graft(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    warnings = [r.getMessage() for r in caplog.records if "no partner" in r.getMessage()]
    assert len(warnings) == 1 and "world of one network" in warnings[0]  # once
    with pytest.raises(ValueError, match="every_steps=k"):
        grafter.step(model)


def test_the_last_epoch_is_not_grafted_and_an_extended_run_grafts_it_late(monkeypatch, caplog):
    """Grafter(epochs=E) skips the graft after epoch E-1, as graft's trainer does; its state in a
    checkpoint says so, and a longer run resumed from it owes that graft."""
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    grafter = graft.Grafter(epochs=3)
    calls = []
    monkeypatch.setattr(grafter, "_graft", lambda model, when: calls.append(when) or "done")
    model = make_model(0)
    assert [grafter.graft(model) for _ in range(3)] == ["done", "done", None]
    assert calls == ["epoch 1", "epoch 2"]
    past = graft.Grafter(epochs=2)
    with caplog.at_level("WARNING", logger="graft"):
        assert past.graft(model, epoch=4) is None
    assert "graft after epoch 5 of a run of epochs=2: nothing grafted" in caplog.text
    state = grafter.state_dict()
    assert (state["epoch"], state["grafted"], state["grafts"]) == (2, False, 0)
    longer = graft.Grafter(epochs=5)
    monkeypatch.setattr(longer, "_graft", lambda model, when: calls.append(when) or "late")
    longer.load_state_dict(state)
    assert longer.resume(model) == "late" and calls[-1] == "epoch 3" and longer.resume(model) is None
    same = graft.Grafter(epochs=3)
    same.load_state_dict(state)
    assert same.resume(model) is None  # the run is as long as before: nothing owed
    # A checkpoint written before its epoch's graft, loaded without the Grafter's state (timm's
    # saver keeps none): resume(epoch=...) does that graft, once.
    fresh = graft.Grafter(epochs=5)
    monkeypatch.setattr(fresh, "_graft", lambda model, when: calls.append(when) or "owed")
    assert fresh.resume(model, epoch=1) == "owed" and calls[-1] == "epoch 2" and fresh.resume(model, epoch=1) is None
    with pytest.raises(GraftError, match=r"other settings \(A: 0.3 here, 0.4 there"):
        graft.Grafter(A=0.3).load_state_dict(state)
    # A run bounded by steps, not epochs: graft(last=True) skips, and a resumed longer run owes it.
    steps = graft.Grafter()
    monkeypatch.setattr(steps, "_graft", lambda model, when: calls.append(when) or "done")
    assert steps.graft(model) == "done" and steps.graft(model, last=True) is None and calls[-1] == "epoch 1"
    assert steps.resume(model) == "done" and calls[-1] == "epoch 2"


# ------------------------------------------------------------------------------ under torchrun

@pytest.mark.parametrize("nproc,mode", [(2, "own"), (3, "joined")])
def test_grafter_blends_each_network_with_the_previous_one(tmp_path, nproc, mode):
    outs = run_worker(tmp_path, nproc, mode)
    for k, out in enumerate(outs):
        peer = outs[(k - 1) % nproc]
        assert out["peer"] == (k - 1) % nproc
        assert out["network_group"] == 1  # never the world: DDP given it cannot span networks
        assert_grafted(out["after"], out["before"], peer["before"], core.module_plan(Freely()))
        assert out["bytes"] == sum(t.numel() * t.element_size() for t in out["before"].values())
        layers = [r["layer"] for r in out["records"]]
        assert layers == list(out["plan"].layers) == ["entry.weight", "squeeze.weight", "widen.weight",
                                                      "readout.weight"]
        for r, theirs in zip(out["records"], peer["records"]):
            own_w, peer_w = out["before"][r["layer"]], peer["before"][r["layer"]]
            assert r["entropy_self"] == pytest.approx(core.weight_entropy(own_w).item())
            assert r["entropy_peer"] == theirs["entropy_self"]
            assert r["alpha"] == pytest.approx(core.adaptive_weight(r["entropy_self"], r["entropy_peer"]))
            assert r["peer_distance"] == pytest.approx(((peer_w - own_w).norm() / own_w.norm()).item())
        assert out["mean_alpha"] == pytest.approx(sum(r["alpha"] for r in out["records"]) / 4)
        assert out["mean_peer_distance"] == pytest.approx(sum(r["peer_distance"] for r in out["records"]) / 4)


def test_grafter_in_hybrid_mode_two_networks_by_two_ddp_replicas(tmp_path):
    outs = run_worker(tmp_path, 4, "hybrid")
    assert [(o["network"], o["replica"]) for o in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for a, b in ((0, 1), (2, 3)):  # replicas end identical
        assert all(torch.equal(outs[a]["after"][k], outs[b]["after"][k]) for k in outs[a]["after"])
    plan = core.module_plan(Freely())
    assert_grafted(outs[2]["after"], outs[2]["before"], outs[0]["before"], plan)
    assert_grafted(outs[1]["after"], outs[0]["before"], outs[2]["before"], plan)
    assert outs[1]["records"] == [] and outs[1]["mean_alpha"] is None  # the report is the leader's


def test_grafter_every_k_optimizer_steps(tmp_path):
    outs = run_worker(tmp_path, 2, "steps")
    plan = core.module_plan(Freely())
    for k, out in enumerate(outs):
        assert [s["grafted"] for s in out["log"]] == [False, True, False, True, False]
        for i, step in enumerate(out["log"]):
            if step["grafted"]:
                assert_grafted(step["after"], step["before"], outs[1 - k]["log"][i]["before"], plan)
            else:
                assert all(torch.equal(step["before"][key], v) for key, v in step["after"].items())


@pytest.mark.parametrize("mode", ["mismatch", "extra_layer"])
def test_networks_of_other_architectures_are_refused_before_blending(tmp_path, mode):
    proc = torchrun(2, WORKER, tmp_path, mode)
    assert proc.returncode != 0
    differs = {"mismatch": "'readout.weight': shape (3, 8) in network 0, (4, 8) in network 1",
               "extra_layer": "'extra.weight' only in network 1"}[mode]
    assert (f"epoch 1: network 1 holds a model with other keys, shapes or dtypes than network 0's ({differs}"
            in proc.stderr), proc.stderr[-3000:]
    assert "network 0 holds" not in proc.stderr  # worded against network 0 on every rank alike


# ------------------------------------------------------------------------------ example, launcher

def test_the_example_trains_and_grafts_two_networks():
    proc = subprocess.run([sys.executable, "-m", "graft.launch", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "examples" / "own_loop.py"), "3", "{network}"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The two processes share stdout: their lines may interleave.
    lines = re.findall(r"seed (\d) epoch (\d): test accuracy [\d.]+%; grafted from network (\d), "
                       r"mean alpha (0\.\d+)", proc.stdout)
    assert sorted(line[:3] for line in lines) == [("0", "1", "1"), ("0", "2", "1"), ("1", "1", "0"), ("1", "2", "0")]
    assert all(0.3 <= float(line[3]) <= 0.7 for line in lines)  # A = 0.4: alpha in (0.3, 0.7)
    assert proc.stdout.count("not grafted (the last epoch)") == 2
    assert len(open(ROOT / "examples" / "own_loop.py").read().splitlines()) <= 65


def test_the_launcher_trains_a_model_given_as_module_and_callable(tmp_path):
    out = tmp_path / "run"
    common = ["-m", "graft.train", "--config", ROOT / "configs" / "quickstart.yaml", "epochs=2", "batch_size=50",
              "data.train_subset=300", "data.test_subset=200", f"data.cache_dir={tmp_path / 'cache'}",
              "progress=false"]
    proc = torchrun(2, *common, "model=examples.own_loop:Net", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if r["epoch"] == 0]
    assert [r["layer"] for r in first[0]["graft"]] == ["stem.weight", "body.weight", "head.weight"]
    for r in first:
        distances = [layer["peer_distance"] for layer in r["graft"]]
        assert all(d > 0 and math.isfinite(d) for d in distances)
        assert r["mean_peer_distance"] == pytest.approx(sum(distances) / len(distances))
    assert " dist " in proc.stdout  # the epoch table's column

    proc = torchrun(1, *common, "model=examples.own_loop:Nett", f"output_dir={tmp_path / 'bad'}")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
    assert errors == ["graft: error: model: module 'examples.own_loop' has no attribute 'Nett'"]
    assert "Traceback" not in proc.stderr.split("graft: error")[0]  # (torchrun's own report comes after)
