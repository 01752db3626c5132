"""graft.resume in one process (one network): what a resume reads, skips, refuses and removes."""

import errno

import pytest
import torch

from graft import checkpoint, dist
from graft.checkpoint import ResumePoint
from graft.config import load_config
from graft.errors import PeerFailed, Stop
from graft.grafter import Grafter
from graft.resume import resume
from test_checkpoint import failing


def fresh_point(epochs: int) -> ResumePoint:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return ResumePoint(model, optimizer, scheduler, None, Grafter(epochs=epochs, topology=dist.Topology()),
                       torch.device("cpu"))


def saved_run(tmp_path, epochs_done=3, epochs=5):
    """A one-network run that saved ``epochs_done`` resume points (all kept); its config."""
    cfg = load_config(None, [f"output_dir={tmp_path}", f"epochs={epochs}", "grafting.enabled=false"])
    point = fresh_point(epochs)
    for epoch in range(epochs_done):
        point.epoch = epoch
        checkpoint.save_epoch(tmp_path, 0, cfg.setup(1), point.state_dict(), keep=epochs_done)
    return cfg


def resumed(cfg):
    point = fresh_point(cfg.epochs)
    resume(cfg, dist.Topology(), point, grafting=False, per_step=False)
    return point


def files(tmp_path):
    return [p.name for _, p in checkpoint.epoch_files(tmp_path, 0)]


def test_a_stop_while_reading_the_newest_file_stops_the_resume_and_removes_nothing(tmp_path, monkeypatch):
    """The old loader took a signal's Stop for a damaged file: the resume went on from the epoch
    before and removed the intact newest checkpoint, and the stop was lost."""
    cfg = saved_run(tmp_path)
    failing(monkeypatch, checkpoint.epoch_path(tmp_path, 0, 2), Stop("received SIGTERM: stopped between steps"))
    with pytest.raises(PeerFailed, match=r"^network 0 \(rank 0\) cannot resume: received SIGTERM") as e:
        resumed(cfg)
    assert e.value.resumable and isinstance(e.value.__cause__, Stop)
    assert files(tmp_path) == ["epoch0001.pt", "epoch0002.pt", "epoch0003.pt"]


def test_a_newest_file_that_cannot_be_read_stops_the_resume_and_removes_nothing(tmp_path, monkeypatch):
    """No permission (or an I/O error) says nothing about the file's bytes: not skipped as damaged."""
    cfg = saved_run(tmp_path)
    newest = checkpoint.epoch_path(tmp_path, 0, 2)
    failing(monkeypatch, newest, PermissionError(errno.EACCES, "Permission denied", str(newest)))
    with pytest.raises(PeerFailed, match=rf"resume: {newest}: cannot read the checkpoint \(Permission denied\)$"):
        resumed(cfg)
    assert files(tmp_path) == ["epoch0001.pt", "epoch0002.pt", "epoch0003.pt"]


def test_a_damaged_newest_file_is_skipped_as_before(tmp_path, caplog):
    cfg = saved_run(tmp_path)
    newest = checkpoint.epoch_path(tmp_path, 0, 2)
    newest.write_bytes(newest.read_bytes()[:500])
    assert resumed(cfg).epoch == 1
    assert f"skipping damaged checkpoint: {newest}: unreadable checkpoint" in caplog.text
    assert files(tmp_path) == ["epoch0001.pt", "epoch0002.pt"]  # epoch 3 is trained again


def test_best_pt_under_an_epoch_files_name_is_refused_not_a_key_error(tmp_path):
    """Used to end in a bare KeyError ('optimizer') inside ResumePoint.load_state_dict."""
    cfg = saved_run(tmp_path, epochs_done=2)
    best = checkpoint.save_best(tmp_path, 0, 2, 50.0, "test", cfg.setup(1), torch.nn.Linear(3, 2).state_dict())
    path = checkpoint.epoch_path(tmp_path, 0, 2)
    best.rename(path)
    with pytest.raises(PeerFailed, match=rf"resume: {path}: not a resume point \(no optimizer, scheduler, rng\)"):
        resumed(cfg)
    assert files(tmp_path) == ["epoch0001.pt", "epoch0002.pt", "epoch0003.pt"]


def test_another_networks_file_is_not_resumed(tmp_path):
    """network was saved in every resume point but never compared with the network resuming it."""
    cfg = saved_run(tmp_path, epochs_done=2)
    newest = checkpoint.epoch_path(tmp_path, 0, 1)
    saved = torch.load(newest, weights_only=True)
    torch.save({**saved, "network": 1}, newest)
    with pytest.raises(PeerFailed, match=rf"cannot resume: {newest}: holds network 1's resume point, but lies in "
                                         r"network 0's folder"):
        resumed(cfg)
    assert files(tmp_path) == ["epoch0001.pt", "epoch0002.pt"]
