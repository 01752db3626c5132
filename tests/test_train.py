"""End to end: torchrun on CPU, 2 tiny networks on a few hundred real CIFAR-10 images."""

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from graft import dist
from graft.config import ConfigError, load_config
from helpers import ROOT, torchrun

FIXTURE = ROOT / "tests" / "fixtures" / "cifar10_sample.tar.gz"
TIMING = {"images_per_sec", "train_seconds", "epoch_seconds", "graft_seconds"}


def train(tmp_path, nproc=2, *overrides, name="run"):
    out = tmp_path / name
    args = ["-m", "graft.train", "--config", ROOT / "configs" / "quickstart.yaml", f"output_dir={out}",
            "model=resnet8", "epochs=2", "batch_size=50", "data.train_subset=300", "data.test_subset=200",
            f"data.cache_dir={tmp_path / 'cache'}", "progress=false", *overrides]
    return torchrun(nproc, *args), out


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    first = train(tmp, 2, name="a")
    second = train(tmp, 2, name="b")
    return first, second


def test_run_writes_every_output(two_runs):
    (proc, out), _ = two_runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topology: 2 network(s) x 1 replica(s)" in proc.stdout
    assert "summary (test accuracy, %)" in proc.stdout
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["model"] == "resnet8"
    recs = records(out)
    assert sorted((r["epoch"], r["network"]) for r in recs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in recs:
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "ensemble_acc", "images_per_sec",
                    "epoch_seconds", "graft_seconds", "invalid_filters", "filters"):
            assert key in r, key
        assert r["filters"] > 0 and set(r["invalid_filters"]) == {"0.1", "0.01"}
    by = {(r["epoch"], r["network"]): r for r in recs}
    # Epoch 0 grafts; the last epoch does not.
    assert by[0, 0]["peer"] == 1 and by[0, 1]["peer"] == 0 and by[1, 0]["peer"] is None
    assert by[0, 0]["graft_bytes"] > 0 and by[1, 0]["graft_bytes"] == 0
    # Network k's entropy_peer equals network k-1's entropy_self, layer by layer.
    for k, peer in ((0, 1), (1, 0)):
        for mine, theirs in zip(by[0, k]["graft"], by[0, peer]["graft"]):
            assert mine["layer"] == theirs["layer"] and mine["entropy_peer"] == theirs["entropy_self"]
    # N = 2: alphas of the two networks sum to one, layer by layer.
    for a, b in zip(by[0, 0]["graft"], by[0, 1]["graft"]):
        assert a["alpha"] + b["alpha"] == pytest.approx(1.0)
    assert by[0, 0]["ensemble_acc"] == by[0, 1]["ensemble_acc"]
    assert by[0, 0]["lr"] == pytest.approx(by[0, 1]["lr"] / 2)  # difflr with N = 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["networks"]["0"]["final_acc"] == by[1, 0]["test_acc"]
    assert summary["networks"]["1"]["best_acc"] == max(by[0, 1]["test_acc"], by[1, 1]["test_acc"])
    assert summary["ensemble_final_acc"] == by[1, 0]["ensemble_acc"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    for k in (0, 1):
        ckpt = torch.load(out / "checkpoints" / f"net{k}" / "epoch0002.pt", weights_only=False)
        assert ckpt["network"] == k and ckpt["epoch"] == 1
        assert (out / "checkpoints" / f"net{k}" / "best.pt").exists()


def test_same_seed_same_metrics(two_runs):
    (p1, a), (p2, b) = two_runs
    assert p1.returncode == 0 and p2.returncode == 0

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]

    assert strip(records(a)) == strip(records(b))


def test_progress_bar_shows_loss_accuracy_and_rate(capsys):
    from graft.report import Progress

    progress = Progress(True, "net 0 epoch 1/1", total=4, every=2)
    for i, _ in enumerate(progress(range(4))):
        progress.step(torch.tensor(2.0 * (i + 1) * 10), torch.tensor(5 * (i + 1)), 10 * (i + 1))
    postfix = progress.bar.postfix
    progress.bar.close()
    assert "loss=2.000" in postfix and "acc=50.0%" in postfix and "img_s=" in postfix


def test_one_network_is_the_baseline(tmp_path):
    proc, out = train(tmp_path, 1, "epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline: no grafting (one network)" in proc.stdout
    assert [r["peer"] for r in records(out)] == [None]


def test_bf16_autocast_on_the_cpu(tmp_path):
    proc, out = train(tmp_path, 1, "epochs=1", "amp=bf16", "grafting.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = records(out)
    assert 0 < r["train_loss"] < 10 and 0 <= r["test_acc"] <= 100
    proc, _ = train(tmp_path, 1, "epochs=1", "amp=fp16", name="fp16")
    assert proc.returncode != 0 and "amp: fp16 needs CUDA; on the CPU use amp=bf16" in proc.stderr


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    proc, out = train(tmp_path, 1, "grafting.A=3")
    assert proc.returncode != 0
    assert "graft: error: command line: grafting.A: must be in [0, 1]; got 3.0" in proc.stderr
    assert "Traceback" not in proc.stderr.split("graft: error")[0][-2000:]
    assert not out.exists()


def test_folder_data_through_dataloader_workers(tmp_path):
    import tarfile

    root = tmp_path / "folder"
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    proc, out = train(tmp_path, 1, "epochs=1", "data.name=imagefolder", f"data.root={root}",
                      "data.in_memory=false", "data.workers=1", "data.image_size=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = records(out)
    assert rec["test_acc"] >= 0 and rec["images_per_sec"] > 0
    # graft-eval reads the same folders through the same loaders: the same accuracy.
    from graft.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(out / "checkpoints" / "net0" / "epoch0001.pt", "test")
    assert result["test_acc"] == rec["test_acc"] and result["images"] == 200  # data.test_subset=200
    with pytest.raises(ConfigError, match=r"--split val: .*config.yaml has data.val_fraction 0: this run held out no"):
        evaluate_checkpoint(out / "checkpoints" / "net0" / "epoch0001.pt", "val")
    with pytest.raises(ConfigError, match=r"epoch0001.pt: its weights do not fit model resnet20 with num_classes 10 "
                                          r"\(from .*config.yaml and the overrides\): Error\(s\) in loading"):
        evaluate_checkpoint(out / "checkpoints" / "net0" / "epoch0001.pt", "test", ["model=resnet20"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device cuda: no CUDA GPU here"):
            evaluate_checkpoint(out / "checkpoints" / "net0" / "epoch0001.pt", "test", device="cuda")
    with pytest.raises(ConfigError, match=r"--device tpu: expected auto, cpu, cuda or cuda:N"):
        evaluate_checkpoint(out / "checkpoints" / "net0" / "epoch0001.pt", "test", device="tpu")
    # A checkpoint copied out of its run: --config names the run's config.
    import shutil

    copy = tmp_path / "copies" / "of" / "run" / "weights.pt"
    copy.parent.mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "net0" / "epoch0001.pt", copy)
    with pytest.raises(ConfigError, match=rf"{tmp_path}/copies/config.yaml: not found; .* \(or give --config\)"):
        evaluate_checkpoint(copy, "test")
    assert evaluate_checkpoint(copy, "test", config=out / "config.yaml")["test_acc"] == rec["test_acc"]
    from graft.checkpoint import CheckpointError

    for payload, message in (({"format": "graft-checkpoint/2"}, "a graft checkpoint without model weights"),
                             ({"format": "graft-checkpoint/2", "model": [1, 2]}, "without model weights")):
        bad = out / "checkpoints" / "net0" / "bad.pt"
        torch.save(payload, bad)
        with pytest.raises(CheckpointError, match=message):
            evaluate_checkpoint(bad, "test")
    # An image the workers cannot decode: one line that names the file (PIL's own names none).
    damaged = sorted((root / "train").rglob("*.jpg"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    proc, _ = train(tmp_path, 1, "epochs=1", "data.name=imagefolder", f"data.root={root}", "data.in_memory=false",
                    "data.workers=1", "data.image_size=32", "data.train_subset=0", name="damaged")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("graft: error:")]
    assert len(lines) == 1 and f"data.root: cannot decode image {damaged}: " in lines[0], proc.stderr[-3000:]
    assert "Original Traceback" not in proc.stderr, proc.stderr[-3000:]  # torchrun adds its own below


def test_hybrid_mode_trains_two_networks_of_two_replicas(tmp_path):
    proc, out = train(tmp_path, 4, "data_parallel=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topology: 2 network(s) x 2 replica(s) = world 4" in proc.stdout
    recs = records(out)
    assert sorted((r["epoch"], r["network"]) for r in recs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["graft_bytes"] > 0 for r in recs if r["epoch"] == 0)


def test_selection_on_validation_and_the_test_set_once_at_the_end(tmp_path):
    from graft.evaluate import evaluate_checkpoint

    proc, out = train(tmp_path, 2, "epochs=3", "data.val_fraction=0.2", "data.eval_split=val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summary (validation accuracy, %)" in proc.stdout and "test accuracy, % (once, at the end)" in proc.stdout
    recs = records(out)
    assert all("val_acc" in r and "test_acc" not in r for r in recs)  # no test figure per epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "val" and set(summary["test"]["networks"]) == {"0", "1"}
    for k in (0, 1):
        mine = [r for r in recs if r["network"] == k]
        best_epoch = max(mine, key=lambda r: r["val_acc"])["epoch"]  # the first of equals, as training keeps
        result = summary["test"]["networks"][str(k)]
        assert result["best_val_epoch"] == best_epoch
        assert result["best_val_acc"] == max(r["val_acc"] for r in mine)
        best = out / "checkpoints" / f"net{k}" / "best.pt"
        assert torch.load(best, weights_only=False)["split"] == "val"
        # graft-eval on the saved weights gives the figures the run reported.
        overrides = [f"data.cache_dir={tmp_path / 'cache'}"]
        assert evaluate_checkpoint(best, "test", overrides)["test_acc"] == result["best_val_test_acc"]
        final = evaluate_checkpoint(out / "checkpoints" / f"net{k}" / "epoch0003.pt", "test", overrides)
        assert final["test_acc"] == result["final_test_acc"] and final["images"] == 200
        assert evaluate_checkpoint(best, "val", overrides)["val_acc"] == result["best_val_acc"]


def test_graft_eval_errors_name_the_file(tmp_path):
    import subprocess
    import sys

    from helpers import env

    missing = tmp_path / "run" / "checkpoints" / "net0" / "best.pt"
    proc = subprocess.run([sys.executable, "-m", "graft.evaluate", str(missing)], capture_output=True, text=True,
                          env=env(), cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith(
        f"graft-eval: error: {missing}: cannot read the checkpoint (No such file or directory)")


def test_graft_eval_refuses_a_device_this_machine_lacks_and_a_path_outside_a_run(tmp_path, monkeypatch):
    from graft.config import Config, save_config
    from graft.evaluate import config_of, evaluate_checkpoint

    weights = tmp_path / "run" / "checkpoints" / "net0" / "best.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"format": "graft-checkpoint/2", "model": {}}, weights)
    save_config(Config(), tmp_path / "run" / "config.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"--device cuda:9: this machine has 1 CUDA GPU\(s\), cuda:0 to cuda:0"):
        evaluate_checkpoint(weights, device="cuda:9")
    with pytest.raises(ConfigError, match=r"^/best.pt: not inside a run's checkpoints/netK/ folder: give --config"):
        config_of(Path("/best.pt"))


def test_a_stop_says_how_to_resume(tmp_path):
    """resume=never: the same command would start afresh beside the run, so the hint names its
    directory; before the first checkpoint there is nothing to resume, and the advice says so."""
    from graft import cli

    assert cli.resume_hint("runs/a", "auto") == "rerun the same command to resume"
    assert cli.resume_hint("runs/a-1", "never") == "to resume it, rerun with output_dir=runs/a-1 resume=auto"
    run = tmp_path / "run"
    assert cli.stop_message(15, str(run)) == ("received SIGTERM: stopped between steps; it stopped before its first "
                                              "checkpoint: nothing to resume")
    (run / "checkpoints" / "net0").mkdir(parents=True)
    (run / "checkpoints" / "net0" / "epoch0001.pt").write_bytes(b"")
    assert cli.stop_message(2, str(run), "never") == (
        f"received SIGINT: stopped between steps; the last complete checkpoint is intact; to resume it, rerun "
        f"with output_dir={run} resume=auto")


def test_resume_point_round_trips():
    """ResumePoint.load_state_dict(state_dict()) restores the weights, optimizer, schedule, RNGs,
    grafter and position: the next step after a restore is the step the saved run would have
    taken. The file loads as weights only."""
    from graft.checkpoint import ResumePoint
    from graft.grafter import Grafter
    from graft.models import build_model
    from graft.records import EpochRecord
    from graft.train import build_scheduler

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model=resnet8", "epochs=3"])

    def fresh(seed):
        torch.manual_seed(seed)
        model = build_model("resnet8", 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler, _ = build_scheduler(cfg, optimizer, steps_per_epoch=4)
        grafter = Grafter(epochs=3, topology=dist.Topology())
        return ResumePoint(model, optimizer, scheduler, None, grafter, torch.device("cpu"))

    def step(point):
        x = torch.randn(8, 3, 32, 32)  # draws from the RNG the state restores
        point.optimizer.zero_grad()
        point.model(x).square().mean().backward()
        point.optimizer.step()
        point.scheduler.step()

    a = fresh(0)
    for _ in range(3):
        step(a)
    a.epoch, a.best_acc, a.best_epoch, a.record = 0, 41.5, 0, EpochRecord(0, 0, acc=41.5)
    a.grafter.epoch, a.grafter.grafted = 0, False
    file = io.BytesIO()
    torch.save(a.state_dict(), file)  # through bytes, as a checkpoint: no tensor is shared with a

    def saved():
        return torch.load(io.BytesIO(file.getvalue()), weights_only=True)

    b = fresh(1)
    b.load_state_dict(saved())
    assert (b.epoch, b.grafted, b.best_acc, b.best_epoch, b.record) == (0, False, 41.5, 0, EpochRecord(0, 0, acc=41.5))
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    step(b)  # from the restored RNG state
    fresh(2).load_state_dict(saved())  # the RNGs as saved again, for a's step
    step(a)
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)
    assert b.state_dict().keys() == saved().keys()


def test_cpu_bf16_support_is_read_from_the_flags(tmp_path):
    from graft.engine import cpu_has_bf16

    (tmp_path / "avx2").write_text("flags\t\t: fpu sse2 avx2 fma\n")
    (tmp_path / "sapphire").write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_has_bf16(str(tmp_path / "avx2")) is False
    assert cpu_has_bf16(str(tmp_path / "sapphire")) is True
    assert cpu_has_bf16(str(tmp_path / "missing")) is None


def test_cpu_name_is_the_model_name_line(tmp_path):
    import platform

    from graft.engine import cpu_name

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t: avx2\n")
    assert cpu_name(str(tmp_path / "cpuinfo")) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_name(str(tmp_path / "missing")) == (platform.processor() or platform.machine())


def test_reference_mode_on_a_model_it_cannot_graft_is_refused_at_the_start():
    """The official code's key-name rule fails on VGG (no 'conv' keys): say so before training,
    not with a traceback at the end of the first epoch."""
    from graft.train import setup

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model=vgg11_bn", "grafting.criterion=reference",
                                                             "num_classes=10"])
    with pytest.raises(ConfigError, match=r"grafting.criterion: 'reference' \(the official code's\) needs a key "
                                          r"containing 'conv' before 'features.0.weight'.* \(model vgg11_bn\)"):
        setup(cfg, dist.Topology(rank=0, world=2), 10)


def test_nearby_seeds_share_no_network():
    """seed + network gave network 1 of seed s the initial weights of network 0 of seed s + 1."""
    from graft import network_seed

    seeds = {network_seed(s, k) for s in range(50) for k in range(8)}
    assert len(seeds) == 400 and all(0 <= x < 2**32 for x in seeds)


@pytest.mark.parametrize("rule", ["grafting.rule=papa", "grafting.criterion=l1"])
def test_other_rules_train_through_the_same_loop(tmp_path, rule):
    """PAPA grafts every 10 optimizer steps toward the population's mean (300 images in batches
    of 50: 6 steps an epoch, so grafts fall on steps 10 and 20, in epochs 2 and 4); l1 grafts at
    each epoch's end like the paper's rule, with L1 norms as scores."""
    proc, out = train(tmp_path, 2, rule, "epochs=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(out)
    by = {(r["epoch"], r["network"]): r for r in recs}
    if "papa" in rule:
        assert "grafting: rule papa: constant alpha 0.99, toward the population mean, every 10 optimizer steps" \
            in proc.stdout
        grafts = [by[e, 0]["grafts"] for e in range(4)]
        assert sum(grafts) == 24 // 10 and grafts == [0, 1, 0, 1]  # steps 10 (epoch 2) and 20 (epoch 4)
        for r in recs:
            assert r["peer"] is None and (r["grafts"] == 0 or r["mean_alpha"] == pytest.approx(0.99))
        cfg = yaml.safe_load((out / "config.yaml").read_text())["grafting"]
        assert (cfg["rule"], cfg["criterion"], cfg["partner"], cfg["every_steps"]) == ("papa", "constant",
                                                                                      "population", 10)
    else:
        assert [by[e, 0]["grafts"] for e in range(4)] == [1, 1, 1, 0]  # not after the last epoch
        layer = by[0, 0]["graft"][0]
        assert {"l1_self", "l1_peer"} <= set(layer) and layer["l1_self"] > 0
