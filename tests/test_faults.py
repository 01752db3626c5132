"""Faults and bad input: kill and resume bit for bit, torchrun restarts, SIGTERM, damaged files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from graft import checkpoint
from helpers import ROOT, env, fill, small_disk

ARGS = ["model=resnet8", "epochs=3", "batch_size=50", "data.train_subset=200", "data.test_subset=100",
        "progress=false", "optim.schedule=cosine"]


def command(out, nproc=2, extra=(), overrides=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            "-m", "graft.train", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"output_dir={out}",
            f"data.cache_dir={out.parent / 'cache'}", *ARGS, *overrides]


def run(out, **kw):
    return subprocess.run(command(out, **kw), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def graft_run(out, cache, *overrides):
    """The same run through graft-run, which prints each distinct error line once."""
    cmd = command(out, overrides=[*overrides, f"data.cache_dir={cache}"])
    cmd = [sys.executable, "-m", "graft.launch", *cmd[3:cmd.index("-m", 3)], *cmd[cmd.index("-m", 3) + 2:]]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def final_states(out, epoch=2):
    return [torch.load(checkpoint.epoch_path(out, k, epoch), weights_only=False)["model"] for k in (0, 1)]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def start_and_interrupt(out, sig, who, extra=()):
    """Start a run, wait for the first epoch's checkpoints, then send ``sig`` to a worker or the agent."""
    proc = subprocess.Popen(command(out, extra=extra), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not all(checkpoint.epoch_path(out, k, 0).exists() for k in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    if who == "agent":
        proc.send_signal(sig)
    else:
        workers = children(proc.pid)
        assert workers, "no worker processes found"
        os.kill(workers[-1], sig)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr, time.monotonic() - sent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_weights(a, b):
    for sa, sb in zip(final_states(a), final_states(b)):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def assert_one_record_per_epoch(out):
    assert sorted((r["epoch"], r["network"]) for r in records(out)) == [(e, k) for e in range(3) for k in (0, 1)]


def test_sigkill_then_rerun_resumes_bit_for_bit(reference, tmp_path):
    out = tmp_path / "killed"
    code, _, _, _ = start_and_interrupt(out, signal.SIGKILL, "worker")
    assert code != 0
    proc = run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch" in proc.stdout
    assert_same_weights(reference, out)
    assert_one_record_per_epoch(out)
    ref = {(r["epoch"], r["network"]): r["test_acc"] for r in records(reference)}
    assert {(r["epoch"], r["network"]): r["test_acc"] for r in records(out)} == ref


def test_torchrun_max_restarts_recovers(reference, tmp_path):
    out = tmp_path / "restarted"
    code, stdout, stderr, _ = start_and_interrupt(out, signal.SIGKILL, "worker", extra=["--max-restarts=1"])
    assert code == 0, stderr[-3000:]
    assert "resuming after epoch" in stdout
    assert_same_weights(reference, out)
    assert_one_record_per_epoch(out)


def test_sigterm_stops_quickly_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "preempted"
    code, _, stderr, seconds = start_and_interrupt(out, signal.SIGTERM, "agent")
    assert code != 0
    assert seconds < 30
    assert "received SIGTERM" in stderr
    for k in (0, 1):
        newest, _, skipped = checkpoint.newest_complete(out, k)
        assert newest >= 0 and not skipped


def test_damaged_newest_checkpoint_falls_back(reference, tmp_path):
    out = tmp_path / "damaged"
    assert run(out, overrides=["epochs=2"]).returncode == 0
    bad = checkpoint.epoch_path(out, 1, 1)
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    proc = run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A warning, from the rank that met the file (network 1's), on stderr; the rest as usual.
    assert f"graft: warning: rank 1: skipping damaged checkpoint: {bad}: unreadable checkpoint" in proc.stderr
    assert "resuming after epoch 1/3" in proc.stdout  # network 1 had only epoch 0 intact
    assert_one_record_per_epoch(out)


def saved_files(out):
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_incompatible_resume_is_refused_and_nothing_changes(reference, tmp_path):
    before = saved_files(reference)
    proc = run(reference, overrides=["model=resnet20"])
    assert proc.returncode != 0
    assert "cannot resume, the run was set up differently (model: 'resnet8' in the checkpoint, 'resnet20' now); " \
        "to start this run alongside it, give it its own output_dir=... (or resume=never" in proc.stderr
    proc = run(reference, nproc=3)
    assert proc.returncode != 0
    assert "networks: 2 in the checkpoint, 3 now" in proc.stderr
    proc = run(reference, overrides=["optim.difflr=false", "grafting.A=0.2"])
    assert proc.returncode != 0
    assert "optim.difflr: True in the checkpoint, False now; grafting.A: 0.4 in the checkpoint, 0.2 now" \
        in proc.stderr
    proc = run(reference, overrides=["epochs=2"])
    assert proc.returncode != 0
    assert f"epochs: 2, but the run in {reference} already completed 3 epochs: nothing to train. epochs=4 or " \
        "more extends it; to start this run alongside it, give it its own output_dir=..." in proc.stderr
    assert saved_files(reference) == before  # config.yaml, metrics, checkpoints: all as they were

    # Cut back to epoch 2, which ended with a graft: epochs=2 would end on weights no epoch evaluated.
    cut = tmp_path / "cut"
    shutil.copytree(reference, cut)
    for k in (0, 1):
        checkpoint.epoch_path(cut, k, 2).unlink()
    before = saved_files(cut)
    proc = run(cut, overrides=["epochs=2"])
    assert proc.returncode != 0
    assert f"epochs: 2 would end the run in {cut} on epoch 2's grafted weights" in proc.stderr
    assert "epochs=3 or more continues it" in proc.stderr
    assert saved_files(cut) == before


def test_no_loadable_checkpoint_is_refused_not_restarted(reference, tmp_path):
    out = tmp_path / "garbage"
    shutil.copytree(reference, out)
    for _, path in checkpoint.epoch_files(out, 1):
        path.write_bytes(b"garbage")
    before = saved_files(out)
    proc = run(out)
    assert proc.returncode != 0
    assert f"{checkpoint.network_dir(out, 1)}: none of the 2 epoch checkpoint(s) loads" in proc.stderr
    # network 0 stops with the reason, not left waiting in a collective (no traceback, no abort)
    assert "graft: error: network 1 (rank 1) cannot resume: " \
        f"{checkpoint.network_dir(out, 1)}: none of the 2 epoch checkpoint(s) loads" in proc.stderr
    assert "communication with the other ranks failed" not in proc.stderr
    assert "terminate called" not in proc.stderr
    assert saved_files(out) == before  # best.pt and the metrics of the run survive


def test_starting_over_keeps_the_earlier_metrics(reference, tmp_path):
    out = tmp_path / "over"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints")
    before = (out / "metrics.jsonl").read_text()
    proc = run(out, overrides=["epochs=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = out.glob("metrics.before-*.jsonl")
    assert f"starting over: the metrics of the earlier run are kept in {aside}" in proc.stdout
    assert aside.read_text() == before and len(records(out)) == 2


def test_extending_a_finished_run_follows_the_longer_schedule(reference, tmp_path):
    out = tmp_path / "extended"
    assert run(out, overrides=["epochs=2"]).returncode == 0
    # As if it had been stopped between its last checkpoints and their metrics records:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] == 0))
    proc = run(out)  # epochs=3 now
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 2/3" in proc.stdout
    assert "grafting after epoch 2: the resumed weights ended it without a graft" in proc.stdout
    # That late graft is in epoch 2's records (which came back from the checkpoints), as any other graft.
    late = [r for r in records(out) if r["epoch"] == 1]
    assert sorted(r["network"] for r in late) == [0, 1]
    assert all(r["peer"] == (r["network"] - 1) % 2 and 0 < r["mean_alpha"] < 1 and r["graft"] for r in late)
    try:  # and in TensorBoard's (the extra is optional)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    if EventAccumulator is not None:
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        alphas = {e.step: e.value for e in events.Scalars("mean_alpha/net0")}
        assert sorted(alphas) == [0, 1]  # epoch 3, the last, grafts nothing
        assert alphas[1] == pytest.approx(next(r["mean_alpha"] for r in late if r["network"] == 0))
    # The third epoch's lr is the 3-epoch cosine's, as in a run planned for 3 epochs from the start.
    lr = {(r["epoch"], r["network"]): r["lr"] for r in records(reference)}
    assert {(r["epoch"], r["network"]): r["lr"] for r in records(out) if r["epoch"] == 2} == \
        {k: v for k, v in lr.items() if k[0] == 2}
    assert_one_record_per_epoch(out)


def test_the_final_test_refuses_a_best_pt_of_another_epoch(tmp_path):
    """best.pt must hold the epoch the validation records call best: else the summary would
    pair one epoch's figures with another's weights."""
    import contextlib
    from types import SimpleNamespace

    from graft import dist as gdist
    from graft.errors import PeerFailed
    from graft.train import final_test

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    checkpoint.save_best(tmp_path, 0, 3, 50.0, "val", {}, model.state_dict())  # epoch 4, counted from 1
    cfg, t = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(model=model, autocast=contextlib.nullcontext)
    loader = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]))]
    topo = gdist.Topology(rank=0, world=1)
    with pytest.raises(PeerFailed, match=r"^network 0 \(rank 0\) cannot evaluate its best-validation weights: "
                                         r".*best.pt: holds epoch 4, but the validation records say epoch 6 was best; "
                                         r"the summary would describe other"):
        final_test(cfg, topo, t, SimpleNamespace(best_epoch=5), loader)
    result = final_test(cfg, topo, t, SimpleNamespace(best_epoch=3), loader)
    assert result["networks"]["0"]["best_val_epoch"] == 3 and result["networks"]["0"]["best_val_acc"] == 50.0


def test_epoch_files_pruning_best_set_aside_and_file_mode(tmp_path):
    for epoch in (5, 6):  # left by a run that later resumed after epoch 2
        checkpoint.save_epoch(tmp_path, 0, {}, {"epoch": epoch, "model": {}})
    partial = checkpoint.network_dir(tmp_path, 0) / ".epoch0008.pt.abc.tmp"  # a save that was killed
    partial.write_bytes(b"x")
    for epoch in (1, 2, 3):
        checkpoint.save_epoch(tmp_path, 0, {}, {"epoch": epoch, "model": {}})
    assert [e for e, _ in checkpoint.epoch_files(tmp_path, 0)] == [2, 3, 5, 6]
    assert not partial.exists()
    path = checkpoint.epoch_path(tmp_path, 0, 3)
    assert path.stat().st_mode & 0o777 == 0o666 & ~checkpoint._umask()
    checkpoint.save_best(tmp_path, 0, 1, 40.0, "test", {}, {})
    checkpoint.save_best(tmp_path, 0, 5, 50.0, "test", {}, {})
    assert checkpoint.set_aside_best_after(tmp_path, 0, 5) is None  # not after: kept
    stale = checkpoint.set_aside_best_after(tmp_path, 0, 3)
    assert stale.name == "best.epoch0006.stale.pt" and checkpoint.load(stale)["acc"] == 50.0
    best = checkpoint.load(checkpoint.network_dir(tmp_path, 0) / "best.pt")  # the one before it is back
    assert (best["epoch"], best["acc"]) == (1, 40.0)
    removed = checkpoint.remove_epochs_after(tmp_path, 0, 3)
    assert [p.name for p in removed] == ["epoch0006.pt", "epoch0007.pt"]  # file names count epochs from 1
    assert [e for e, _ in checkpoint.epoch_files(tmp_path, 0)] == [2, 3]


def test_setup_check_compares_what_the_checkpoint_recorded(tmp_path):
    current = {"model": "resnet8", "num_classes": 10, "batch_size": 50}
    checkpoint.check_setup(tmp_path, {"model": "resnet8", "num_classes": 0}, current)  # older, shorter setup
    with pytest.raises(checkpoint.CheckpointError, match="batch_size: 64 in the checkpoint, 50 now"):
        checkpoint.check_setup(tmp_path, {"model": "resnet8", "batch_size": 64}, current)


def test_resume_never_starts_afresh_elsewhere(reference):
    before = (reference / "metrics.jsonl").read_text()
    proc = run(reference, overrides=["resume=never", "epochs=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = reference.parent / f"{reference.name}-1"
    assert f"resume=never: {reference} holds checkpoints; this run writes to {fresh}" in proc.stdout
    assert len(records(fresh)) == 2
    assert (reference / "metrics.jsonl").read_text() == before


def test_missing_data_is_one_clear_line(tmp_path):
    proc = run(tmp_path / "x", nproc=1, overrides=[f"data.root={tmp_path}/nope.tar.gz"])
    assert proc.returncode != 0
    assert f"graft: error: data.root: no such file: {tmp_path}/nope.tar.gz" in proc.stderr


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """On a real full file system (torch.save's zip writer turns ENOSPC into an opaque RuntimeError
    there): one CheckpointError naming the file, the previous checkpoint intact, no temporary file."""
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "ckpt.pt"
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "model": {}, "v": torch.zeros(1000)}, path)
        fill(disk)
        with pytest.raises(checkpoint.CheckpointError, match=f"^{path}: cannot write the checkpoint \\(disk full\\); "
                                                            "the previous one is intact$"):
            checkpoint.atomic_save({"format": checkpoint.FORMAT, "model": {}, "v": torch.ones(1000)}, path)
        assert bool((checkpoint.load(path)["v"] == 0).all())
        assert sorted(p.name for p in disk.iterdir()) == [".filler", "ckpt.pt"]


def test_a_checkpoint_save_gets_the_advice_of_every_output_write(tmp_path):
    """One advice for every write (graft.cli.output_advice): space and a resume where this network
    has a resume point, the directory to resume under resume=never, another folder where space
    cannot help."""
    import errno

    from graft import cli

    def failed_save(network, resume, error):
        with pytest.raises(checkpoint.CheckpointError) as e:
            with cli.saving_checkpoints(tmp_path, network, resume):
                failure = checkpoint.CheckpointError("x.pt: cannot write the checkpoint (why); nothing was written")
                failure.os_error = error
                raise failure
        return str(e.value).removeprefix("x.pt: cannot write the checkpoint (why); nothing was written; ")

    full = OSError(errno.ENOSPC, "No space left on device")
    checkpoint.save_epoch(tmp_path, 1, {}, {"epoch": 0, "model": {}})
    assert failed_save(0, "auto", full) == "free some space (or give output_dir another disk) and rerun"
    assert failed_save(1, "auto", full) == ("the last complete checkpoint is intact: free some space and rerun the "
                                            "same command to resume")
    assert failed_save(1, "never", full) == (f"the last complete checkpoint is intact: free some space; to resume "
                                             f"it, rerun with output_dir={tmp_path} resume=auto")
    assert failed_save(1, "auto", OSError(errno.EROFS, "Read-only")) == "give output_dir a folder that can be written"
    with pytest.raises(checkpoint.CheckpointError, match="^y.pt: unreadable$"):  # not a write: no advice
        with cli.saving_checkpoints(tmp_path, 1):
            raise checkpoint.CheckpointError("y.pt: unreadable")


def test_damaged_bytes_are_unreadable_not_code(tmp_path):
    """A file that is no pickle torch wrote is damaged, not code; torch's paragraph on how files
    get corrupted is cut to its first sentence."""
    garbage, cut = tmp_path / "garbage.pt", tmp_path / "cut.pt"
    garbage.write_bytes(b"garbage" * 10)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(garbage)
    assert str(e.value).startswith(f"{garbage}: unreadable checkpoint (not a file torch.save wrote: "), str(e.value)
    assert "\n" not in str(e.value) and "run code" not in str(e.value)  # 2.14: "Unsupported operand 103"
    torch.save({"format": checkpoint.FORMAT, "model": {"w": torch.zeros(100)}}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(cut)
    assert str(e.value).startswith(f"{cut}: unreadable checkpoint (RuntimeError: PytorchStreamReader failed")
    assert "miniz" not in str(e.value) and len(str(e.value)) < len(str(cut)) + 150, str(e.value)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"net": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a graft checkpoint"):
        checkpoint.load(path)


class _Planted:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_none(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "payload": _Planted(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"evil.pt: refused: loading it would run code "
                                                         r"\(posix.mknod\); graft reads checkpoints as weights only"):
        checkpoint.load(path)
    assert not marker.exists()
    # graft-eval reads through the same loader: one line, no code run, no traceback.
    (tmp_path / "config.yaml").write_text("model: resnet8\n")
    run_dir = tmp_path / "run" / "checkpoints" / "net0"
    run_dir.mkdir(parents=True)
    shutil.copy(path, run_dir / "best.pt")
    proc = subprocess.run([sys.executable, "-m", "graft.evaluate", str(run_dir / "best.pt")], cwd=ROOT, env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "refused: loading it would run code" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    # As a distillation teacher, and as the epoch file a resume would read: the same refusal.
    from graft import distill

    with pytest.raises(checkpoint.CheckpointError, match="evil.pt: refused: loading it would run code"):
        distill.load_teachers([str(path)], torch.device("cpu"), False, 10)
    epoch_file = checkpoint.epoch_path(tmp_path / "resumed", 0, 0)
    epoch_file.parent.mkdir(parents=True)
    shutil.copy(path, epoch_file)
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the 1 epoch checkpoint\(s\) loads \(.*epoch0001.pt: "
                                                         r"refused: loading it would run code"):
        checkpoint.newest_complete(tmp_path / "resumed", 0)
    assert not marker.exists()


def test_a_checkpoint_of_the_format_before_still_resumes(tmp_path):
    """graft-checkpoint/1 stored numpy's RNG state as a pickled array and a top-level 'grafted':
    it loads as weights only (exactly those numpy types allowed) and restores every RNG."""
    import random

    import numpy as np

    from graft import dist
    from graft.checkpoint import ResumePoint
    from graft.grafter import Grafter

    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    old = {"format": "graft-checkpoint/1", "network": 0, "epoch": 3, "grafted": False, "best_acc": 50.0,
           "record": {"epoch": 3, "network": 0, "test_acc": 50.0}, "model": model.state_dict(),
           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
           "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                   "cuda": None}, "setup": {"model": "x"}}
    want = (np.random.rand(), random.random(), torch.rand(1))
    path = tmp_path / "epoch0003.pt"
    torch.save(old, path)
    point = ResumePoint(torch.nn.Linear(3, 2), optimizer, scheduler, None,
                        Grafter(epochs=10, topology=dist.Topology()), torch.device("cpu"))
    point.load_state_dict(checkpoint.load(path))
    assert (point.epoch, point.grafted, point.record.acc) == (3, False, 50.0)
    assert (np.random.rand(), random.random(), torch.rand(1)) == want
    assert torch.equal(point.model.weight, model.weight)


def test_a_damaged_best_is_named_and_never_replaced(tmp_path):
    """A truncated best.pt was taken for 'a best.pt from a later epoch' and replaced by the older
    best.prev.pt, silently changing the summary's best-validation weights."""
    checkpoint.save_best(tmp_path, 0, 1, 40.0, "val", {}, {"w": torch.ones(2)})
    checkpoint.save_best(tmp_path, 0, 4, 45.0, "val", {}, {"w": torch.ones(2)})
    best = checkpoint.network_dir(tmp_path, 0) / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    before = sorted(p.name for p in best.parent.iterdir())
    with pytest.raises(checkpoint.CheckpointError, match=r"best.pt: unreadable checkpoint .* which no other file "
                                                         r"replaces: restore it, or move it away"):
        checkpoint.set_aside_best_after(tmp_path, 0, 5)
    assert sorted(p.name for p in best.parent.iterdir()) == before and best.stat().st_size == 100


@pytest.mark.slow
def test_a_damaged_best_in_one_network_is_said_once_by_graft_run(tmp_path):
    """Every rank stops when one network's best.pt is unreadable; graft-run says it in one line."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    selected = ["data.eval_split=val", "data.val_fraction=0.25"]
    assert graft_run(out, cache, "epochs=1", *selected).returncode == 0
    best = checkpoint.network_dir(out, 1) / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    proc = graft_run(out, cache, "epochs=2", *selected)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"graft: error: network 1 (rank 1) cannot resume: {best}: unreadable checkpoint"), line
    assert line.endswith("restore it, or move it away to go on without it (then best.pt starts again from the "
                         "epochs trained from now on)"), line
    assert best.stat().st_size == 100


def test_a_full_disk_stops_a_run_in_one_line_and_it_resumes(tmp_path):
    """A real full file system under output_dir: one line naming the file, nothing lost; with
    space again the same command resumes."""
    def run_for(epochs):
        return graft_run(out, tmp_path / "cache", f"epochs={epochs}")

    with small_disk(tmp_path / "disk", "32m") as disk:
        out = disk / "run"
        assert run_for(1).returncode == 0
        fill(disk)
        proc = run_for(2)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and "(disk full)" in lines[0] and str(out) in lines[0], proc.stderr[-3000:]
        assert lines[0].endswith("the last complete checkpoint is intact: free some space and rerun the same "
                                 "command to resume"), lines[0]
        assert checkpoint.newest_complete(out, 0)[0] == 0  # epoch 1's resume point intact
        (disk / ".filler").unlink()
        proc = run_for(2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resuming after epoch 1/2" in proc.stdout
        assert sorted((r["epoch"], r["network"]) for r in records(out)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        # The disk fills up during the epoch: room for the config and the metrics, none for a checkpoint.
        size = checkpoint.epoch_path(out, 0, 1).stat().st_size
        fill(disk, leave=size // 4)
        proc = run_for(3)
        lines = proc.stderr.splitlines()  # each network's own file: a line each
        assert proc.returncode == 1 and len(lines) == 2, proc.stderr[-3000:]
        for network, line in enumerate(lines):
            assert line.endswith(f"net{network}/best.new.pt: cannot write the best weights (disk full); nothing was "
                                 "written; the last complete checkpoint is intact: free some space and rerun the same "
                                 "command to resume"), line
        assert checkpoint.newest_complete(out, 0)[0] == 1 and checkpoint.newest_complete(out, 1)[0] == 1
        (disk / ".filler").unlink()
        assert run_for(3).returncode == 0


@pytest.mark.slow
def test_an_output_dir_that_cannot_be_written_says_so_without_rerun_advice(tmp_path):
    """A read-only file system, or a file where the run's folder should be: one line naming the
    file and the cause, and the advice to choose another folder (a rerun cannot help)."""
    (tmp_path / "a_file").write_text("not a folder")
    with small_disk(tmp_path / "ro", read_only=True) as read_only:
        for out, cause in ((tmp_path / "a_file", "a file stands where a folder should be"),
                           (read_only / "run", "read-only file system")):
            proc = graft_run(out, tmp_path / "cache", "epochs=1")
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert proc.stderr.splitlines() == [
                f"graft: error: rank 0 (network 0): {out}/config.yaml: cannot write the run's config ({cause}); "
                "give output_dir a folder that can be written"]


def test_tensorboard_on_a_full_disk_is_turned_off_with_a_warning(tmp_path, caplog):
    pytest.importorskip("torch.utils.tensorboard")
    from graft.report import TensorBoardLog

    with small_disk(tmp_path / "disk") as disk:
        fill(disk)
        with caplog.at_level("WARNING", logger="graft"):
            log = TensorBoardLog(disk / "run")
        assert log.writer is None
        assert "TensorBoard off (disk full); metrics.jsonl holds every value" in caplog.text


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # pytest's catch of it
def test_tensorboard_on_a_disk_that_fills_later_is_turned_off_with_one_warning(tmp_path, caplog, capfd):
    """The writer writes from its own thread, which dies on the full disk: its traceback is not
    shown, and the next write turns TensorBoard off."""
    pytest.importorskip("torch.utils.tensorboard")
    from graft.records import EpochRecord
    from graft.report import TensorBoardLog

    with small_disk(tmp_path / "disk", size="1m") as disk:
        log = TensorBoardLog(disk / "run")
        log.write([EpochRecord(0, 0, lr=0.1, acc=50.0)])
        assert log.writer is not None
        fill(disk)
        with caplog.at_level("WARNING", logger="graft"):
            for epoch in range(1, 50):
                log.write([EpochRecord(epoch, 0, lr=0.1, acc=50.0, invalid_filters={"0.1": 3})])
        assert log.writer is None
        assert caplog.text.count("TensorBoard off (disk full); metrics.jsonl holds every value") == 1
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Exception in thread" not in err, err


def test_a_finished_baseline_reruns_as_finished_and_one_network_resumes(tmp_path):
    """A baseline never grafts: its checkpoints must not say its last epoch was grafted (a
    regression made rerunning a finished one-network run fail with 'would end on grafted
    weights')."""
    out = tmp_path / "one"
    assert run(out, nproc=1, overrides=["epochs=1"]).returncode == 0
    proc = run(out, nproc=1, overrides=["epochs=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 1/2" in proc.stdout and "no partner" not in proc.stderr


def test_files_whose_names_say_another_epoch_are_refused(tmp_path):
    """Checkpoints copied without their directory's NUMBERING file: the names would be read as
    counting from 0 and every epoch shift by one. The file's own epoch says so."""
    checkpoint.save_epoch(tmp_path, 0, {}, {"epoch": 0, "model": {}})
    (checkpoint.network_dir(tmp_path, 0) / checkpoint.NUMBERING).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"epoch0001.pt: holds epoch 1, but its name says epoch 2: "
                                                         r"files copied without their directory's NUMBERING file"):
        checkpoint.newest_complete(tmp_path, 0)
