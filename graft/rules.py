"""Grafting rules as plug-ins, and GraftSpec, the one description of a graft.

A rule is three choices:

* a **criterion**: per layer, a score of each network's weights and the alpha two scores give,
  then the blend ``alpha * own + (1 - alpha) * partner``. ``entropy`` is the paper's,
  ``reference`` the official code's (quirks included), ``bn_scale`` the filter level (a ratio of
  BatchNorm scales per filter), ``l1`` the paper's ablation (the layer's L1 norm in place of its
  entropy), ``constant`` a fixed alpha (0.5: plain averaging);
* a **partner**: whom a network blends with: ``ring`` (network k-1, the paper's) or
  ``population`` (the mean of every network's weights);
* a **schedule**: at each epoch's end (``every_steps: 0``, the paper's) or every k optimizer steps.

``GraftSpec`` names one combination, is validated once (here), and travels whole: config ->
Grafter -> exchange -> checkpoint -> metrics. Named combinations (``rule``): ``paper`` (entropy,
ring, each epoch: the default) and ``papa`` (Jolicoeur-Martineau et al., 2023: every 10 steps
w <- 0.99 w + 0.01 mean of the population). Adding a criterion is one class below and one line
in CRITERIA; the config's choices follow from the registries.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from . import core

# --------------------------------------------------------------------------------------------
# Criteria
# --------------------------------------------------------------------------------------------


class Criterion:
    """Scores each layer of a network's weights and blends two states by two rows of scores."""

    name: ClassVar[str]
    score: ClassVar[str | None] = None   # what a layer's score is called in records; None: no score
    compat: ClassVar[str] = "default"    # how tensors group into layers (core.make_plan)

    def scores(self, state: Mapping[str, Tensor], plan: core.GraftPlan, spec: GraftSpec) -> Tensor:
        """One float64 score per layer of ``plan``, on the CPU: exchanged between networks."""
        return torch.zeros(len(plan.layers), dtype=torch.float64)

    def first_non_finite(self, state: Mapping[str, Tensor], plan: core.GraftPlan, scores: Tensor) -> str | None:
        """The first key holding NaN or Inf; a score that turns NaN with its layer spares the
        layers a second pass."""
        return core.first_non_finite_given(state, plan, scores) if self.score else core.first_non_finite(state)

    def blend(self, own: Mapping[str, Tensor], peer: Mapping[str, Tensor], plan: core.GraftPlan,
              s_self: Tensor, s_peer: Tensor, spec: GraftSpec) -> tuple[dict[str, Tensor], list[float], list[str]]:
        """(the blended state, alpha per layer, layers that fell back to a simpler rule)."""
        raise NotImplementedError


class Entropy(Criterion):
    """The paper's: alpha = (A/pi) * arctan(c * (H_self - H_peer)) + 0.5, H the entropy of a
    ``bins``-bin histogram of the layer's weights; a BatchNorm follows the conv before it."""

    name = "entropy"
    score = "entropy"

    def scores(self, state, plan, spec):
        return core.plan_entropies(state, plan, spec.bins).cpu()

    def blend(self, own, peer, plan, s_self, s_peer, spec):
        offsets = core.layer_offsets(s_self, s_peer, spec.A, spec.c)
        new = core.blend(own, peer, plan, dict(zip(plan.layers, offsets.tolist())))
        return new, (offsets + 0.5).tolist(), []


class Reference(Entropy):
    """The official code's: its entropy (the top bin's maximum uncounted), alpha rounded to two
    decimals, layers grouped by key names containing 'conv', every tensor blended in its dtype."""

    name = "reference"
    compat = "reference"

    def blend(self, own, peer, plan, s_self, s_peer, spec):
        alphas = core.reference_alphas(s_self, s_peer, spec.A, spec.c)
        return core.blend_reference(own, peer, plan, dict(zip(plan.layers, alphas))), alphas, []


class BnScale(Entropy):
    """Filter level: each filter's alpha is |g_self| / (|g_self| + |g_peer|), g the scale of
    the BatchNorm after its conv; a conv with no BatchNorm after it keeps its layer's entropy
    alpha (named in the report's fallbacks)."""

    name = "bn_scale"

    def blend(self, own, peer, plan, s_self, s_peer, spec):
        offsets = dict(zip(plan.layers, core.layer_offsets(s_self, s_peer, spec.A, spec.c).tolist()))
        filters, layer_alpha = core.filter_offsets(own, peer, plan)
        alphas = [layer_alpha.get(k, 0.5 + offsets[k]) for k in plan.layers]
        return core.blend(own, peer, plan, offsets, filters), alphas, plan.convs_without_bn(own)


class L1(Entropy):
    """The paper's ablation: the layer's L1 norm in place of its entropy in the same formula
    (c then acts on differences of L1 norms, a larger scale than entropies)."""

    name = "l1"
    score = "l1"

    def scores(self, state, plan, spec):
        return core.plan_l1_norms(state, plan).cpu()


class Constant(Criterion):
    """A fixed alpha for every layer: 0.5 is plain averaging; 0.99 with the population as
    partner is PAPA's gradual pull."""

    name = "constant"

    def blend(self, own, peer, plan, s_self, s_peer, spec):
        offset = spec.alpha - 0.5
        return core.blend(own, peer, plan, dict.fromkeys(plan.layers, offset)), [spec.alpha] * len(plan.layers), []


CRITERIA: dict[str, Criterion] = {c.name: c for c in (Entropy(), Reference(), BnScale(), L1(), Constant())}


# --------------------------------------------------------------------------------------------
# Partners
# --------------------------------------------------------------------------------------------


class Partner:
    """Whom network k blends with: one other network (``peer``), or the population's mean."""

    name: ClassVar[str]

    def peer(self, network: int, networks: int) -> int | None:
        """The network whose weights network ``network`` blends in; None: the mean of all."""
        raise NotImplementedError


class Ring(Partner):
    """The paper's: network k grafts from network k-1 (mod N)."""

    name = "ring"

    def peer(self, network, networks):
        return (network - 1) % networks


class Population(Partner):
    """The mean of every network's weights (its own included), by one all-reduce."""

    name = "population"

    def peer(self, network, networks):
        return None


PARTNERS: dict[str, Partner] = {p.name: p for p in (Ring(), Population())}

# Named combinations: what ``rule`` sets. Keys a rule sets may still be given, with its values.
PRESETS: dict[str, dict] = {
    "paper": {"criterion": "entropy", "partner": "ring", "every_steps": 0},
    "papa": {"criterion": "constant", "alpha": 0.99, "partner": "population", "every_steps": 10},
}


# --------------------------------------------------------------------------------------------
# GraftSpec
# --------------------------------------------------------------------------------------------


class SpecError(ValueError):
    """A setting of a graft that cannot work: the message starts with the setting's name."""


@dataclass(frozen=True)
class GraftSpec:
    """One graft: criterion, its parameters, partner and schedule. Build it with ``make`` (which
    applies a named rule); it is validated when created and never changes."""

    rule: str = ""
    criterion: str = "entropy"
    partner: str = "ring"
    every_steps: int = 0
    A: float = 0.4
    c: float = 500.0
    bins: int = 10
    alpha: float = 0.5
    # What each setting may be: the config's allowed values come from here.
    CHOICES: ClassVar[dict] = {"rule": ("", *PRESETS), "criterion": tuple(CRITERIA), "partner": tuple(PARTNERS)}
    LIMITS: ClassVar[dict] = {"every_steps": (0, None), "A": (0, 1), "c": (0, None), "bins": (2, None),
                              "alpha": (0, 1)}

    def __post_init__(self):
        for f in dataclasses.fields(self):  # 0 and 0.0 are one setting (and one fingerprint)
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        self._check()

    def _check(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                shown = ", ".join(repr(c) if c == "" else c for c in choices)
                raise SpecError(f"{name}: must be one of {shown}; got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str}[f.type]
            if not isinstance(value, want) or isinstance(value, bool):
                raise SpecError(f"{f.name}: expected {f.type}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError(f"{f.name}: must be a finite number; got {value!r}")
        for name, (low, high) in self.LIMITS.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                raise SpecError(f"{name}: must be {f'>= {low}' if high is None else f'in [{low}, {high}]'}; "
                                f"got {value!r}")
        for key, value in PRESETS.get(self.rule, {}).items():
            if getattr(self, key) != value:
                raise SpecError(f"{key}: rule {self.rule} sets {key}={value!r}; got {getattr(self, key)!r} "
                                "(leave it out, or drop the rule)")
        if self.criterion == "reference" and self.partner != "ring":
            raise SpecError("criterion: 'reference' reproduces the official code, which grafts along the ring "
                            "only (partner: ring)")

    @classmethod
    def make(cls, rule: str = "", **given) -> GraftSpec:
        """A spec from a named rule and explicit settings; a setting given against the rule is
        refused, naming both."""
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown and unknown[0] in ("level", "compat"):
            raise SpecError(f"{unknown[0]}: replaced by criterion (level='filter' is criterion='bn_scale', "
                            "compat='reference' is criterion='reference')")
        if unknown:
            raise SpecError(f"{unknown[0]}: not a grafting setting (settings: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))})")
        if rule not in PRESETS and rule != "":
            raise SpecError(f"rule: must be one of {', '.join(PRESETS)} (or '' for none); got {rule!r}")
        return cls(**{**PRESETS.get(rule, {}), **given, "rule": rule})  # a setting against the rule: __post_init__

    @property
    def criterion_rule(self) -> Criterion:
        return CRITERIA[self.criterion]

    @property
    def partner_rule(self) -> Partner:
        return PARTNERS[self.partner]

    @property
    def per_step(self) -> bool:
        """Grafts every ``every_steps`` optimizer steps rather than at each epoch's end."""
        return self.every_steps > 0

    def settings(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> float:
        """A checksum of the settings, exact in a float64: networks compare it before a blend."""
        return float(zlib.crc32(repr(sorted(self.settings().items())).encode()))

    def describe(self, networks: int | None = None) -> str:
        when = f"every {self.every_steps} optimizer steps" if self.per_step else "at each epoch's end"
        how = {"entropy": f"entropy, A {self.A:g}, c {self.c:g}, {self.bins} bins",
               "reference": f"the official code's entropy, A {self.A:g}, c {self.c:g}, {self.bins} bins",
               "bn_scale": "per filter by BatchNorm scales",
               "l1": f"L1 norm, A {self.A:g}, c {self.c:g}",
               "constant": f"constant alpha {self.alpha:g}"}[self.criterion]
        toward = {"ring": "from ring peer k-1", "population": "toward the population mean"}[self.partner]
        if networks and self.partner_rule.peer(0, networks) is not None:  # weights flow along the arrows
            order, k = [0], 0
            for _ in range(networks):
                k = next(j for j in range(networks) if self.partner_rule.peer(j, networks) == k)
                order.append(k)
            toward += f" ({' -> '.join(map(str, order))})"
        name = f"rule {self.rule}: " if self.rule else ""
        return f"grafting: {name}{how}, {toward}, {when}"

    def plan(self, model_or_state) -> core.GraftPlan:
        """How ``model_or_state``'s tensors group into layers for this criterion (a module's
        plan finds normalization layers by type; a state dict's by key names)."""
        compat = self.criterion_rule.compat
        is_model = isinstance(model_or_state, torch.nn.Module)
        state = model_or_state.state_dict() if is_model else model_or_state
        complex_ = [k for k, t in state.items() if t.is_complex()]
        if complex_:
            raise SpecError(f"model: {complex_[0]!r} holds complex values, which grafting does not blend (a "
                            "histogram entropy of complex weights is undefined); graft a model with real weights")
        try:
            plan = core.module_plan(model_or_state, compat) if is_model else core.make_plan(model_or_state, compat)
        except ValueError as e:  # the reference plan on a model without the official code's key names
            raise SpecError(f"criterion: {e}") from None
        if not plan.layers:
            raise SpecError("model: no floating-point tensor to graft (an empty model, or integer buffers only)")
        return plan


def differences(a: Mapping, b: Mapping, here: str = "here", there: str = "there") -> list[str]:
    """'A: 0.4 here, 0.3 there' for each setting two specs' settings disagree on."""
    return [f"{k}: {a.get(k)!r} {here}, {b.get(k)!r} {there}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


# --------------------------------------------------------------------------------------------
# One graft, in memory
# --------------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    layer: str
    score_self: float
    score_peer: float
    alpha: float
    peer_distance: float  # ||W_peer - W_self|| / ||W_self||, before the blend


@dataclass
class GraftReport:
    """What one graft did: per layer its scores, alpha and peer distance."""

    spec: GraftSpec
    layers: list[LayerRecord]
    fallbacks: list[str] = field(default_factory=list)  # bn_scale: convs without a BN after them

    def mean_alpha(self) -> float:
        return sum(r.alpha for r in self.layers) / max(len(self.layers), 1)

    def mean_peer_distance(self) -> float:
        return sum(r.peer_distance for r in self.layers) / max(len(self.layers), 1)

    def as_records(self) -> list[dict]:
        """Per layer, as metrics.jsonl holds it: the scores named after the criterion's score
        (``entropy_self``, ``entropy_peer``; ``l1_self``...; none for a constant alpha)."""
        score = self.spec.criterion_rule.score
        out = []
        for r in self.layers:
            record = {"layer": r.layer}
            if score:
                record.update({f"{score}_self": r.score_self, f"{score}_peer": r.score_peer})
            out.append({**record, "alpha": r.alpha, "peer_distance": r.peer_distance})
        return out


def blend_with_scores(own: Mapping[str, Tensor], peer: Mapping[str, Tensor], plan: core.GraftPlan,
                      s_self: Tensor, s_peer: Tensor, spec: GraftSpec) -> tuple[dict[str, Tensor], GraftReport]:
    """Blend ``peer`` into ``own`` given both rows of layer scores (as the exchange has them)."""
    new, alphas, fallbacks = spec.criterion_rule.blend(own, peer, plan, s_self, s_peer, spec)
    distances = core.peer_distances(own, peer, plan.layers).tolist()
    layers = [LayerRecord(*r) for r in zip(plan.layers, s_self.tolist(), s_peer.tolist(), alphas, distances)]
    return new, GraftReport(spec, layers, list(fallbacks))


def graft_state_dict(own: Mapping[str, Tensor], peer: Mapping[str, Tensor], spec: GraftSpec | None = None,
                     plan: core.GraftPlan | None = None, **settings) -> tuple[dict[str, Tensor], GraftReport]:
    """Graft ``peer`` into ``own`` (two state dicts): returns (new state dict, report); the inputs
    are not modified. ``spec``, or settings to make one (``criterion="bn_scale"``, ``A=0.3``...);
    the paper's rule by default. ``plan``: how tensors group into layers (default: from ``own``'s
    keys; ``spec.plan(model)`` groups a model's tensors by module type, as graft.Grafter does).

    Raises ValueError, before changing anything, when the states differ in keys, shapes or
    dtypes, or when either holds NaN or Inf.
    """
    if spec is None:
        spec = GraftSpec.make(**settings)
    elif settings:
        raise TypeError("graft_state_dict: give a spec or settings, not both")
    core.check_compatible(own, peer)
    plan = spec.plan(own) if plan is None else plan
    rule = spec.criterion_rule
    s_self, s_peer = rule.scores(own, plan, spec), rule.scores(peer, plan, spec)
    for state, name, scores in ((own, "own state", s_self), (peer, "peer state", s_peer)):
        bad = rule.first_non_finite(state, plan, scores)
        if bad is not None:
            raise ValueError(f"{name}: NaN or Inf in {bad!r}; refusing to graft")
    return blend_with_scores(own, peer, plan, s_self, s_peer, spec)
