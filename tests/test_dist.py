"""graft.dist without a process group, or with a group of one: topology, backend choice,
communication failures, ``together``, the rule's partners."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from graft import dist as gdist
from graft.errors import ConfigError, PeerFailed, PeerLost, PeerTimeout, TopologyError, UserError
from graft.rules import PARTNERS


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
    topo = gdist.setup(1, "auto", "cpu")
    assert (topo.networks, topo.network, topo.distributed) == (1, 0, False)
    assert "1 network(s) x 1 replica(s)" in topo.describe()


def test_hybrid_numbering_and_the_ring():
    topo = gdist.Topology(rank=5, world=8, replicas=2)
    assert (topo.networks, topo.network, topo.replica) == (4, 2, 1)
    assert topo.leader_rank(3) == 6 and not topo.is_leader
    ring = PARTNERS["ring"]
    assert [ring.peer(k, 4) for k in range(4)] == [3, 0, 1, 2]  # network k grafts from k-1
    assert PARTNERS["population"].peer(2, 4) is None


def test_world_must_be_a_multiple_of_data_parallel(torchrun_env):
    torchrun_env(world=3)
    with pytest.raises(TopologyError, match="not a multiple of data_parallel=2"):
        gdist.setup(2, "gloo", "cpu")


def test_backend_choice():
    assert gdist.pick_backend("auto", use_cuda=False, gpus_shared=False, gpus=0, local_world=4) == "gloo"
    assert gdist.pick_backend("auto", use_cuda=True, gpus_shared=False, gpus=2, local_world=2) == "nccl"
    assert gdist.pick_backend("auto", use_cuda=True, gpus_shared=True, gpus=2, local_world=3) == "gloo"
    assert gdist.pick_backend("gloo", use_cuda=True, gpus_shared=False, gpus=1, local_world=1) == "gloo"
    with pytest.raises(TopologyError, match=r"Duplicate GPU detected.*--nproc_per_node=1, or use backend=gloo"):
        gdist.pick_backend("nccl", use_cuda=True, gpus_shared=True, gpus=1, local_world=2)


def test_gpus_are_shared_when_two_ranks_hold_one_gpu_whatever_they_see():
    """Sharing is decided from each rank's GPU identity (host and UUID), not from counts: under
    srun --gpus-per-task every rank sees one GPU, each its own."""
    for identities, shared in ((["h/GPU-a", "h/GPU-b"], False), (["h/GPU-a", "h/GPU-a"], True),
                               (["h1/GPU-a", "h2/GPU-a"], False)):
        store = dist.HashStore()
        store.set("gpu/1", identities[1])
        assert gdist._gpus_shared(store, 0, 2, identities[0], timeout=5) is shared


def test_nccl_needs_cuda(torchrun_env, monkeypatch):
    torchrun_env(world=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TopologyError, match="backend=nccl needs CUDA"):
        gdist.setup(1, "nccl", "auto")


def test_backend_strings_of_a_scripts_group():
    """init_process_group() with no backend, or a per-device mix, still finds NCCL for CUDA."""
    assert gdist._backends("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert gdist._backends("nccl") == {"cuda": "nccl"} and gdist._backends("gloo") == {"cpu": "gloo"}
    assert gdist._backends("cpu:gloo") == {"cpu": "gloo"}
    cuda = torch.device("cuda", 3)
    assert gdist.Topology(nccl_cuda=True).comm_device(cuda) == cuda  # NCCL carries CUDA tensors
    assert gdist.Topology(nccl_cuda=False).comm_device(cuda) == torch.device("cpu")  # gloo: through the host


def test_only_communication_failures_become_peer_lost():
    """gloo reports a peer that went away as a plain RuntimeError: collectives() turns it into
    PeerLost, chained to it; anything else (a CUDA or compiler error) keeps its type and
    traceback."""
    with pytest.raises(PeerLost, match=r"communication with the other ranks failed \(RuntimeError: "
                                       r"Connection closed by peer\); a peer probably stopped first") as e:
        with gdist.collectives():
            raise RuntimeError("Connection closed by peer\n(the rest of gloo's message)")
    assert isinstance(e.value.__cause__, RuntimeError)
    for error in (RuntimeError("CUDA error: an illegal memory access was encountered"),
                  RuntimeError("Failed to find C compiler. Please specify via CC environment variable."),
                  RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), PeerTimeout("late"),
                  torch.OutOfMemoryError("out of memory")):
        with pytest.raises(type(error)) as raised:
            with gdist.collectives():
                raise error
        assert raised.value is error
    assert issubclass(PeerLost, UserError)

    @gdist.collectives()
    def gather():
        raise RuntimeError("Connection reset by peer")

    with pytest.raises(PeerLost):
        gather()


def test_together_fails_on_every_rank_alike_naming_the_ranks_that_failed(monkeypatch):
    topo = gdist.Topology(rank=0, world=4, replicas=2)
    gathered = []
    monkeypatch.setattr(gdist, "all_gather_objects", lambda topo, obj, leaders_only: gathered.pop(0))
    gathered.append([None, None, ("net1/epoch0003.pt: unreadable", False), None])
    with pytest.raises(PeerFailed, match=r"^network 1 \(rank 2\) cannot resume: net1/epoch0003.pt: unreadable$") as e:
        with gdist.together(topo, "resume"):
            pass
    assert not e.value.resumable and e.value.everywhere
    gathered.append([None, ("no best.pt", True)])  # leaders only: entry 1 is network 1's leader, rank 2
    with pytest.raises(PeerFailed, match=r"^network 1 \(rank 2\) cannot evaluate: no best.pt$") as e:
        with gdist.together(topo, "evaluate", leaders_only=True):
            pass
    assert e.value.resumable
    # Where it happened: the same error as everywhere else (said once), its own as the cause.
    gathered.append([("mine", False), None, None, None])
    with pytest.raises(PeerFailed, match=r"^network 0 \(rank 0\) cannot resume: mine$") as e:
        with gdist.together(topo, "resume"):
            raise ConfigError("mine")
    assert isinstance(e.value.__cause__, ConfigError)
    # Several ranks: one reason said once with all of them; different reasons each with theirs.
    gathered.append([("a.pt: unreadable", True), None, ("a.pt: unreadable", True), ("b", False)])
    with pytest.raises(PeerFailed) as e:
        with gdist.together(topo, "resume"):
            pass
    assert str(e.value) == ("networks 0, 1 (ranks 0, 2) cannot resume: a.pt: unreadable; "
                            "network 1 (rank 3) cannot resume: b")
    assert not e.value.resumable  # a rerun cannot mend rank 3's problem
    gathered.append([None] * 4)
    with gdist.together(topo, "resume"):
        done = True
    assert done and not gathered


def test_object_gather_and_check_in_on_a_group_of_one(monkeypatch):
    """all_gather_objects goes through tensors (it works on graft-run's own gloo groups too)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=10))
    try:
        topo = gdist.Topology(rank=0, world=2, replicas=2, store=store, leader_group=dist.group.WORLD)
        assert topo.networks == 1
        assert gdist.all_gather_objects(topo, {"a": [1, 2.5, None]}, leaders_only=True) == [{"a": [1, 2.5, None]}]
        # Every rank's gather goes through the default group: under graft-run SCRIPT that is the
        # script's, not graft's world.
        monkeypatch.setattr(gdist, "_LAUNCHED", topo)
        with pytest.raises(RuntimeError, match="under graft-run SCRIPT"):
            gdist.all_gather_objects(topo, 1, leaders_only=False)
    finally:
        dist.destroy_process_group()


def test_a_peer_waiting_at_another_point_is_named_at_once():
    """Networks resumed from different epochs wait at different grafts: named with both points
    at once, not after the timeout as a peer that 'probably died'."""
    store = dist.HashStore()
    store.set("arrive/epoch 1 graft/1", "1")
    store.set("waiting/1", "epoch 1 graft")  # network 1 waits at epoch 1's graft
    topo = gdist.Topology(rank=0, world=2, store=store, timeout=60)
    with pytest.raises(PeerTimeout, match=r"^rank 0: network 0 waits at epoch 2 graft, network 1 \(rank 1\) at "
                                          r"epoch 1 graft: they started from different points \(.*"
                                          r"another grafting.every_steps\)"):
        gdist.arrive(topo, "epoch 2 graft")
    # A peer still at a point this rank passed is only slower: waited for, then named at the timeout.
    store.set("arrive/epoch 1 graft/0", "1")
    with pytest.raises(PeerTimeout, match=r"network 1 \(rank 1\) did not arrive at epoch 2 graft within 0.3 s"):
        gdist.arrive(topo, "epoch 2 graft", timeout=0.3)


def test_a_peer_that_passed_this_point_meanwhile_is_not_named():
    """CI's flake: rank 2 listed rank 1 as missing at 'epoch 2 trained'; rank 1 then arrived and
    moved on to 'end of run' before rank 2 read its point. That is progress, not a deadlock."""
    store = dist.HashStore()
    topo = gdist.Topology(rank=0, world=2, store=store, timeout=60)
    store.set("arrive/epoch 2 trained/1", "1")  # rank 1 arrived after rank 0 listed it ...
    store.set("waiting/1", "end of run")         # ... and waits at its next point already
    assert gdist._waiting_elsewhere(topo, store, "epoch 2 trained", [1]) == ""
    store.set("waiting/1", "epoch 1 trained")    # a rank that never reached this point is named
    store.delete_key("arrive/epoch 2 trained/1")
    assert gdist._waiting_elsewhere(topo, store, "epoch 2 trained", [1]) == "network 1 (rank 1) at epoch 1 trained"


def test_a_scripts_cuda_device_is_its_local_rank_when_it_never_set_one(monkeypatch):
    """A script that moved its model with .to(f"cuda:{local_rank}") and never called set_device
    has current_device() 0 on every rank: the Grafter takes LOCAL_RANK's GPU instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert gdist.script_device({"cpu": "gloo", "cuda": "nccl"}) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # it did call set_device
    assert gdist.script_device({"cuda": "nccl"}) == torch.device("cuda", 3)
    assert gdist.script_device({"cpu": "gloo"}) == torch.device("cpu")
