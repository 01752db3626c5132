"""The graft step: weights move between networks and are blended by the spec's rule.

Per graft:
1. every rank checks in (``dist.arrive``), so a rank that never arrives is named;
2. each network's leader (replica 0) scores its layers (the spec's criterion) and the leaders
   all-gather a head: a finite flag, checksums of the model's layout, of its layer plan and of
   the spec. NaN/Inf, another architecture or other settings stop everyone before anything
   moves, naming the network and the differing setting;
3. the leaders gather every network's scores (so each can log the whole table) and fetch the
   partner's weights, flattened into one buffer per dtype: from one peer by a ring shift (send
   to the networks whose peer this one is, receive from its own; batch_isend_irecv on NCCL) or
   by an all-gather; the population's mean by one all-reduce;
4. each leader blends (graft.rules) and, in hybrid mode, broadcasts the result to its replicas.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import core, rules
from .dist import Topology, all_gather_objects, arrive, collectives, gather_rows
from .errors import GraftError

EXCHANGES = ("auto", "ring", "all_gather")


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
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device


# --------------------------------------------------------------------------------------------
# Transports (leaders)
# --------------------------------------------------------------------------------------------


def _on_comm_device(topo: Topology, transport):
    """Run ``transport(topo, flat, ...)`` on the device the leaders' group carries, staging
    through host memory where it cannot carry the state's device (gloo and CUDA tensors)."""
    def staged(topo: Topology, own: FlatState, *args):
        device, comm = own.device, topo.comm_device(own.device)
        if comm == device:
            return transport(topo, own, *args)
        got, received = transport(topo, own.to(comm), *args)
        return got.to(device), received
    return staged


def fetch_peer(topo: Topology, own: FlatState, partner: rules.Partner, mode: str = "auto") -> tuple[FlatState, int]:
    """Leaders: the buffers of this network's peer under ``partner``. Returns (its buffers,
    bytes received)."""
    return _on_comm_device(topo, _fetch_peer)(topo, own, partner, mode)


def _fetch_peer(topo: Topology, own: FlatState, partner: rules.Partner, mode: str) -> tuple[FlatState, int]:
    n, k = topo.networks, topo.network
    source = partner.peer(k, n)
    targets = [j for j in range(n) if partner.peer(j, n) == k]  # the networks whose peer this one is
    group, peer, received = topo.leader_group, own.empty_like(), 0
    with collectives("the weight exchange with the other networks"):
        for dt, buf in own.buffers.items():
            if mode == "all_gather":
                parts = [torch.empty_like(buf) for _ in range(n)]
                dist.all_gather(parts, buf, group=group)
                peer.buffers[dt] = parts[source]
                received += (n - 1) * buf.numel() * buf.element_size()
                continue
            if buf.device.type == "cuda":  # NCCL: one batch, or two ranks that both send first deadlock
                ops = [dist.P2POp(dist.isend, buf, group=group, group_peer=j) for j in targets]
                ops.append(dist.P2POp(dist.irecv, peer.buffers[dt], group=group, group_peer=source))
                requests = dist.batch_isend_irecv(ops)
            else:  # gloo: plain isend/irecv (batch_isend_irecv has hung on gloo in some releases)
                requests = [dist.isend(buf, group=group, group_dst=j) for j in targets]
                requests.append(dist.irecv(peer.buffers[dt], group=group, group_src=source))
            for request in requests:
                request.wait()
            received += buf.numel() * buf.element_size()
    return peer, received


def population_mean(topo: Topology, own: FlatState) -> tuple[FlatState, int]:
    """Leaders: the mean of every network's floating buffers (its own included; integer buffers
    keep this network's values). Returns (the mean, bytes received by the all-reduce)."""
    return _on_comm_device(topo, _population_mean)(topo, own)


def _population_mean(topo: Topology, own: FlatState) -> tuple[FlatState, int]:
    mean, received = FlatState(dict(own.buffers), own.layout), 0
    with collectives("the all-reduce of the networks' weights"):
        for dt, buf in own.buffers.items():
            if not dt.is_floating_point:
                continue
            total = buf.to(torch.float32) if dt in (torch.float16, torch.bfloat16) else buf.clone()
            dist.all_reduce(total, group=topo.leader_group)
            mean.buffers[dt] = total.div_(topo.networks).to(dt)
            received += 2 * buf.numel() * buf.element_size()  # a ring all-reduce moves about twice the data
    return mean, received


# --------------------------------------------------------------------------------------------
# The graft step
# --------------------------------------------------------------------------------------------


@dataclass
class GraftResult:
    """What one graft did: the partner, the time and bytes it took, and (on each network's
    leader) per layer the scores, alpha and peer distance."""

    peer: int | None                    # the network blended in; None: the population's mean
    seconds: float
    bytes: int
    table: Tensor                       # (networks, layers) scores, before grafting
    layers: tuple[str, ...]
    report: rules.GraftReport | None    # None on non-leader replicas
    identical: bool = False             # the partner's weights equalled this network's: the graft changed nothing

    @property
    def mean_alpha(self) -> float | None:
        return None if self.report is None else self.report.mean_alpha()

    @property
    def mean_peer_distance(self) -> float | None:
        return None if self.report is None else self.report.mean_peer_distance()

    def records(self) -> list[dict]:
        """Per layer: layer, the scores, alpha, peer_distance ([] on non-leaders)."""
        return [] if self.report is None else self.report.as_records()


def _checksum(value) -> float:
    """A CRC of ``repr(value)``, exact in a float64."""
    return float(zlib.crc32(repr(value).encode()))


def graft_step(topo: Topology, state: dict[str, Tensor], plan: core.GraftPlan, spec: rules.GraftSpec, *,
               when: str, exchange: str = "auto", scope: str = "") -> tuple[dict[str, Tensor], GraftResult]:
    """Graft this network's ``state`` under ``spec``. Collective: every rank calls it.

    ``when`` names the graft in messages and check-in keys ("epoch 3", "step 500"): each graft
    of a run needs its own (``scope``: a prefix for the keys of another Grafter). Returns the new
    state (new tensors; ``state`` is not modified) and a
    GraftResult. Raises GraftError on every rank, before any weight is blended, when any
    network's weights hold NaN or Inf (naming the network and, on that network, the layer), when
    the networks' models differ in keys, shapes or dtypes, or when their plans or settings differ.
    """
    start = time.perf_counter()
    arrive(topo, f"{when} graft", scope=scope)                                   # every rank
    peer = spec.partner_rule.peer(topo.network, topo.networks)
    new_state, report, table, received, refusal, identical = state, None, torch.zeros(0), 0, None, False
    if topo.is_leader:
        criterion = spec.criterion_rule
        scores = criterion.scores(state, plan, spec).to(torch.float64).cpu()
        refusal = _refusal(topo, state, plan, spec, scores, when, exchange)      # leaders
        if refusal is None:
            table = gather_rows(topo, scores)                                    # leaders
            if topo.networks == 1:
                peer_state, peer_scores = state, table[0]
            elif peer is None:
                mean, received = population_mean(topo, FlatState.from_state(state))  # leaders
                peer_state = mean.to_state()
                peer_scores = criterion.scores(peer_state, plan, spec).to(torch.float64).cpu()
            else:
                got, received = fetch_peer(topo, FlatState.from_state(state), spec.partner_rule, exchange)  # leaders
                peer_state, peer_scores = got.to_state(), table[peer]
            new_state, report = rules.blend_with_scores(state, peer_state, plan, table[topo.network], peer_scores,
                                                        spec)
            # The peer distances are 0 exactly where the layers are equal: no second pass over the weights.
            identical = topo.networks > 1 and all(r.peer_distance == 0 for r in report.layers)
    if topo.replicas > 1:
        refused_by_leader = _leader_refused(topo, refusal is not None, when)     # a network's replicas
        refusal = refusal if refusal is not None else refused_by_leader
    if refusal is not None:
        raise refusal
    if topo.replicas > 1:
        new_state = _from_leader(topo, new_state)                                # a network's replicas
    result = GraftResult(peer, time.perf_counter() - start, received, table, plan.layers, report, identical)
    return new_state, result


def _refusal(topo: Topology, state: dict[str, Tensor], plan: core.GraftPlan, spec: rules.GraftSpec,
             scores: Tensor, when: str, exchange: str = "auto") -> GraftError | None:
    """Whether every network can graft: finite weights, one architecture, one plan, one spec.
    Collective: leaders (one small all_gather of fixed size, so that every network refuses
    together or none does, before any gather whose size depends on the model).

    The refusal is worded from what the leaders gathered, against network 0, so it is the same
    line on every leader (said once, by rank 0, and once by graft-run)."""
    bad_layer = spec.criterion_rule.first_non_finite(state, plan, scores)
    shapes = core.layout(state)
    layout = _checksum(shapes)
    transport = "ring" if exchange == "auto" else exchange
    head = torch.tensor([0.0 if bad_layer is None else 1.0, layout, _checksum((plan.layers, plan.follows)),
                         spec.fingerprint(), _checksum(transport)], dtype=torch.float64)
    heads = gather_rows(topo, head)
    message = None
    if bool(heads[:, 0].any()):
        layers = all_gather_objects(topo, bad_layer)                             # leaders
        bad = ", ".join(f"network {k}" + (f" (layer {layer!r})" if layer is not None else "")
                        for k, layer in enumerate(layers) if heads[k, 0])
        message = f"NaN or Inf weights in {bad}; nobody grafts, the weights stay as they were"
    elif other := _differing(heads, 1):
        layouts = all_gather_objects(topo, shapes)                               # leaders
        message = (f"{_hold(other)} a model with other keys, shapes or dtypes than network 0's "
                   f"({core.layout_difference(layouts[0], layouts[other[0]], ('network 0', f'network {other[0]}'))}); "
                   "grafting needs one architecture")
    elif _differing(heads, 3):  # before the plan, which the criterion shapes (reference groups otherwise)
        settings = all_gather_objects(topo, spec.settings())                     # leaders
        for k, theirs in enumerate(settings[1:], start=1):
            diff = rules.differences(settings[0], theirs, "in network 0", f"in network {k}")
            if diff:
                message = (f"network {k} grafts with other settings than network 0 ({'; '.join(diff)}); every "
                           "network must graft with the same settings")
                break
    elif other := _differing(heads, 4):
        modes = all_gather_objects(topo, transport)                              # leaders
        message = (f"{_hold(other)} another exchange than network 0 (grafting.exchange: {modes[0]!r} in network 0, "
                   f"{modes[other[0]]!r} in network {other[0]})")
    elif other := _differing(heads, 2):
        message = (f"{_hold(other)} other layers to graft than network 0 (another plan: a model with other module "
                   "types?)")
    if message is None:
        return None
    error = GraftError(f"{when}: {message}")
    error.everywhere = True  # the same words on every leader
    return error


def _differing(heads: Tensor, column: int) -> list[int]:
    """The networks whose head differs from network 0's in ``column``."""
    return [int(i) for i in (heads[:, column] != heads[0, column]).nonzero().flatten()]


def _hold(ks: list[int]) -> str:
    return f"network {ks[0]} holds" if len(ks) == 1 else "networks " + ", ".join(map(str, ks)) + " hold"


def _leader_refused(topo: Topology, refused: bool, when: str) -> GraftError | None:
    """The leader tells its replicas whether it refused, before they wait for weights that would
    never come. Collective: a network's replicas."""
    status = torch.tensor([refused], dtype=torch.uint8, device=topo.comm_device(topo.device))
    with collectives():
        dist.broadcast(status, group=topo.network_group, group_src=0)
    if refused or not bool(status.item()):
        return None
    leader = topo.leader_rank(topo.network)
    error = GraftError(f"rank {topo.rank}, network {topo.network}: {when}: rank {leader} refused to graft (see its "
                       "error); the weights stay as they were")
    error.everywhere = True  # every leader refused alike, rank 0 among them: it says why, this rank need not
    return error


def _from_leader(topo: Topology, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The leader's blended weights, on every replica of the network. Collective: a network's replicas."""
    flat = FlatState.from_state(state)
    comm = flat.to(topo.comm_device(flat.device))
    with collectives():
        for buf in comm.buffers.values():
            dist.broadcast(buf, group=topo.network_group, group_src=0)
    return comm.to(flat.device).to_state()  # views of the fresh broadcast buffers
