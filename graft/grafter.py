"""``graft.Grafter``: the ring's graft step as an object any torchrun training script can use.

    grafter = graft.Grafter()              # after init_process_group, or it starts the group
    for epoch in range(epochs):
        train(model)                       # the script's own loop, model, optimizer, data
        report = grafter.graft(model)      # every rank: network k blends in network k-1

One process is one network. With ``data_parallel=G`` each network is G processes trained with
DDP: create the Grafter first and give DDP ``process_group=grafter.topology.network_group``.
graft.train grafts through this same object.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from . import core, ring

EXCHANGES = ("auto", "ring", "all_gather")


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the weights, inside DistributedDataParallel or DataParallel
    (``.module``) and torch.compile (``._orig_mod``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"graft: expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class Grafter:
    """Filter grafting between the processes of a torchrun job, in place on the caller's model.

    Network k (rank k, or ranks k*G .. k*G+G-1 with ``data_parallel=G``) grafts from network
    k-1 (mod N): each layer becomes alpha * own + (1 - alpha) * peer, with
    alpha = (A/pi) * arctan(c * (H_own - H_peer)) + 0.5 and H the entropy of a ``bins``-bin
    histogram of the layer's weights. Layers are grouped from the module structure
    (``core.module_plan``): a conv or linear layer and the normalization layer after it share
    an alpha, whatever they are named. ``level``, ``compat`` and ``exchange`` are README's
    ``grafting.*`` keys; ``timeout`` is how long a rank waits for the others at a graft before
    naming the missing ones. ``every_steps=k`` makes ``step()`` graft every k optimizer steps.
    ``topology``: an existing ring.Topology (graft.train's); ``data_parallel`` and ``timeout``
    then come from it.
    """

    def __init__(self, *, level: str = "layer", A: float = 0.4, c: float = 500.0, bins: int = 10,
                 compat: str = "default", exchange: str = "auto", timeout: float = 1800.0,
                 data_parallel: int = 1, every_steps: int = 0, topology: ring.Topology | None = None):
        for ok, name, want, value in [
            (level in core.LEVELS, "level", f"one of {core.LEVELS}", level),
            (compat in core.COMPATS, "compat", f"one of {core.COMPATS}", compat),
            (exchange in EXCHANGES, "exchange", f"one of {EXCHANGES}", exchange),
            (0 <= A <= 1, "A", "in [0, 1]", A),
            (c >= 0, "c", ">= 0", c),
            (isinstance(bins, int) and bins >= 2, "bins", "an integer >= 2", bins),
            (timeout > 0, "timeout", "> 0 (seconds)", timeout),
            (isinstance(data_parallel, int) and data_parallel >= 1, "data_parallel", "an integer >= 1", data_parallel),
            (isinstance(every_steps, int) and every_steps >= 0, "every_steps", "an integer >= 0", every_steps),
            (not (compat == "reference" and level != "layer"), "compat", "'default' with level='filter'", compat),
        ]:
            if not ok:
                raise ValueError(f"Grafter: {name} must be {want}; got {value!r}")
        self.level, self.A, self.c, self.bins = level, A, c, bins
        self.compat, self.exchange, self.every_steps = compat, exchange, every_steps
        if topology is None:
            topology = (ring.from_process_group(data_parallel, timeout) if dist.is_available() and dist.is_initialized()
                        else ring.setup(data_parallel, timeout=timeout))
        self.topology = topology
        self.grafts = 0  # grafts done
        self.steps = 0   # step() calls

    def plan(self, model: nn.Module) -> core.GraftPlan:
        """Which tensors of ``model`` share an alpha."""
        return core.module_plan(unwrap(model), self.compat)

    def graft(self, model: nn.Module, *, epoch: int | None = None) -> ring.GraftResult:
        """Blend ``model``'s weights in place with its ring peer's; returns what was done.

        Collective: every rank calls it at the same point (``epoch`` only names the graft in
        messages). Accepts DDP-wrapped and torch.compile'd modules. Raises ring.GraftError on
        every rank, weights untouched, when some network holds NaN/Inf or another architecture,
        and ring.PeerTimeout naming the ranks that do not arrive within ``timeout``.
        """
        return self._graft(model, f"epoch {epoch}" if epoch is not None else f"graft {self.grafts}")

    def step(self, model: nn.Module) -> ring.GraftResult | None:
        """Call after each ``optimizer.step()``: grafts every ``every_steps`` calls (returning
        what it did), else returns None."""
        if not self.every_steps:
            raise ValueError("Grafter.step: create the Grafter with every_steps=k to graft every k optimizer steps")
        self.steps += 1
        return None if self.steps % self.every_steps else self._graft(model, f"step {self.steps}")

    def _graft(self, model: nn.Module, when: str) -> ring.GraftResult:
        inner = unwrap(model)
        new_state, result = ring.graft_step(
            self.topology, inner.state_dict(), core.module_plan(inner, self.compat), when=when, level=self.level,
            A=self.A, c=self.c, bins=self.bins, exchange=self.exchange)
        inner.load_state_dict(new_state)
        self.grafts += 1
        return result
