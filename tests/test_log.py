"""graft.log: rank 0 says everything, the other ranks only their warnings, each with its rank."""

import logging

import pytest

import graft.log as graft_log

logger = logging.getLogger("graft.test")


@pytest.fixture(autouse=True)
def restore():
    yield
    graft_log.setup(0, 1)


@pytest.mark.parametrize("rank, out", [(0, "epoch 1/3\n"), (2, "")])
def test_rank_0_says_everything_the_others_only_their_warnings(rank, out, capsys):
    graft_log.setup(rank, 3)
    logger.info("epoch 1/3")
    logger.warning("skipping damaged checkpoint: x.pt")
    assert capsys.readouterr() == (out, f"graft: warning: rank {rank}: skipping damaged checkpoint: x.pt\n")


def test_one_process_names_no_rank_and_setup_replaces_its_handler(capsys):
    graft_log.setup(1, 2)
    graft_log.setup(0, 1)
    assert sum(isinstance(h, graft_log.Console) for h in logging.getLogger("graft").handlers) == 1
    logger.warning("careful")
    assert capsys.readouterr().err == "graft: warning: careful\n"


def test_defaults_come_from_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    graft_log.setup()
    logger.info("hidden")
    assert capsys.readouterr().out == ""
