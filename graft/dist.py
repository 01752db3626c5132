"""torch.distributed only: where a process stands (Topology), graft's process groups, and the
collectives every module shares (check-in at a point, ``together``, gathers).

Ranks form networks: ranks k*G .. k*G+G-1 are network k's G replicas (``data_parallel=G``),
trained together with DDP over ``network_group``; replica 0 of each network, its leader, grafts
with the other leaders over ``leader_group``. A process gets its Topology in one of three ways:

* ``setup()``: graft's own trainer under torchrun; one default group spans every network.
* ``from_process_group()``: a script that started its own default group over every network.
* ``from_launcher()``: a script under ``graft-run SCRIPT.py``, where each network has a
  torch.distributed world of its own (RANK and WORLD_SIZE count its replicas) and graft's groups
  live apart, over gloo, built from the ``GRAFT_*`` variables graft-run sets.

Nothing here knows what is exchanged or why: graft.exchange moves weights, graft.rules decides
who blends with whom.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import PeerFailed, PeerLost, PeerTimeout, TopologyError, UserError

# --------------------------------------------------------------------------------------------
# Communication failures
# --------------------------------------------------------------------------------------------

# How gloo words a peer that went away (it raises a plain RuntimeError; NCCL raises DistError).
_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
         "Socket Timeout", "Timed out waiting", "timed out after")


def is_communication_failure(error: BaseException) -> bool:
    """Whether ``error`` says that talking to another rank failed (a peer stopped, the network
    broke) rather than that this rank's own computation failed (a CUDA error, a bug)."""
    if isinstance(error, UserError) or not isinstance(error, RuntimeError):
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    message = str(error)
    return any(sign in message for sign in _GONE)


@contextlib.contextmanager
def collectives(what: str = "communication with the other ranks"):
    """Code that talks to the other ranks: a communication failure leaves as PeerLost (chained to
    the original), which the entry points recognise by type; any other error, a CUDA or compiler
    error included, passes through unchanged, with its traceback. Usable as a decorator."""
    try:
        yield
    except RuntimeError as e:
        if not is_communication_failure(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PeerLost(f"{what} failed ({type(e).__name__}: {first}); a peer probably stopped first: see its "
                       "error") from e


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------


@dataclass
class Topology:
    """Where this process stands: the one place that knows rank, world, network and device."""

    rank: int = 0                  # graft's rank: network * replicas + replica
    world: int = 1                 # networks x replicas
    local_rank: int = 0
    local_world: int = 1
    replicas: int = 1
    backend: str = "none"          # what graft's groups run on: nccl, gloo, a per-device mix, none
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = 1800.0
    network_group: object = None   # this network's replicas (DDP, the broadcast after a graft); never the world
    leader_group: object = None    # replica 0 of every network; None on the other replicas
    store: object = None           # for check-ins (``arrive``)
    nccl_cuda: bool = False        # the groups carry CUDA tensors over NCCL (else through host memory)

    @property
    def networks(self) -> int:
        return self.world // self.replicas

    @property
    def network(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    @property
    def is_leader(self) -> bool:
        """Replica 0 of its network: evaluates, checkpoints and grafts for the network."""
        return self.replica == 0

    @property
    def is_main(self) -> bool:
        """Rank 0: writes the run's own files (config, metrics, summary) and its epoch table."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def leader_rank(self, network: int) -> int:
        return network * self.replicas

    def comm_device(self, device: torch.device) -> torch.device:
        """Where a tensor on ``device`` travels: CUDA over NCCL, else host memory (gloo moves CPU
        tensors only; its send/recv and all_gather refuse or mangle CUDA ones)."""
        return device if device.type == "cuda" and self.nccl_cuda else torch.device("cpu")

    def describe(self) -> str:
        return (f"topology: {self.networks} network(s) x {self.replicas} replica(s) = world {self.world}; "
                f"backend {self.backend}; device {self.device.type}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def pick_backend(backend: str, use_cuda: bool, gpus_shared: bool, gpus: int, local_world: int) -> str:
    """``auto``: NCCL when every process has a GPU of its own, else gloo (CPU, or networks
    sharing GPUs). An explicit choice that cannot work is refused, saying why."""
    if backend == "auto":
        return "nccl" if use_cuda and not gpus_shared else "gloo"
    if backend == "nccl":
        if not use_cuda:
            raise TopologyError("backend=nccl needs CUDA devices; use backend=gloo on CPU")
        if gpus_shared:
            raise TopologyError(
                f"{local_world} processes on this node share {gpus} GPU(s): NCCL cannot put two ranks on one GPU "
                f"('Duplicate GPU detected'). Start at most --nproc_per_node={gpus}, or use backend=gloo "
                "(or auto) to share GPUs")
    return backend


def _gpu_identity(index: int) -> str:
    """This host and the GPU's UUID: two ranks with the same identity share a GPU, whatever
    CUDA_VISIBLE_DEVICES each of them sees (srun --gpus-per-task gives each its own)."""
    props = torch.cuda.get_device_properties(index)
    return f"{socket.gethostname()}/{getattr(props, 'uuid', index)}"


def _gpus_shared(store, rank: int, world: int, identity: str, timeout: float) -> bool:
    """Whether two ranks hold the same GPU, from each rank's identity in the store."""
    store.set(f"gpu/{rank}", identity)
    keys = [f"gpu/{r}" for r in range(world)]
    store.wait(keys, timedelta(seconds=timeout))
    identities = [store.get(k).decode() for k in keys]
    return len(set(identities)) < len(identities)


def setup(replicas: int = 1, backend: str = "auto", device: str = "auto", timeout: float = 1800.0) -> Topology:
    """graft's trainer: read torchrun's environment, pick backend and device, start the process
    group (over every network) and graft's groups."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
    if world % replicas:
        n = max(2, world // replicas)
        raise TopologyError(
            f"world size {world} is not a multiple of data_parallel={replicas}: start networks x data_parallel "
            f"processes (e.g. {n} networks: --nproc_per_node={n * replicas} on one node)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TopologyError("device=cuda but no CUDA device is visible")
    dev = torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    gpus = torch.cuda.device_count() if use_cuda else 0
    pick_backend(backend, use_cuda, False, gpus, local_world)  # an impossible choice fails before any wait
    if world == 1:
        return Topology(rank, 1, local_rank, local_world, replicas, "none", dev, timeout)
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout)))
    # torchrun --max-restarts can hand a restarted group the store of the attempt before, whose
    # stale keys deadlock gloo's connection setup now and then: give each attempt its own keys.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"graft/attempt{attempt}/", store)
    shared = use_cuda and _gpus_shared(store, rank, world, _gpu_identity(dev.index), timeout)
    backend = pick_backend(backend, use_cuda, shared, gpus, local_world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout), device_id=dev if backend == "nccl" else None)
    topo = Topology(rank, world, local_rank, local_world, replicas, backend, dev, timeout, store=store,
                    nccl_cuda=backend == "nccl")
    return _with_groups(topo)


def _backends(config: str) -> dict[str, str]:
    """``"cpu:gloo,cuda:nccl"`` -> {"cpu": "gloo", "cuda": "nccl"}; ``"nccl"`` -> {"cuda": "nccl"}."""
    if ":" not in config:
        return {"cuda": config} if config == "nccl" else {"cpu": config}
    return dict(part.split(":", 1) for part in config.split(","))


def script_device(backends: dict[str, str]) -> torch.device:
    """The CUDA device of this rank in a script's process group: the one the group is bound to,
    else the one set current, else ``cuda:LOCAL_RANK`` (a script that moved its model with
    ``.to(f"cuda:{local_rank}")`` and never called set_device); the CPU without NCCL."""
    if backends.get("cuda") != "nccl" or not torch.cuda.is_available():
        return torch.device("cpu")
    bound = getattr(dist.group.WORLD, "bound_device_id", None)
    if bound is not None:
        return bound
    local = _env_int("LOCAL_RANK", 0) % torch.cuda.device_count()
    current = torch.cuda.current_device()
    return torch.device("cuda", current if current != 0 or local == 0 else local)


def from_process_group(replicas: int = 1, timeout: float = 300.0) -> Topology:
    """The Topology of a default process group the caller started over every network.

    Ranks r*replicas .. (r+1)*replicas-1 form network r. This creates graft's groups: every rank
    must call it, and DDP must use ``topology.network_group``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % replicas:
        raise TopologyError(f"world size {world} is not a multiple of data_parallel={replicas}")
    config = dist.get_backend_config()
    backends = _backends(config)
    dev = script_device(backends)
    topo = Topology(rank, world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world), replicas,
                    config, dev, timeout, store=dist.distributed_c10d._get_default_store(),
                    nccl_cuda=backends.get("cuda") == "nccl")
    return _with_groups(topo) if world > 1 else topo


def _with_groups(topo: Topology) -> Topology:
    """Create each network's group (its replicas; one rank with data_parallel=1, so that DDP
    given it never spans networks) and the leaders' group (the ring). Every rank takes part in
    creating every group, in one order."""
    wait = timedelta(seconds=topo.timeout)  # a group does not inherit the default group's timeout
    for k in range(topo.networks):
        group = dist.new_group(list(range(k * topo.replicas, (k + 1) * topo.replicas)), timeout=wait)
        if k == topo.network:
            topo.network_group = group
    if topo.replicas == 1:
        topo.leader_group = dist.group.WORLD
    else:
        group = dist.new_group([topo.leader_rank(k) for k in range(topo.networks)], timeout=wait)
        topo.leader_group = group if topo.is_leader else None
    return topo


def launched() -> bool:
    """Whether this process is a worker of ``graft-run SCRIPT.py``."""
    return "GRAFT_STORE" in os.environ


_LAUNCHED: Topology | None = None  # built once per process: groups on the same store keys cannot be rebuilt


def from_launcher(timeout: float = 300.0) -> Topology:
    """A worker of ``graft-run SCRIPT.py``: graft's own groups over gloo, apart from whatever
    process group the script starts for its network. Built once per process (a second Grafter
    shares it). Collective: every rank of graft's world."""
    global _LAUNCHED
    if _LAUNCHED is not None:
        return _LAUNCHED
    rank, world, replicas = _env_int("GRAFT_RANK", 0), _env_int("GRAFT_WORLD", 1), _env_int("GRAFT_REPLICAS", 1)
    host, _, port = os.environ["GRAFT_STORE"].rpartition(":")
    wait = timedelta(seconds=timeout)
    hosted = os.environ.get("GRAFT_STORE_HOSTED") == "1"  # torchrun's agent serves it; else rank 0 does
    store = dist.TCPStore(host, int(port), world, is_master=not hosted and rank == 0, timeout=wait,
                          wait_for_workers=False)
    store = dist.PrefixStore(f"graft/attempt{os.environ.get('GRAFT_ATTEMPT', '0')}/", store)
    topo = Topology(rank, world, _env_int("GRAFT_LOCAL_RANK", 0), _env_int("GRAFT_LOCAL_WORLD", world), replicas,
                    "gloo", torch.device("cpu"), timeout, store=store)
    gloo = dist.ProcessGroupGloo
    topo.network_group = gloo(dist.PrefixStore(f"network{topo.network}/", store), topo.replica, replicas, wait)
    if topo.is_leader:
        topo.leader_group = gloo(dist.PrefixStore("leaders/", store), topo.network, topo.networks, wait)
    _LAUNCHED = topo
    atexit.register(_release_launched)
    return topo


def _release_launched() -> None:
    """At exit, drop graft-run's groups and store while Python still runs, so that their gloo
    threads are joined by their destructors now. Left to the interpreter's own teardown, a
    worker has died in std::terminate ("terminate called without an active exception", SIGABRT)
    after its script had finished, about once in 20 runs on a loaded machine."""
    global _LAUNCHED
    topo, _LAUNCHED = _LAUNCHED, None
    if topo is not None:
        topo.leader_group = topo.network_group = topo.store = None
        gc.collect()


def teardown(topo: Topology, failed: bool = False) -> None:
    """Destroy the process group. After a failure a peer may be gone: the teardown (an abort of
    NCCL's communicators in torch >= 2.6) then runs in a daemon thread given a few seconds, so
    that it can never hold the process's exit."""
    if not (topo.distributed and dist.is_initialized()):
        return
    if not failed:
        dist.destroy_process_group()
        return
    import threading

    closing = threading.Thread(target=dist.destroy_process_group, name="graft-teardown", daemon=True)
    closing.start()
    closing.join(timeout=10)


# --------------------------------------------------------------------------------------------
# Check-in at a point of the run
# --------------------------------------------------------------------------------------------


def arrive(topo: Topology, tag: str, timeout: float | None = None, scope: str = "") -> None:
    """Wait until every rank has reached ``tag``; name the ranks that do not.

    Uses the store, so a dead peer is named instead of surfacing as a collective's anonymous
    timeout, and a peer waiting at another point (networks resumed from different epochs) is
    named at once, with both points, instead of after the timeout. The store is polled between
    short sleeps rather than waited on in one blocking call, which no signal interrupts: a
    SIGTERM (torchrun stopping the group, a scheduler's preemption) is handled within 0.1 s.
    ``scope`` keeps the keys of one user of the store (a second Grafter) apart from another's.
    """
    if not topo.distributed:
        return
    timeout = topo.timeout if timeout is None else timeout
    store = dist.PrefixStore(scope, topo.store) if scope else topo.store
    key = f"arrive/{tag}/".__add__
    keys = [key(str(r)) for r in range(topo.world)]
    start = time.monotonic()
    try:
        store.set(key(str(topo.rank)), "1")
        store.set(f"waiting/{topo.rank}", tag)
        while not store.check(keys):
            waited = time.monotonic() - start
            missing = [r for r in range(topo.world) if not store.check([key(str(r))])]
            elsewhere = _waiting_elsewhere(topo, store, tag, missing)
            if elsewhere:
                raise PeerTimeout(f"rank {topo.rank}: network {topo.network} waits at {tag}, {elsewhere}: they "
                                  "started from different points (resumed from different epochs, a graft "
                                  "skipped on one of them, or another grafting.every_steps) and would wait for "
                                  "each other forever")
            if waited >= timeout:
                break
            time.sleep(min(0.1, 0.001 + waited / 10, timeout - waited))  # late by at most 10% of the wait
        else:
            store.set(f"waiting/{topo.rank}", "")
            return
    except RuntimeError as e:  # the store's own errors (DistError): it is gone, with its host
        if not is_communication_failure(e):
            raise
        missing = [r for r in range(topo.world) if r != topo.rank]
    names = ", ".join(f"network {r // topo.replicas} (rank {r})" for r in missing) or "a peer"
    raise PeerTimeout(f"rank {topo.rank}: {names} did not arrive at {tag} within {timeout:g} s; "
                      "it probably stopped: see its log (or it needs longer: raise the timeout setting)")


def _waiting_elsewhere(topo: Topology, store, tag: str, missing: list[int]) -> str:
    """'network 1 (rank 1) at epoch 2 graft' for each missing rank that waits at a point this rank
    never reached: neither can go on without the other.

    ``missing`` may be stale: a peer can arrive at ``tag`` and move on to its next point after it
    was listed. A peer sets its arrival key before its next waiting point, so one re-read of that
    key after its point tells a peer that passed ``tag`` from one that never reached it."""
    found = []
    for r in missing:
        if not store.check([f"waiting/{r}"]):
            continue
        theirs = store.get(f"waiting/{r}").decode()
        passed_ours = store.check([f"arrive/{tag}/{r}"])  # read after theirs: see the docstring
        if theirs and theirs != tag and not passed_ours and not store.check([f"arrive/{theirs}/{topo.rank}"]):
            found.append(f"network {r // topo.replicas} (rank {r}) at {theirs}")
    return ", ".join(found)


# --------------------------------------------------------------------------------------------
# Gathers
# --------------------------------------------------------------------------------------------


def gather_rows(topo: Topology, row: Tensor) -> Tensor:
    """Leaders: every network's ``row`` (float64, CPU), stacked in network order."""
    if not topo.distributed or topo.networks == 1:
        return row.unsqueeze(0)
    dev_row = row.to(topo.comm_device(topo.device))
    rows = [torch.empty_like(dev_row) for _ in range(topo.networks)]
    with collectives():
        dist.all_gather(rows, dev_row, group=topo.leader_group)
    return torch.stack(rows).cpu()


def all_gather_objects(topo: Topology, obj, leaders_only: bool = True) -> list:
    """A picklable object from every network's leader (or every rank), in rank order. Goes
    through tensors (a pickle's bytes, padded to the longest), so the leaders' gather works on
    any of graft's groups, those graft-run builds apart included. Every rank's goes through the
    default group, which spans graft's world only outside graft-run SCRIPT (there it is the
    script's own, if any): refused there."""
    size = topo.networks if leaders_only else topo.world
    if not topo.distributed or size == 1:
        return [obj]
    if not leaders_only and topo is _LAUNCHED:
        raise RuntimeError("all_gather_objects(leaders_only=False) under graft-run SCRIPT: the default process "
                           "group is the script's, not graft's world")
    group = topo.leader_group if leaders_only else None
    device = topo.comm_device(topo.device)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    with collectives():
        lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64, device=device), group=group)
        longest = max(int(n) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:data.numel()] = data
        parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
    return [pickle.loads(p[:int(n)].cpu().numpy().tobytes()) for p, n in zip(parts, lengths)]


@contextlib.contextmanager
def together(topo: Topology, what: str, leaders_only: bool = False):
    """Run the block on every rank (or leader); when it fails on one of them, fail on all, with
    one PeerFailed that names the ranks that failed and their reasons, alike on every rank (so it
    is said once), and whether a rerun can help. A problem of one network only (a damaged file of
    its own) then stops every rank at once, instead of leaving the others waiting in the next
    collective. Collective: every rank (or the leaders)."""
    problem = None
    try:
        yield
    except UserError as e:
        problem = e
    mine = None if problem is None else (str(problem), problem.resumable)
    problems = all_gather_objects(topo, mine, leaders_only)
    by_message: dict[str, list[int]] = {}
    for r, p in enumerate(problems):
        if p is not None:
            by_message.setdefault(p[0], []).append(topo.leader_rank(r) if leaders_only else r)
    if by_message:
        resumable = all(p[1] for p in problems if p is not None)
        raise PeerFailed("; ".join(f"{_who(topo, ranks)} cannot {what}: {message}"
                                   for message, ranks in by_message.items()), resumable) from problem


def _who(topo: Topology, ranks: list[int]) -> str:
    networks = ", ".join(str(n) for n in dict.fromkeys(r // topo.replicas for r in ranks))
    if len(ranks) == 1:
        return f"network {networks} (rank {ranks[0]})"
    return f"networks {networks} (ranks {', '.join(map(str, ranks))})"
