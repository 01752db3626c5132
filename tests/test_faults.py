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
    # The third epoch's lr is the 3-epoch cosine's, as in a run planned for 3 epochs from the start.
    lr = {(r["epoch"], r["network"]): r["lr"] for r in records(reference)}
    assert {(r["epoch"], r["network"]): r["lr"] for r in records(out) if r["epoch"] == 2} == \
        {k: v for k, v in lr.items() if k[0] == 2}
    assert_one_record_per_epoch(out)


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


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"net": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a graft checkpoint"):
        checkpoint.load(path)
