"""The ring: which rank is which network, and the weight exchange between networks.

Every network is its own torchrun process (or, in hybrid mode, a group of ``data_parallel``
processes trained with DDP). At each epoch end network k grafts from network k-1 (mod N), using
k-1's weights as they were at the end of that epoch's training. This module knows nothing of
data, optimizers or logging: it moves tensors and names the peers that fail to show up.

Exchange, per graft:
1. every rank checks in at the epoch boundary through the rendezvous store, so a rank that
   never arrives is named (network and rank) when the timeout runs out;
2. the replica-0 rank of each network ("leader") all-gathers a finite flag and a checksum of
   its model's layout (so NaN/Inf, or another architecture, stops everyone before anything
   moves), then the entropy of every layer, so alpha needs no second exchange and every network
   can log the whole table;
3. the leaders move the weights, flattened into one buffer per dtype: by default a ring shift
   (send to k+1, receive from k-1: one model of traffic per rank; batch_isend_irecv on NCCL,
   plain isend/irecv on gloo), or an all-gather (N-1 models per rank) on request;
4. each leader blends (graft.core) and, in hybrid mode, broadcasts the result to its replicas.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from . import core
from .errors import UserError


class TopologyError(UserError, RuntimeError):
    """The processes cannot be arranged as asked (wrong world size, GPUs shared by NCCL...)."""


class PeerTimeout(UserError, RuntimeError):
    """A rank did not reach the epoch boundary in time."""


class GraftError(UserError, RuntimeError):
    """Grafting refused (NaN or Inf weights in some network)."""


class PeerLost(UserError, RuntimeError):
    """A collective failed: another rank went away (its own error says why)."""


class PeerFailed(UserError, RuntimeError):
    """Another rank failed inside ``together``; names that rank and its error."""


@contextlib.contextmanager
def collectives():
    """Code that talks to the other ranks. gloo reports a peer that went away as a plain
    RuntimeError (NCCL as a DistError); either leaves here as PeerLost, so that the entry point
    recognises it by its type. Usable as a decorator."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, (UserError, torch.OutOfMemoryError)) or not dist.is_initialized():
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise PeerLost(f"communication with the other ranks failed ({type(e).__name__}: {first}); a peer "
                       "probably stopped first: see its error. Rerun the same command to resume.") from None


@dataclass
class Topology:
    """Where this process stands: one place that knows rank, world, network and device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    replicas: int = 1
    backend: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = 1800.0
    network_group: object = None   # this network's replicas (DDP, broadcast)
    leader_group: object = None    # replica 0 of every network (the ring)

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
    def peer(self) -> int:
        """The network this one grafts from."""
        return (self.network - 1) % self.networks

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def leader_rank(self, network: int) -> int:
        return network * self.replicas

    def describe(self) -> str:
        ring = "none (one network)"
        if self.networks > 1:  # weights flow along the arrows: network k grafts from k-1
            ring = " -> ".join(str(k) for k in [*range(self.networks), 0]) + " (network k grafts from k-1)"
        return (f"topology: {self.networks} network(s) x {self.replicas} replica(s) = world {self.world}; "
                f"backend {self.backend}; device {self.device.type}; ring: {ring}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def pick_backend(backend: str, use_cuda: bool, local_world: int, gpus: int) -> str:
    """``auto``: NCCL when every process on the node has a GPU of its own, else gloo (CPU, or
    networks sharing GPUs). An explicit choice that cannot work is refused, saying why."""
    if backend == "auto":
        return "nccl" if use_cuda and local_world <= gpus else "gloo"
    if backend == "nccl":
        if not use_cuda:
            raise TopologyError("backend=nccl needs CUDA devices; use backend=gloo on CPU")
        if local_world > gpus:
            raise TopologyError(
                f"{local_world} processes on this node but {gpus} GPU(s): NCCL cannot put two ranks on one GPU "
                f"('Duplicate GPU detected'). Start at most --nproc_per_node={gpus}, or use backend=gloo "
                "(or auto) to share GPUs")
    return backend


def setup(replicas: int = 1, backend: str = "auto", device: str = "auto",
          timeout: float = 1800.0) -> Topology:
    """Read torchrun's environment, pick backend and device, start the process group."""
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
    backend = pick_backend(backend, use_cuda, local_world, torch.cuda.device_count() if use_cuda else 0)
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    topo = Topology(rank, world, local_rank, local_world, replicas, backend if world > 1 else "none",
                    dev, timeout)
    if world == 1:
        return topo
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout)))
    # torchrun --max-restarts can hand a restarted group the store of the attempt before, whose
    # stale keys deadlock gloo's connection setup now and then: give each attempt its own keys.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"graft/attempt{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout), device_id=dev if backend == "nccl" else None)
    return _with_groups(topo)


def from_process_group(replicas: int = 1, timeout: float = 1800.0) -> Topology:
    """The Topology of a process group the caller started (``dist.init_process_group``).

    Ranks r*replicas .. (r+1)*replicas-1 form network r. With replicas > 1 this creates the
    networks' groups: every rank must call it, and DDP must use ``topology.network_group``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % replicas:
        raise TopologyError(f"world size {world} is not a multiple of data_parallel={replicas}")
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    topo = Topology(rank, world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world), replicas,
                    backend, dev, timeout)
    return _with_groups(topo) if world > 1 else topo


def _with_groups(topo: Topology) -> Topology:
    """Create each network's group (its replicas) and the leaders' group (the ring)."""
    if topo.replicas > 1:
        # Every rank must take part in creating every group; a group does not inherit the
        # default group's timeout (it would wait 30 min for a stopped peer).
        wait = timedelta(seconds=topo.timeout)
        for k in range(topo.networks):
            group = dist.new_group(list(range(k * topo.replicas, (k + 1) * topo.replicas)), timeout=wait)
            if k == topo.network:
                topo.network_group = group
        topo.leader_group = dist.new_group([topo.leader_rank(k) for k in range(topo.networks)], timeout=wait)
    else:
        topo.leader_group = dist.group.WORLD
    return topo


def teardown(topo: Topology) -> None:
    if topo.distributed and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Check-in at the epoch boundary
# --------------------------------------------------------------------------------------------


def arrive(topo: Topology, tag: str, timeout: float | None = None) -> None:
    """Wait until every rank has reached ``tag``; on timeout name the ranks that did not.

    Uses the rendezvous store, so a dead peer is reported by name instead of surfacing as a
    collective's anonymous timeout. The store is polled between short sleeps rather than
    waited on in one blocking call, which no signal interrupts: a SIGTERM (torchrun stopping
    the group, a scheduler's preemption) is handled within 0.1 s.
    """
    if not topo.distributed:
        return
    timeout = topo.timeout if timeout is None else timeout
    store = dist.distributed_c10d._get_default_store()  # already one key space per attempt
    key = f"arrive/{tag}/".__add__
    keys = [key(str(r)) for r in range(topo.world)]
    start = time.monotonic()
    try:
        store.set(key(str(topo.rank)), "1")
        while not store.check(keys):
            waited = time.monotonic() - start
            if waited >= timeout:
                missing = [r for r in range(topo.world) if not store.check([key(str(r))])]
                break
            time.sleep(min(0.1, 0.001 + waited / 10, timeout - waited))  # late by at most 10% of the wait
        else:
            return
    except RuntimeError:  # the store's own errors (DistError): it is gone, with its host, torchrun's agent
        missing = [r for r in range(topo.world) if r != topo.rank]
    names = ", ".join(f"network {r // topo.replicas} (rank {r})" for r in missing) or "a peer"
    raise PeerTimeout(f"rank {topo.rank}: {names} did not arrive at {tag} within {timeout:g} s; "
                      "it probably died: see its log (or it needs longer: timeout=...). Rerun the same command "
                      "to resume.")


# --------------------------------------------------------------------------------------------
# Flat buffers
# --------------------------------------------------------------------------------------------


@dataclass
class FlatState:
    """A state dict as one contiguous buffer per dtype, plus where each tensor lives in it."""

    buffers: dict[torch.dtype, Tensor]
    layout: list[tuple[str, torch.dtype, int, torch.Size]]

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> FlatState:
        groups: dict[torch.dtype, list[Tensor]] = {}
        layout, offsets = [], {}
        for key, t in state.items():
            off = offsets.get(t.dtype, 0)
            layout.append((key, t.dtype, off, t.shape))
            offsets[t.dtype] = off + t.numel()
            groups.setdefault(t.dtype, []).append(t.detach().reshape(-1))
        return cls({dt: torch.cat(ts) for dt, ts in groups.items()}, layout)

    def to(self, device) -> FlatState:
        return FlatState({dt: b.to(device) for dt, b in self.buffers.items()}, self.layout)

    def empty_like(self) -> FlatState:
        return FlatState({dt: torch.empty_like(b) for dt, b in self.buffers.items()}, self.layout)

    def to_state(self) -> dict[str, Tensor]:
        return {key: self.buffers[dt][off:off + shape.numel()].view(shape)
                for key, dt, off, shape in self.layout}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def exchange_weights(topo: Topology, own: FlatState, mode: str = "auto") -> tuple[FlatState, int]:
    """Leaders only: receive the peer network's buffers. Returns (peer buffers, bytes received).

    gloo moves CPU tensors only (its send/recv and all_gather refuse or mangle CUDA ones), so on
    gloo the buffers travel through host memory and come back on the state's device.
    """
    mode = "ring" if mode == "auto" else mode
    n, k = topo.networks, topo.network
    device = next(iter(own.buffers.values())).device
    if topo.backend == "gloo" and device.type != "cpu":
        peer, received = exchange_weights(topo, own.to("cpu"), mode)
        return peer.to(device), received
    peer = own.empty_like()
    received = 0
    for dt, buf in own.buffers.items():
        if mode == "all_gather":
            parts = [torch.empty_like(buf) for _ in range(n)]
            dist.all_gather(parts, buf, group=topo.leader_group)
            peer.buffers[dt] = parts[topo.peer]
            received += (n - 1) * buf.numel() * buf.element_size()
        else:  # ring shift: send to k+1, receive from k-1
            send_to, recv_from = topo.leader_rank((k + 1) % n), topo.leader_rank(topo.peer)
            if topo.backend == "nccl":
                # In the leaders' group (peers are still global ranks): batch_isend_irecv needs every
                # rank of its group to take part when it is the group's first collective, and in
                # hybrid mode only the leaders exchange.
                group = topo.leader_group
                ops = [dist.P2POp(dist.isend, buf, send_to, group),
                       dist.P2POp(dist.irecv, peer.buffers[dt], recv_from, group)]
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            else:  # gloo: plain isend/irecv (batch_isend_irecv has hung on gloo in some releases)
                reqs = [dist.isend(buf, send_to), dist.irecv(peer.buffers[dt], recv_from)]
                for req in reqs:
                    req.wait()
            received += buf.numel() * buf.element_size()
    return peer, received


# --------------------------------------------------------------------------------------------
# The graft step
# --------------------------------------------------------------------------------------------


@dataclass
class GraftResult:
    """What one graft did: the peer network, the time it took and the bytes received, and (on
    each network's leader) per layer the entropies, alpha and peer distance."""

    peer: int
    seconds: float
    bytes: int
    table: Tensor                       # (networks, layers) entropies, before grafting
    layers: tuple[str, ...]
    report: core.GraftReport | None     # None on non-leader replicas

    @property
    def mean_alpha(self) -> float | None:
        return None if self.report is None else self.report.mean_alpha()

    @property
    def mean_peer_distance(self) -> float | None:
        return None if self.report is None else self.report.mean_peer_distance()

    def records(self) -> list[dict]:
        """Per layer: layer, entropy_self, entropy_peer, alpha, peer_distance ([] on non-leaders)."""
        return [] if self.report is None else self.report.as_records()


def _layout_id(state: dict[str, Tensor]) -> float:
    """A checksum of the keys, shapes and dtypes (exact in a float64), to tell whether all
    networks hold the same architecture before any weight moves."""
    layout = [(k, tuple(t.shape), str(t.dtype)) for k, t in state.items()]
    return float(zlib.crc32(repr(layout).encode()))


@collectives()
def graft_step(topo: Topology, state: dict[str, Tensor], plan: core.GraftPlan, *, when: str,
               level: str = "layer", A: float = 0.4, c: float = 500.0, bins: int = 10,
               exchange: str = "auto") -> tuple[dict[str, Tensor], GraftResult]:
    """Graft this network's ``state`` from its ring peer. Collective: every rank calls it.

    ``when`` names the graft in messages and check-in keys ("epoch 3", "step 500"): each graft
    of a run needs its own. Returns the new state (new tensors; ``state`` is not modified) and a
    GraftResult. Raises GraftError on every rank, before any weight is blended, when any
    network's weights hold NaN or Inf (naming the network and, on that network, the layer) or
    when the networks' models differ in keys, shapes or dtypes.

    The leaders check, exchange and blend; each network's other replicas then receive the
    blended weights from their leader (hybrid mode).
    """
    start = time.perf_counter()
    arrive(topo, f"{when} graft")                                               # every rank
    new_state, report, table, received, refusal = state, None, torch.zeros(0), 0, None
    if topo.is_leader:
        entropies = core.plan_entropies(state, plan, bins).to(torch.float64).cpu()
        refusal = _refusal(topo, state, plan, entropies, when)                  # leaders
        if refusal is None:
            table = _gather_rows(topo, entropies)                               # leaders
            flat = FlatState.from_state(state)
            peer_flat, received = exchange_weights(topo, flat, exchange) if topo.networks > 1 else (flat, 0)
            new_state, report = core.graft_with_entropies(
                state, peer_flat.to_state(), plan, table[topo.network], table[topo.peer], level, A, c)
    if topo.replicas > 1:
        refused_by_leader = _leader_refused(topo, refusal is not None, when)   # a network's replicas
        refusal = refusal if refusal is not None else refused_by_leader
    if refusal is not None:
        raise refusal
    if topo.replicas > 1:
        new_state = _from_leader(topo, new_state)                               # a network's replicas
    return new_state, GraftResult(topo.peer, time.perf_counter() - start, received, table, plan.layers, report)


def _refusal(topo: Topology, state: dict[str, Tensor], plan: core.GraftPlan, entropies: Tensor,
             when: str) -> GraftError | None:
    """Whether every network can graft: finite weights, one architecture. Collective: leaders
    (one small all_gather, so that every network refuses together or none does)."""
    bad_layer = core.first_non_finite_given(state, plan, entropies)
    head = torch.tensor([0.0 if bad_layer is None else 1.0, _layout_id(state)], dtype=torch.float64)
    heads = _gather_rows(topo, head)
    here = f"rank {topo.rank}, network {topo.network}: {when}"
    if bool(heads[:, 0].any()):
        bad = [int(i) for i in heads[:, 0].nonzero().flatten()]
        layer = f" (layer {bad_layer!r})" if bad_layer is not None else ""
        return GraftError(f"{here}: NaN or Inf weights in network(s) {bad}{layer}; nobody grafts, the last "
                          "checkpoints stay as they were")
    if bool((heads[:, 1] != head[1]).any()):
        other = [int(i) for i in (heads[:, 1] != head[1]).nonzero().flatten()]
        return GraftError(f"{here}: network(s) {other} hold a model with other keys, shapes or dtypes; grafting "
                          "needs one architecture")
    return None


def _leader_refused(topo: Topology, refused: bool, when: str) -> GraftError | None:
    """The leader tells its replicas whether it refused, before they wait for weights that would
    never come. Collective: a network's replicas."""
    leader = topo.leader_rank(topo.network)
    status = torch.tensor([refused], dtype=torch.uint8, device=topo.device if topo.backend == "nccl" else "cpu")
    dist.broadcast(status, leader, group=topo.network_group)
    if refused or not bool(status.item()):
        return None
    return GraftError(f"rank {topo.rank}, network {topo.network}: {when}: rank {leader} refused to graft (see its "
                      "error); the last checkpoints stay as they were")


def _from_leader(topo: Topology, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The leader's blended weights, on every replica of the network. Collective: a network's replicas."""
    flat = FlatState.from_state(state)
    for buf in flat.buffers.values():
        dist.broadcast(buf, topo.leader_rank(topo.network), group=topo.network_group)
    return flat.to_state()  # views of the fresh broadcast buffers


def _gather_rows(topo: Topology, row: Tensor) -> Tensor:
    """Leaders: every network's ``row`` (float64, CPU), stacked in network order."""
    if not topo.distributed:
        return row.unsqueeze(0)
    dev_row = row.to(topo.device if topo.backend == "nccl" else "cpu")  # gloo gathers CPU tensors
    rows = [torch.empty_like(dev_row) for _ in range(topo.networks)]
    dist.all_gather(rows, dev_row, group=topo.leader_group)
    return torch.stack(rows).cpu()


def all_gather_objects(topo: Topology, obj, leaders_only: bool = True) -> list:
    """Gather a picklable object from every network's leader (or every rank)."""
    if not topo.distributed:
        return [obj]
    group = topo.leader_group if leaders_only else None
    size = topo.networks if leaders_only else topo.world
    out = [None] * size
    with collectives():
        dist.all_gather_object(out, obj, group=group)
    return out


@contextlib.contextmanager
def together(topo: Topology, what: str, leaders_only: bool = False):
    """Run the block on every rank (or leader); when it fails on one of them, fail on all: the
    error where it happened, PeerFailed naming that rank elsewhere. A problem of one network only
    (a damaged file of its own) then stops every rank at once, with the reason, instead of
    leaving the others waiting in the next collective. Collective: every rank (or the leaders)."""
    problem = None
    try:
        yield
    except UserError as e:
        problem = e
    problems = all_gather_objects(topo, None if problem is None else str(problem), leaders_only)
    if problem is not None:
        raise problem
    failed = [(r, m) for r, m in enumerate(problems) if m is not None]
    if failed:
        r, message = failed[0]
        rank = topo.leader_rank(r) if leaders_only else r
        raise PeerFailed(f"network {rank // topo.replicas} (rank {rank}) cannot {what}: {message}")
