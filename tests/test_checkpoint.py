"""Reading checkpoints: damaged bytes are skippable, everything else is not (a stop, a file that
cannot be read, an intact file in the wrong place)."""

import errno
import io
import random
from pathlib import Path

import pytest
import torch

from graft import checkpoint
from graft.errors import Stop


def resume_state(epoch: int) -> dict:
    """What ``ResumePoint.state_dict`` holds, small."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": {"torch": torch.get_rng_state()}}


def failing(monkeypatch, path, error, reading=True):
    """Reading ``path`` raises ``error``: reading its bytes (unless not ``reading``), or torch.load
    given its path (as graft's loader once did) or its bytes."""
    read_bytes, load, data = Path.read_bytes, torch.load, path.read_bytes()

    def fail_read(p):
        if p == path:
            raise error
        return read_bytes(p)

    def fail_load(f, *args, **kw):
        if f.getvalue() == data if isinstance(f, io.BytesIO) else Path(f) == path:
            raise error
        return load(f, *args, **kw)

    if reading:
        monkeypatch.setattr(Path, "read_bytes", fail_read)
    monkeypatch.setattr(torch, "load", fail_load)


def test_damaged_bytes_are_damaged_whatever_torch_raises(tmp_path):
    """Cut and flipped bytes of a saved checkpoint: torch raises many types; each is a
    DamagedCheckpoint naming the file (or the file still loads: a flip inside tensor data)."""
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "network": 0, **resume_state(0)}, buffer)
    data = buffer.getvalue()
    path, rnd = tmp_path / "epoch0001.pt", random.Random(0)
    cases = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 80))]
    for _ in range(150):
        flipped = bytearray(data)
        for _ in range(rnd.choice([1, 3, 10])):
            flipped[rnd.randrange(len(flipped))] = rnd.randrange(256)
        cases.append(bytes(flipped))
    for case in cases:
        path.write_bytes(case)
        try:
            checkpoint.load(path)
        except checkpoint.DamagedCheckpoint as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)


def test_a_stop_or_memory_error_while_loading_goes_through(tmp_path, monkeypatch):
    """The old loader turned a signal's Stop into "unreadable checkpoint": a resume then skipped
    the intact newest file, removed it, and the stop was lost."""
    checkpoint.save_epoch(tmp_path, 0, {}, resume_state(0))
    path = checkpoint.save_epoch(tmp_path, 0, {}, resume_state(1))
    for error in (Stop("received SIGTERM"), MemoryError(), KeyboardInterrupt()):
        for reading in (True, False):  # while reading the bytes, or while parsing them
            with monkeypatch.context() as m:
                failing(m, path, error, reading)
                with pytest.raises(type(error)):
                    checkpoint.load(path)
                with pytest.raises(type(error)):
                    checkpoint.newest_complete(tmp_path, 0)
    assert path.exists()


def test_a_file_that_cannot_be_read_is_named_and_not_skipped(tmp_path, monkeypatch):
    """No permission, an I/O error: nothing about the bytes, so no older file takes its place."""
    older = checkpoint.save_epoch(tmp_path, 0, {}, resume_state(0))
    newest = checkpoint.save_epoch(tmp_path, 0, {}, resume_state(1))
    for error, why in ((PermissionError(errno.EACCES, "Permission denied", str(newest)), "Permission denied"),
                       (OSError(errno.EIO, "Input/output error"), "Input/output error")):
        with monkeypatch.context() as m:
            failing(m, newest, error)
            with pytest.raises(checkpoint.CheckpointError) as e:
                checkpoint.newest_complete(tmp_path, 0)  # not epoch 0 in its place
        assert str(e.value) == f"{newest}: cannot read the checkpoint ({why})"
        assert not isinstance(e.value, checkpoint.DamagedCheckpoint)
    missing = tmp_path / "nowhere" / "best.pt"
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{missing}: cannot read the checkpoint \(No such file"):
        checkpoint.load(missing)
    assert older.exists() and newest.exists()


def test_a_damaged_newest_file_is_still_skipped(tmp_path):
    checkpoint.save_epoch(tmp_path, 0, {}, resume_state(0))
    newest = checkpoint.save_epoch(tmp_path, 0, {}, resume_state(1))
    newest.write_bytes(newest.read_bytes()[:300])
    epoch, saved, skipped = checkpoint.newest_complete(tmp_path, 0)
    assert (epoch, saved["epoch"]) == (0, 0)
    assert len(skipped) == 1 and skipped[0].startswith(f"{newest}: unreadable checkpoint (RuntimeError: ")


def test_a_file_that_is_no_resume_point_is_refused_naming_what_it_lacks(tmp_path):
    """best.pt renamed to an epoch file used to end in a bare KeyError inside load_state_dict."""
    checkpoint.save_epoch(tmp_path, 0, {}, resume_state(0))
    best = checkpoint.save_best(tmp_path, 0, 1, 50.0, "test", {}, torch.nn.Linear(3, 2).state_dict())
    path = checkpoint.epoch_path(tmp_path, 0, 1)
    best.rename(path)
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path}: not a resume point \(no optimizer, scheduler, "
                                                         r"rng\): best.pt or a teacher's weights under an epoch "
                                                         r"file's name\? Move it away to resume; nothing was changed$"):
        checkpoint.newest_complete(tmp_path, 0)
    assert path.exists()


def test_another_networks_file_is_refused_naming_both(tmp_path):
    """A file copied from net1/ into net0/ used to be resumed as network 0's."""
    theirs = checkpoint.save_epoch(tmp_path, 1, {}, resume_state(0))
    mine = checkpoint.epoch_path(tmp_path, 0, 0)
    mine.parent.mkdir(parents=True)
    (mine.parent / checkpoint.NUMBERING).write_text("")
    mine.write_bytes(theirs.read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{mine}: holds network 1's resume point, but lies in "
                                                         r"network 0's folder: files copied between"):
        checkpoint.newest_complete(tmp_path, 0)
    with pytest.raises(checkpoint.CheckpointError, match="holds network 1's resume point"):
        checkpoint.load_epoch(mine, 0, 0)
    assert checkpoint.load_epoch(theirs, 1, 0)["network"] == 1
