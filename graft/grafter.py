"""``graft.Grafter``: the graft step as an object any training script can use.

    grafter = graft.Grafter()              # under graft-run SCRIPT.py, torchrun, or a group of your own
    for epoch in range(epochs):
        train(model)                       # the script's own loop, model, optimizer, data
        grafter.graft(model)               # every rank: network k blends in network k-1

Under ``graft-run SCRIPT.py`` each network is its own torch.distributed world and graft's ring
lives apart: the script's samplers, DDP, reductions and rank-0 saving stay within its network.
Under plain torchrun (or after the script's own ``init_process_group``) one process is one
network; with ``data_parallel=G`` each network is G processes, and DDP must be given
``grafter.topology.network_group``. graft.train grafts through this same object.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import OrderedDict

import torch.distributed as dist
import torch.nn as nn

from . import dist as gdist
from . import rules
from .errors import GraftError
from .exchange import EXCHANGES, GraftResult, graft_step

logger = logging.getLogger(__name__)

IDENTICAL = ("network {network} and its partner hold bit-identical weights at {when}: grafting changes nothing. "
             "Likely causes: every network started from one seed (under graft-run, pass the script --seed {{network}} "
             "if it seeds with seed + rank; or seed each network's model with graft.network_seed(seed, network)), "
             "or a DDP or broadcast that spans the networks (under plain "
             "torchrun, give DDP process_group=grafter.topology.network_group; graft-run SCRIPT.py keeps each "
             "network in a world of its own)")


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


def network_seed(seed: int, network: int) -> int:
    """The seed of network ``network``'s initial weights: a hash of the pair, so that every
    network starts elsewhere and runs with nearby seeds share no network's start (seed + network
    gave network 1 of seed s the start of network 0 of seed s + 1)."""
    from .data import mix_seed

    return mix_seed(seed, network, 2) % 2**32


def load_blended(model: nn.Module, state: dict, new_state: dict) -> None:
    """Load the blended weights into ``model``, with the module metadata (versions) its
    ``state_dict()`` carried: MNASNet's loading reads its version from there."""
    new_state = OrderedDict(new_state)
    new_state._metadata = getattr(state, "_metadata", None)
    model.load_state_dict(new_state)


_CREATED = itertools.count(1)  # Grafters made in this process; every rank makes them in one order


def current_topology(data_parallel: int = 1, timeout: float = 300.0) -> gdist.Topology:
    """Where this process stands: a graft-run SCRIPT worker, a member of the script's own process
    group, a torchrun worker (graft starts the group), or alone (a world of one)."""
    if gdist.launched():
        return gdist.from_launcher(timeout)
    if dist.is_available() and dist.is_initialized():
        return gdist.from_process_group(data_parallel, timeout)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return gdist.setup(data_parallel, timeout=timeout)
    return gdist.Topology(replicas=1, timeout=timeout)


class Grafter:
    """Filter grafting between the networks of a job, in place on the caller's model.

    ``spec`` (a rules.GraftSpec) or its settings as keywords: ``rule``, ``criterion``,
    ``partner``, ``every_steps``, ``A``, ``c``, ``bins``, ``alpha`` (docs/config.md's
    ``grafting.*`` keys); the paper's rule by default: network k grafts from network k-1 (mod N),
    each layer becoming alpha * own + (1 - alpha) * peer with
    alpha = (A/pi) * arctan(c * (H_own - H_peer)) + 0.5 and H the entropy of the layer's weights.
    Layers are grouped from the module structure (a conv or linear layer and the normalization
    layer after it share an alpha, whatever they are named).

    ``epochs``: the run's length; the graft after the last epoch is skipped, so that the final
    weights are the evaluated ones. ``timeout``: seconds a rank waits for the others at a graft
    before naming the missing ones. ``topology``: an existing dist.Topology (graft.train's).
    """

    def __init__(self, spec: rules.GraftSpec | None = None, *, epochs: int | None = None, exchange: str = "auto",
                 timeout: float = 300.0, data_parallel: int = 1, topology: gdist.Topology | None = None,
                 **settings):
        if spec is not None and settings:
            raise TypeError("Grafter: give a spec or its settings, not both")
        try:
            self.spec = spec if spec is not None else rules.GraftSpec.make(**settings)
        except rules.SpecError as e:
            raise ValueError(f"Grafter: {e}") from None
        for ok, name, want, value in [
            (exchange in EXCHANGES, "exchange", f"one of {EXCHANGES}", exchange),
            (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0, "timeout",
             "a finite number of seconds > 0", timeout),
            (isinstance(data_parallel, int) and data_parallel >= 1, "data_parallel", "an integer >= 1", data_parallel),
            (epochs is None or (isinstance(epochs, int) and epochs >= 1), "epochs", "None or an integer >= 1", epochs),
        ]:
            if not ok:
                raise ValueError(f"Grafter: {name} must be {want}; got {value!r}")
        self.exchange, self.epochs = exchange, epochs
        self.topology = topology if topology is not None else current_topology(data_parallel, timeout)
        self.grafts = 0       # grafts done
        self.steps = 0        # step() calls
        self.epoch = -1       # the last epoch graft() was called for
        self.grafted = False  # whether that epoch's graft was done (False: skipped as the run's last, or none)
        # Check-in keys of its own: a second Grafter on the same processes (a second training
        # phase) must not pass its check-ins on the first one's keys. Counted per process, not per
        # Topology: under plain torchrun each Grafter builds a Topology of its own on one store.
        self._scope = "" if (n := next(_CREATED)) == 1 else f"grafter{n}/"
        self._warned: set[str] = set()
        self._plans: dict[int, tuple] = {}

    # ---------------------------------------------------------------------------- the graft

    def plan(self, model: nn.Module):
        """Which tensors of ``model`` share an alpha (core.GraftPlan), cached per model."""
        inner = unwrap(model)
        keys = tuple(inner.state_dict().keys())
        cached = self._plans.get(id(inner))
        if cached is None or cached[0] != keys:
            try:
                cached = self._plans[id(inner)] = (keys, self.spec.plan(inner))
            except rules.SpecError as e:
                raise GraftError(f"Grafter: {e}") from None
        return cached[1]

    def graft(self, model: nn.Module, *, epoch: int | None = None, last: bool = False) -> GraftResult | None:
        """At an epoch's end: blend ``model``'s weights in place with its partner's; returns what
        was done, or None when nothing was (the last epoch of ``epochs``, a world of one).

        Collective: every rank calls it at the same point. ``epoch`` (counted from 0; messages
        count from 1, as graft's log does) defaults to the number of calls so far. ``last``: the
        run ends after this epoch although ``epochs`` does not say so (a run bounded by steps):
        no graft, as after the last of ``epochs``, and a resumed longer run owes it. Accepts
        DDP-wrapped and torch.compile'd modules. Raises
        GraftError on every rank, weights untouched, when some network holds NaN/Inf, another
        architecture or other settings, and PeerTimeout naming the ranks that do not arrive
        within ``timeout`` (or that wait at another graft).
        """
        if self.spec.per_step:
            raise ValueError(f"Grafter.graft: this rule grafts every {self.spec.every_steps} optimizer steps: call "
                             "grafter.step(model) after each optimizer.step() instead")
        epoch = self.epoch + 1 if epoch is None else epoch
        self.epoch = epoch
        if self.epochs is not None and epoch >= self.epochs:
            self._warn_once("past", f"Grafter: graft after epoch {epoch + 1} of a run of epochs={self.epochs}: nothing "
                            "grafted. Give the Grafter the run's real length (timm's cooldown epochs count too), "
                            "and graft(model, epoch=epoch) after a resume that did not restore its state")
        if last or (self.epochs is not None and epoch >= self.epochs - 1):  # the last epoch's weights are the result
            self.grafted = False
            return None
        self.grafted = True
        return self._graft(model, f"epoch {epoch + 1}")

    def step(self, model: nn.Module) -> GraftResult | None:
        """After each ``optimizer.step()``: grafts every ``every_steps`` calls (returning what it
        did), else returns None."""
        if not self.spec.per_step:
            raise ValueError("Grafter.step: this rule grafts at each epoch's end (grafter.graft(model)); give "
                             "every_steps=k to graft every k optimizer steps")
        self.steps += 1
        return None if self.steps % self.spec.every_steps else self._graft(model, f"step {self.steps}")

    def resume(self, model: nn.Module, epoch: int | None = None) -> GraftResult | None:
        """After ``load_state_dict`` and loading the model: the graft the loaded run still owes,
        else nothing. ``epoch``: the last epoch the loaded weights completed (default: the last
        one this Grafter saw). A graft is owed when that epoch ended without one although the
        run now goes on past it: it was the end of a shorter run, or the checkpoint was written
        after the epoch's training but before its graft (Lightning's checkpoint callback).
        Collective: every rank."""
        epoch = self.epoch if epoch is None else epoch
        owed = self.epoch < epoch or (self.epoch == epoch and not self.grafted)
        if not owed or epoch < 0 or self.spec.per_step or (self.epochs is not None and epoch >= self.epochs - 1):
            return None
        self.epoch, self.grafted = epoch, True
        logger.info(f"grafting after epoch {epoch + 1}: the resumed weights ended it without a graft")
        return self._graft(model, f"epoch {epoch + 1}")

    def _graft(self, model: nn.Module, when: str) -> GraftResult | None:
        topo = self.topology
        if topo.networks == 1:
            self._warn_once("alone", "Grafter: a world of one network, no partner to graft with: the graft does "
                            "nothing. Start 2 or more networks (graft-run --nproc_per_node=2 SCRIPT.py, or torchrun)")
            return None
        inner = unwrap(model)
        state = inner.state_dict()
        new_state, result = graft_step(topo, dict(state), self.plan(inner), self.spec, when=when,
                                       exchange=self.exchange, scope=self._scope)
        load_blended(inner, state, new_state)
        self.grafts += 1
        if result.identical:
            self._warn_once("identical", IDENTICAL.format(network=topo.network, when=when))
        return result

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """What a script's checkpoint must keep so that a resumed run grafts as an uninterrupted
        one: the settings, the grafts and steps done, the last epoch and whether it was grafted."""
        return {"spec": self.spec.settings(), "grafts": self.grafts, "steps": self.steps, "epoch": self.epoch,
                "grafted": self.grafted}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; refuses a state saved with other grafting settings."""
        differ = rules.differences(self.spec.settings(), state.get("spec", self.spec.settings()))
        if differ:
            raise GraftError(f"Grafter.load_state_dict: the checkpoint grafted with other settings "
                             f"({'; '.join(differ)}; 'here' is this Grafter): give the Grafter the checkpoint's "
                             "settings to continue that run")
        self.grafts, self.steps = int(state.get("grafts", 0)), int(state.get("steps", 0))
        self.epoch, self.grafted = int(state.get("epoch", -1)), bool(state.get("grafted", False))
