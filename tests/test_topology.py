"""Topology checks that run before any process group starts."""

import pytest
import torch
import torch.distributed as dist

from graft import ring
from graft.config import ConfigError
from graft.errors import UserError


@pytest.fixture
def torchrun_env(monkeypatch):
    def set_env(rank=0, world=1, local_world=None):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world or world))
    return set_env


def test_single_process_is_one_network(torchrun_env):
    torchrun_env()
    topo = ring.setup(1, "auto", "cpu")
    assert (topo.networks, topo.network, topo.peer, topo.distributed) == (1, 0, 0, False)
    assert "1 network(s) x 1 replica(s)" in topo.describe()


def test_ring_order_and_hybrid_numbering():
    topo = ring.Topology(rank=5, world=8, replicas=2)
    assert (topo.networks, topo.network, topo.replica, topo.peer) == (4, 2, 1, 1)
    assert topo.leader_rank(3) == 6 and not topo.is_leader
    assert "ring: 0 -> 1 -> 2 -> 3 -> 0 (network k grafts from k-1)" in topo.describe()
    # Each arrow points from the network whose weights are taken to the one that grafts them.
    printed = topo.describe().split("ring: ")[1].split(" (")[0].split(" -> ")
    for giver, taker in zip(printed, printed[1:]):
        assert ring.Topology(rank=int(taker) * 2, world=8, replicas=2).peer == int(giver)
    assert "ring: none (one network)" in ring.Topology(rank=0, world=2, replicas=2).describe()


def test_world_must_be_a_multiple_of_data_parallel(torchrun_env):
    torchrun_env(world=3)
    with pytest.raises(ring.TopologyError, match="not a multiple of data_parallel=2"):
        ring.setup(2, "gloo", "cpu")


def test_backend_choice():
    assert ring.pick_backend("auto", use_cuda=False, local_world=4, gpus=0) == "gloo"
    assert ring.pick_backend("auto", use_cuda=True, local_world=2, gpus=2) == "nccl"
    assert ring.pick_backend("auto", use_cuda=True, local_world=3, gpus=2) == "gloo"  # networks share GPUs
    assert ring.pick_backend("gloo", use_cuda=True, local_world=1, gpus=1) == "gloo"
    with pytest.raises(ring.TopologyError, match=r"Duplicate GPU detected.*--nproc_per_node=1, or use backend=gloo"):
        ring.pick_backend("nccl", use_cuda=True, local_world=2, gpus=1)


def test_two_nccl_ranks_on_one_gpu_are_refused(torchrun_env, monkeypatch):
    torchrun_env(world=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ring.TopologyError, match=r"Duplicate GPU detected"):
        ring.setup(1, "nccl", "auto")


def test_nccl_needs_cuda(torchrun_env, monkeypatch):
    torchrun_env(world=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ring.TopologyError, match="backend=nccl needs CUDA"):
        ring.setup(1, "nccl", "auto")


def test_a_failed_collective_is_recognised_by_its_type():
    """gloo reports a peer that went away as a plain RuntimeError: ring.collectives() turns it
    into PeerLost (a UserError, one line); anything else keeps its own type."""
    with pytest.raises(RuntimeError, match="^no group yet$"):  # no process group: not a collective's error
        with ring.collectives():
            raise RuntimeError("no group yet")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ring.PeerLost, match=r"communication with the other ranks failed \(RuntimeError: "
                                                r"Connection closed by peer\); a peer probably stopped first"):
            with ring.collectives():
                raise RuntimeError("Connection closed by peer\n(the rest of gloo's message)")
        assert issubclass(ring.PeerLost, UserError)
        for error in (ring.PeerTimeout("late"), torch.OutOfMemoryError("out of memory")):
            with pytest.raises(type(error)):
                with ring.collectives():
                    raise error

        @ring.collectives()
        def gather():
            raise RuntimeError("Connection reset by peer")

        with pytest.raises(ring.PeerLost):
            gather()
    finally:
        dist.destroy_process_group()


def test_together_fails_on_every_rank_naming_the_one_that_failed(monkeypatch):
    topo = ring.Topology(rank=0, world=4, replicas=2)
    gathered = []
    monkeypatch.setattr(ring, "all_gather_objects", lambda topo, obj, leaders_only: gathered.pop(0))
    gathered.append([None, None, "net1/epoch0003.pt: unreadable", None])
    with pytest.raises(ring.PeerFailed, match=r"^network 1 \(rank 2\) cannot resume: net1/epoch0003.pt: unreadable"):
        with ring.together(topo, "resume"):
            pass
    gathered.append([None, "no best.pt"])  # leaders only: entry 1 is network 1's leader, rank 2
    with pytest.raises(ring.PeerFailed, match=r"^network 1 \(rank 2\) cannot evaluate: no best.pt"):
        with ring.together(topo, "evaluate", leaders_only=True):
            pass
    gathered.append(["mine", None, None, None])  # where it happened: its own error, unchanged
    with pytest.raises(ConfigError, match="^mine$"):
        with ring.together(topo, "resume"):
            raise ConfigError("mine")
    gathered.append([None] * 4)
    with ring.together(topo, "resume"):
        done = True
    assert done and not gathered
