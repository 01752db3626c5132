"""The grafting math: entropies, the adaptive weight, layer plans and blends of two state dicts.

Pure tensor functions. No file I/O, no torch.distributed: graft.rules composes them into
grafting criteria, graft.exchange calls those, and the tests check each function in isolation.

Two ways of grouping and blending tensors (``compat``):
* ``"default"``: the paper's formulas, every weight value counted, BatchNorm tensors blended
  with the alpha of the conv that feeds them.
* ``"reference"``: the official code (fxmeng/filter-grafting, grafting_cifar/grafting.py) with
  its quirks, so that published numbers can be reproduced. docs/grafting.md lists each difference.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "weight_entropy",
    "weight_entropies",
    "filter_entropy",
    "reference_entropy",
    "adaptive_weight",
    "layer_offsets",
    "reference_alphas",
    "GraftPlan",
    "make_plan",
    "module_plan",
    "plan_entropies",
    "plan_l1_norms",
    "peer_distances",
    "blend",
    "blend_reference",
    "filter_offsets",
    "check_compatible",
    "layout",
    "layout_difference",
    "first_non_finite",
    "first_non_finite_given",
    "count_invalid_filters",
    "invalid_in_both",
]

COMPATS = ("default", "reference")


# --------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------


def _rows_entropy(rows: Tensor, segment: Tensor, lengths: Tensor, bins: int,
                  padding: Tensor | None = None, owned: bool = False) -> Tensor:
    """Entropy of each segment's histogram, ``bins`` equal-width bins over the segment's [min, max].

    ``rows`` is a 2-D float tensor whose row r belongs to segment ``segment[r]``; ``lengths`` is
    each segment's number of values. A segment's rows may end in ``padding[s]`` copies of its own
    first value (so that min and max are unchanged); they are taken out of the counts again.
    Every step is one vectorized pass: row min/max, scale to bin positions, one bincount.
    ``owned``: ``rows`` is a scratch copy that may be overwritten (saves a pass's allocation).
    """
    n = lengths.numel()
    row_lo, row_hi = rows.amin(dim=1), rows.amax(dim=1)  # far faster than aminmax(dim=1) on CPU
    inf = torch.full((n,), float("inf"), dtype=rows.dtype, device=rows.device)
    lo = inf.scatter_reduce(0, segment, row_lo, "amin")
    hi = (-inf).scatter_reduce(0, segment, row_hi, "amax")
    width = hi - lo
    # A constant segment has width 0: every value falls into bin 0 and the entropy is 0.
    scale = bins / torch.where(width > 0, width, torch.ones_like(width))
    # Finite values whose width (max - min) or bins / width overflows the dtype (float32 weights
    # near +-3e38, or all within a few subnormals) are binned in float64 instead (one sync).
    wide = torch.isfinite(lo) & torch.isfinite(hi) & ~(torch.isfinite(width) & torch.isfinite(scale))
    wide_rows = wide[segment] if bool(wide.any()) else None
    if wide_rows is not None:
        wide_index = _wide_positions(rows[wide_rows], lo, hi, segment[wide_rows], bins).to(torch.int32)
    position = (rows.sub_ if owned else rows.sub)(lo[segment, None]).mul_(scale[segment, None])
    index = position.to(torch.int32)
    if wide_rows is not None:
        index[wide_rows] = wide_index
    index.clamp_(0, bins - 1)  # the maximum lands in the top bin
    index += (segment.to(torch.int32) * bins)[:, None]
    counts = torch.bincount(index.view(-1), minlength=n * bins)
    if padding is not None:
        first_row = torch.searchsorted(segment, torch.arange(n, device=segment.device))
        counts.index_add_(0, index[first_row, 0].long(), -padding)
    p = counts.view(n, bins).to(rows.dtype) / lengths.to(rows.dtype).unsqueeze(1)
    h = 0.0 - torch.xlogy(p, p).sum(1)  # 0 - 0 is +0: a constant prints as 0, not -0
    return torch.where(torch.isfinite(lo) & torch.isfinite(hi), h, torch.nan)  # a NaN or Inf value: NaN


def _wide_positions(rows: Tensor, lo: Tensor, hi: Tensor, segment: Tensor, bins: int) -> Tensor:
    """Bin positions (x - min) / (max - min) * bins in float64, with every term halved first and a
    division rather than a reciprocal, so that no step overflows (float64 values included)."""
    lo, hi = lo.double()[segment, None] / 2, hi.double()[segment, None] / 2
    return (rows.double() / 2 - lo) / (hi - lo) * bins


def _as_float(t: Tensor) -> Tensor:
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def filter_entropy(tensor: Tensor, bins: int = 10) -> Tensor:
    """Entropy of each output filter (each slice along dim 0) of a weight tensor."""
    _check_bins(bins)
    rows = _as_float(tensor).reshape(tensor.shape[0], math.prod(tensor.shape[1:]))  # -1 fails with 0 filters
    f, k = rows.shape
    if k == 0:  # no values: entropy 0, like a constant
        return torch.zeros(f, dtype=rows.dtype, device=rows.device)
    segment = torch.arange(f, device=rows.device)
    return _rows_entropy(rows, segment, torch.full((f,), k, device=rows.device), bins)


def weight_entropy(tensor: Tensor, bins: int = 10) -> Tensor:
    """Shannon entropy (natural log) of the histogram of all values of ``tensor``.

    ``bins`` equal-width bins span [min, max]; every value is counted, the maximum in the top
    bin. A constant (or empty) tensor has entropy 0, one holding NaN or Inf has entropy NaN.
    Returns a 0-dim tensor on the tensor's device.
    """
    return filter_entropy(tensor.reshape(1, -1), bins)[0]


def weight_entropies(tensors: Sequence[Tensor], bins: int = 10, row: int = 1024) -> Tensor:
    """``weight_entropy`` of many tensors (e.g. every layer of a model) in one vectorized call.

    The values are laid out as rows of ``row`` values, each tensor's last row padded with its
    own first value, so that per-tensor min, max and bin positions broadcast per row.
    """
    _check_bins(bins)
    flat = [_as_float(t).reshape(-1) for t in tensors]
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in flat) else torch.float32
    if not (flat and all(f.numel() for f in flat)):  # an empty tensor has entropy 0 and no rows
        out = torch.zeros(len(flat), dtype=dtype, device=flat[0].device if flat else None)
        kept = [i for i, f in enumerate(flat) if f.numel()]
        if kept:
            out[kept] = weight_entropies([flat[i] for i in kept], bins, row).to(dtype)
        return out
    row = max(1, min(row, max(f.numel() for f in flat)))
    pieces, rows_per, pads = [], [], []
    for f in flat:
        pad = -f.numel() % row
        pieces += [f.to(dtype), f[:1].to(dtype).expand(pad)] if pad else [f.to(dtype)]
        rows_per.append((f.numel() + pad) // row)
        pads.append(pad)
    device = flat[0].device
    segment = torch.repeat_interleave(torch.arange(len(flat), device=device),
                                      torch.tensor(rows_per, device=device))
    lengths = torch.tensor([f.numel() for f in flat], device=device)
    padding = torch.tensor(pads, device=device) if any(pads) else None
    return _rows_entropy(torch.cat(pieces).view(-1, row), segment, lengths, bins, padding, owned=True)


def reference_entropy(tensor: Tensor, bins: int = 10) -> float:
    """The official code's entropy: bins [min + i*s, min + (i+1)*s) with s = (max - min)/bins.

    The top bin's upper bound is strict, so the maximum value (and anything rounding onto the
    top edge) is never counted; probabilities are divided by the full element count. The counts
    come from one vectorized pass with the same float32 edges as the official loop, p*log(p) is
    taken on the tensor's device as there (a GPU's log can differ from the CPU's in the last bit),
    and the terms are subtracted one by one in float32, as the official loop does: c = 500 turns
    a last-bit difference in the entropy into a different rounded alpha now and then. The
    official code crashes on a constant tensor; here it has entropy 0.
    """
    _check_bins(bins)
    x = tensor.detach().reshape(-1)
    if x.numel() == 0:
        return 0.0
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / bins
    edges = lo + torch.arange(bins + 1, device=x.device, dtype=x.dtype) * scale
    # bucketize(right=True) returns j with edges[j-1] <= x < edges[j]; bin j-1 is [e_{j-1}, e_j).
    slot = torch.bucketize(x, edges, right=True)
    counts = torch.bincount(slot, minlength=bins + 2)[1:bins + 1]
    p = counts[counts > 0].to(torch.float32) / len(x)
    terms = (p * torch.log(p)).cpu().numpy()  # log on x's device, as the official code takes it
    return float(functools.reduce(operator.sub, terms, np.float32(0)))


def _check_bins(bins: int) -> None:
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")


# --------------------------------------------------------------------------------------------
# Adaptive weight
# --------------------------------------------------------------------------------------------


def _graft_offset(h_self, h_peer, A: float, c: float):
    """alpha - 0.5. Kept separate so that alpha(a, b) and alpha(b, a) blend bit-identically."""
    if isinstance(h_self, Tensor) or isinstance(h_peer, Tensor):
        # A Python float as float64, so that it does not round a float64 tensor's difference.
        h_self, h_peer = (h if isinstance(h, Tensor) else torch.tensor(h, dtype=torch.float64)
                          for h in (h_self, h_peer))
        return A / math.pi * torch.atan(c * (h_self - h_peer))
    return A / math.pi * math.atan(c * (h_self - h_peer))


def adaptive_weight(h_self, h_peer, A: float = 0.4, c: float = 500):
    """alpha = (A/pi) * arctan(c * (h_self - h_peer)) + 0.5, on floats or tensors.

    A network keeps alpha of its own weights and takes 1 - alpha of its peer's; the one whose
    layer carries more information (higher entropy) keeps more of itself.
    """
    return _graft_offset(h_self, h_peer, A, c) + 0.5


def layer_offsets(h_self: Tensor, h_peer: Tensor, A: float, c: float) -> Tensor:
    """alpha - 0.5 per layer, in float64: the form ``blend`` takes."""
    return _graft_offset(h_self.to(torch.float64), h_peer.to(torch.float64), A, c)


def _reference_alpha(h_self: float, h_peer: float, A: float, c: float) -> float:
    """The official code's alpha, rounded to two decimals as it is there: numpy's round of a
    numpy float64 (which differs from Python's round on some halves, e.g. 0.385)."""
    return float(round(A / np.pi * np.arctan(c * (h_self - h_peer)) + 0.5, 2))


def reference_alphas(h_self: Tensor, h_peer: Tensor, A: float, c: float) -> list[float]:
    """The official code's alpha per layer (``_reference_alpha``)."""
    return [_reference_alpha(a, b, A, c) for a, b in zip(h_self.tolist(), h_peer.tolist())]


# --------------------------------------------------------------------------------------------
# Which tensors get an alpha, and which follow another's
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraftPlan:
    """How a state dict is grafted, derived from its keys and shapes alone.

    ``layers`` are the keys whose entropy defines an alpha (conv and linear weights, and any
    other floating tensor that belongs to no conv). ``follows[key]`` names the layer whose alpha
    ``key`` is blended with (a layer follows itself). Keys in neither are left alone (integer
    buffers such as num_batches_tracked).
    """

    layers: tuple[str, ...]
    follows: dict[str, str]
    compat: str = "default"
    # Filter level: conv weight key -> the BatchNorm prefix after it, and the BN's next conv.
    bn_after: dict[str, str] = field(default_factory=dict)
    next_conv: dict[str, str] = field(default_factory=dict)

    def convs_without_bn(self, state: Mapping[str, Tensor]) -> list[str]:
        """Filter level: the conv layers with no BatchNorm gamma after them (they blend with
        their layer alpha instead of per-filter weights)."""
        return [k for k in self.layers if state[k].dim() > 2 and k not in self.bn_after]


def _prefix(key: str) -> str:
    return key.rpartition(".")[0]


def make_plan(state: Mapping[str, Tensor], compat: str = "default",
              norms: Mapping[str, int] | None = None) -> GraftPlan:
    """Group a state dict's tensors into layers, one module (key prefix) at a time.

    Default mode, in state-dict order (which is registration order, i.e. data-flow order in
    ResNet, MobileNetV2, VGG, WRN and torchvision models):
    * a floating tensor with 2 or more dims (a conv or linear weight) defines a layer;
    * a normalization layer (a prefix in ``norms``) follows the closest such weight before it
      whose output channels equal the norm's; with none, its first tensor defines a layer;
    * any other floating tensor (a bias, a LayerNorm's weight) follows the first layer of its
      own module, or defines one when its module has none yet.
    Integer buffers (num_batches_tracked) are left alone.

    ``norms`` maps the prefix of each normalization layer to its channels; ``module_plan``
    reads them from the module types. Without it, a prefix holding ``running_mean`` is one (a
    BatchNorm with running statistics).

    Reference mode: every key containing "conv" defines a layer, every other key follows the
    last such key before it, as the official loop does.
    """
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    keys = list(state.keys())
    if compat == "reference":
        return _reference_plan(state, keys)
    if norms is None:
        norms = {_prefix(k): state[k].shape[0] for k in keys if k.endswith("running_mean")}

    layers: list[str] = []
    follows: dict[str, str] = {}
    module_layer: dict[str, str] = {}  # prefix -> the first layer its tensors define
    bn_after: dict[str, str] = {}    # conv weight -> the BN that normalises its output
    next_conv: dict[str, str] = {}   # BN prefix -> the conv that consumes its output
    last_weight: str | None = None   # last conv/linear weight seen
    pending_bn: list[str] = []       # BNs waiting for the conv that consumes them
    for key in keys:
        t = state[key]
        if not t.is_floating_point():
            continue
        prefix = _prefix(key)
        if prefix in norms:
            if prefix not in module_layer:
                paired = last_weight is not None and state[last_weight].shape[0] == norms[prefix]
                module_layer[prefix] = last_weight if paired else key
                if not paired:  # no conv feeds it: the norm's first tensor defines a layer
                    layers.append(key)
                elif state[last_weight].dim() > 2 and f"{prefix}.weight" in state:
                    bn_after.setdefault(last_weight, prefix)  # filter level weighs by its gamma
                pending_bn.append(prefix)
            follows[key] = module_layer[prefix]
        elif t.dim() >= 2:
            layers.append(key)
            follows[key] = key
            module_layer.setdefault(prefix, key)
            last_weight = key
            for bn in pending_bn:
                if t.dim() > 2 and norms[bn] == t.shape[1]:
                    next_conv[bn] = key
            pending_bn = []
        else:
            if prefix not in module_layer:
                module_layer[prefix] = key
                layers.append(key)
            follows[key] = module_layer[prefix]
    return GraftPlan(tuple(layers), follows, "default", bn_after, next_conv)


# Normalization layers whose weight has one value per channel: they share the alpha of the
# conv or linear layer that feeds them (BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm).
NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)


def module_plan(model: torch.nn.Module, compat: str = "default") -> GraftPlan:
    """``make_plan`` for a model, with its normalization layers found by module type rather
    than by buffer names, so that a model's layers may be named and built freely (a BatchNorm
    without running statistics, a GroupNorm). Reference mode groups by key names, as the
    official code does."""
    norms = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, NORM_TYPES):
            norms[name] = m.num_channels if isinstance(m, torch.nn.GroupNorm) else m.num_features
    return make_plan(model.state_dict(), compat, norms)


def _reference_plan(state: Mapping[str, Tensor], keys: list[str]) -> GraftPlan:
    layers: list[str] = []
    follows: dict[str, str] = {}
    last: str | None = None
    for key in keys:
        if "conv" in key:
            last = key
            layers.append(key)
        if last is None:
            raise ValueError(
                f"'reference' (the official code's) needs a key containing 'conv' before {key!r}: "
                "the official code has no alpha to blend it with (it would crash)")
        follows[key] = last
    return GraftPlan(tuple(layers), follows, "reference")


# --------------------------------------------------------------------------------------------
# Blending
# --------------------------------------------------------------------------------------------


def layout(state: Mapping[str, Tensor]) -> list[tuple[str, tuple, str]]:
    """(key, shape, dtype) of each tensor, in order: what two states to be blended must share."""
    return [(k, tuple(t.shape), str(t.dtype)) for k, t in state.items()]


def layout_difference(first: list[tuple], other: list[tuple], names=("own", "peer")) -> str | None:
    """Where two layouts (``layout``) first differ, the sides called ``names``; None where they match."""
    a, b = names
    for i, ((key, shape, dtype), (their_key, their_shape, their_dtype)) in enumerate(zip(first, other)):
        if key != their_key:
            return f"key #{i}: {key!r} in {a}, {their_key!r} in {b}"
        if shape != their_shape:
            return f"{key!r}: shape {shape} in {a}, {their_shape} in {b}"
        if dtype != their_dtype:
            return f"{key!r}: dtype {dtype} in {a}, {their_dtype} in {b}"
    if len(first) == len(other):
        return None
    longer, where = (first, a) if len(first) > len(other) else (other, b)
    return f"{longer[min(len(first), len(other))][0]!r} only in {where}"


def check_compatible(own: Mapping[str, Tensor], peer: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming the first key where the two states differ in name, shape or dtype."""
    differ = layout_difference(layout(own), layout(peer), ("the own state", "the peer state"))
    if differ is not None:
        raise ValueError(f"the states differ: {differ}")


def first_non_finite(state: Mapping[str, Tensor]) -> str | None:
    """The first key holding NaN or Inf, or None: one pass over all values (a flat copy per
    dtype), and a search for the key only when one holds a NaN or Inf."""
    keys = [k for k, t in state.items() if t.is_floating_point() and t.numel()]
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for k in keys:
        by_dtype.setdefault(state[k].dtype, []).append(state[k].detach().reshape(-1))
    if all(bool(torch.cat(flat).isfinite().all()) for flat in by_dtype.values()):
        return None
    finite = torch.stack([state[k].isfinite().all() for k in keys]).tolist()
    return next((k for k, ok in zip(keys, finite) if not ok), None)


def first_non_finite_given(state: Mapping[str, Tensor], plan: GraftPlan, entropies: Tensor) -> str | None:
    """``first_non_finite`` for a state whose layer entropies are known. A NaN or Inf in a layer
    makes its entropy NaN (in the default mode), so while the entropies are finite only the other
    tensors (biases, BatchNorm: a few percent of the values) need a look."""
    if plan.compat == "default" and entropies.numel() == len(plan.layers) and bool(entropies.isfinite().all()):
        layers = set(plan.layers)
        state = {k: t for k, t in state.items() if k not in layers}
    return first_non_finite(state)


def plan_entropies(state: Mapping[str, Tensor], plan: GraftPlan, bins: int = 10) -> Tensor:
    """The entropy of every layer of ``plan`` (float64, on the state's device)."""
    tensors = [state[k] for k in plan.layers]
    if plan.compat == "reference":
        return torch.tensor([reference_entropy(t, bins) for t in tensors], dtype=torch.float64)
    return weight_entropies(tensors, bins).to(torch.float64)


def plan_l1_norms(state: Mapping[str, Tensor], plan: GraftPlan) -> Tensor:
    """The L1 norm of every layer of ``plan`` (the tensor that defines it; float64, on the
    state's device): the paper's ablation of entropy as the criterion. NaN or Inf in a layer
    gives a non-finite norm, as it gives a NaN entropy."""
    if not plan.layers:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([state[k].detach().double().abs().sum() for k in plan.layers])


def peer_distances(own: Mapping[str, Tensor], peer: Mapping[str, Tensor], layers: Sequence[str]) -> Tensor:
    """How far the peer is from one's own weights, per layer: ||W_peer - W_self|| / ||W_self||
    (L2 over the tensor that defines the layer; 0 when both are zero, inf when only own is).
    This is the networks' diversity, which grafting feeds on. Computed in float32, or float64 for
    float64 weights (whose differences float32 can round to 0); float64, on the state's device."""
    if not layers:
        return torch.zeros(0, dtype=torch.float64)
    diff = torch.stack([torch.linalg.vector_norm(_as_float(peer[k]) - _as_float(own[k])) for k in layers]).double()
    norm = torch.stack([torch.linalg.vector_norm(_as_float(own[k])) for k in layers]).double()
    return torch.where(norm > 0, diff / norm, torch.where(diff > 0, math.inf, 0.0))


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _blend(own: Tensor, peer: Tensor, offset: float | Tensor) -> Tensor:
    """alpha * own + (1 - alpha) * peer with alpha = 0.5 + offset, written so that blending a
    tensor with itself is exact and the two sides of a 2-network ring get identical results."""
    if own.dtype in _LOW_PRECISION:  # own + peer can overflow the dtype where the blend does not
        return _blend(own.double(), peer.double(), offset).to(own.dtype)
    # 0.5 * (own + peer) + offset * (own - peer), in place on two temporaries (the offset, a
    # Python float, is rounded to the tensor's dtype as a tensor of it would be).
    return torch.add(own, peer).mul_(0.5).add_(torch.sub(own, peer).mul_(offset))


# Tensors up to this many values (biases, BatchNorm tensors, small convs) are blended together:
# for them a kernel launch costs more than the arithmetic.
_SMALL = 4096


def _blend_small(own: Mapping[str, Tensor], peer: Mapping[str, Tensor], offsets: dict[str, float]) -> dict[str, Tensor]:
    """``_blend`` of many small tensors at once: one flat buffer per dtype, each tensor's offset
    repeated over its values. The same arithmetic, value by value; returns views of the result."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key in offsets:
        by_dtype.setdefault(own[key].dtype, []).append(key)
    out = {}
    for dtype, keys in by_dtype.items():
        sizes = [own[k].numel() for k in keys]
        flat_own, flat_peer = (torch.cat([s[k].reshape(-1) for k in keys]) for s in (own, peer))
        offset = torch.tensor([offsets[k] for k in keys], dtype=torch.float64, device=flat_own.device)
        offset = offset.to(torch.float64 if dtype in _LOW_PRECISION else dtype)  # as _blend rounds a float
        blended = _blend(flat_own, flat_peer, offset.repeat_interleave(torch.tensor(sizes, device=offset.device)))
        out.update({k: piece.view(own[k].shape) for k, piece in zip(keys, blended.split(sizes))})
    return out


def blend(own: Mapping[str, Tensor], peer: Mapping[str, Tensor], plan: GraftPlan, offsets: Mapping[str, float],
          filters: Mapping[str, tuple] | None = None) -> dict[str, Tensor]:
    """Every tensor of ``own`` blended with ``peer``'s: alpha * own + (1 - alpha) * peer with
    alpha = 0.5 + ``offsets[its layer]`` (``plan.follows``), or per channel where ``filters``
    gives offsets (``filter_offsets``). Tensors outside the plan are copied. New tensors;
    inputs unchanged."""
    filters = filters or {}
    small = _blend_small(own, peer, {k: offsets[lead] for k, lead in plan.follows.items()
                                     if k not in filters and own[k].numel() <= _SMALL})
    out: dict[str, Tensor] = {}
    for key, t in own.items():
        leader = plan.follows.get(key)
        if leader is None:
            out[key] = t.clone()
        elif key in filters:
            out[key] = _blend_filters(t, peer[key], *filters[key], offsets[leader])
        elif key in small:
            out[key] = small[key]
        else:
            out[key] = _blend(t, peer[key], offsets[leader])
    return out


def blend_reference(own: Mapping[str, Tensor], peer: Mapping[str, Tensor], plan: GraftPlan,
                    alphas: Mapping[str, float]) -> dict[str, Tensor]:
    """The official code's blend, key by key: ``own * alpha + peer * (1 - alpha)`` in the
    tensor's dtype, integer buffers included, as its loop does."""
    out: dict[str, Tensor] = {}
    for key, t in own.items():
        leader = plan.follows.get(key)
        out[key] = t.clone() if leader is None else (t * alphas[leader] + peer[key] * (1 - alphas[leader])).to(t.dtype)
    return out


def filter_offsets(own: Mapping[str, Tensor], peer: Mapping[str, Tensor],
                   plan: GraftPlan) -> tuple[dict[str, tuple], dict[str, float]]:
    """Filter level: per-channel offsets from the |gamma| of the BN after each conv.

    Returns (key -> (output-channel offsets or None, input-channel offsets or None), conv layer
    -> the mean of its channels' alphas), with alpha_j = |g_self_j| / (|g_self_j| + |g_peer_j|)
    written as an offset from 0.5 (0/0 -> 0.5). Convs with no BN after them get none
    (``plan.convs_without_bn``): they blend with their layer alpha.
    """
    channel: dict[str, Tensor] = {}
    for bn in plan.bn_after.values():
        g_self, g_peer = own[f"{bn}.weight"].abs(), peer[f"{bn}.weight"].abs()
        total = g_self + g_peer
        channel[bn] = torch.where(total > 0, 0.5 * (g_self - g_peer) / total, torch.zeros_like(total))
    out_off = {key: channel[plan.bn_after[leader]]
               for key, leader in plan.follows.items() if leader in plan.bn_after}
    in_off = {conv: channel[bn] for bn, conv in plan.next_conv.items() if bn in channel}
    layer_alpha = {conv: float(0.5 + channel[bn].mean()) for conv, bn in plan.bn_after.items()}
    return {k: (out_off.get(k), in_off.get(k)) for k in out_off.keys() | in_off.keys()}, layer_alpha


def _blend_filters(own: Tensor, peer: Tensor, out_off, in_off, layer_off) -> Tensor:
    """Blend along output channels (dim 0) and, for a conv fed by a BN, input channels (dim 1).

    A conv weight's element (i, j) keeps alpha_out_i * alpha_in_j of itself, which is what the
    official code's two successive blends (input channels, then output filters) amount to. A
    conv with no BN after it uses its layer alpha for the output side.
    """
    if own.dtype in _LOW_PRECISION:
        return _blend_filters(own.double(), peer.double(), out_off, in_off, layer_off).to(own.dtype)
    def column(off: Tensor, dim: int) -> Tensor:
        shape = [1] * own.dim()
        shape[dim] = -1
        return off.to(own.dtype).view(shape)

    if in_off is None:
        return _blend(own, peer, column(out_off, 0))
    if out_off is None:
        out_off = torch.tensor([layer_off], dtype=own.dtype, device=own.device)
    alpha_out = 0.5 + column(out_off, 0)
    alpha = alpha_out * (0.5 + column(in_off, 1))
    return alpha * own + (1 - alpha) * peer


# --------------------------------------------------------------------------------------------
# Invalid filters
# --------------------------------------------------------------------------------------------


def _filter_norms(model_or_state_dict) -> list[tuple[str, Tensor]]:
    """(name, L1 norm of each filter) of every conv weight: every floating weight with 3 or more
    dims, a filter being one slice along dim 0."""
    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
             else model_or_state_dict)
    return [(k, t.detach().flatten(1).abs().sum(1)) for k, t in state.items()
            if t.is_floating_point() and t.dim() >= 3 and k.endswith("weight")]


def count_invalid_filters(model_or_state_dict, thresholds: Iterable[float] = (0.1, 0.01)) -> dict:
    """Count conv filters whose L1 norm falls below each threshold (the paper's "invalid" filters).

    Returns ``{"total": F, "invalid": {thr: n}, "layers": [{"layer", "filters",
    "invalid": {thr: n}}]}``.
    """
    thresholds = tuple(float(t) for t in thresholds)
    norms = _filter_norms(model_or_state_dict)
    if not norms:
        return {"total": 0, "invalid": {t: 0 for t in thresholds}, "layers": []}
    thr = torch.tensor(thresholds, dtype=norms[0][1].dtype, device=norms[0][1].device)
    below = torch.stack([(n.unsqueeze(1) < thr).sum(0) for _, n in norms]).tolist()
    layers = [{"layer": k, "filters": len(n), "invalid": dict(zip(thresholds, b))}
              for (k, n), b in zip(norms, below)]
    totals = [sum(col) for col in zip(*below)]
    return {"total": sum(len(n) for _, n in norms), "invalid": dict(zip(thresholds, totals)),
            "layers": layers}


def invalid_in_both(own, peer, thresholds: Iterable[float] = (0.1, 0.01)) -> dict:
    """``{thr: n}``: the filters invalid in ``own`` whose filter at the same position in ``peer``
    is invalid too. A graft blends each filter with the one at its position in the peer, so it
    can revive an invalid filter only where the peer's is valid: these it cannot. (Between
    networks that never blended, positions do not correspond and the overlap is chance.)"""
    thresholds = tuple(float(t) for t in thresholds)
    own, peer = (m.state_dict() if isinstance(m, torch.nn.Module) else m for m in (own, peer))
    check_compatible(own, peer)
    peer_norms = dict(_filter_norms(peer))
    counts = dict.fromkeys(thresholds, 0)
    for name, norms in _filter_norms(own):
        worst = torch.maximum(norms, peer_norms[name].to(norms.device))
        for t in thresholds:
            counts[t] += int((worst < t).sum())
    return counts
