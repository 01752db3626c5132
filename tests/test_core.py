"""The grafting math, checked against its definitions and against plain re-statements."""

import math
import operator

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from graft import (
    adaptive_weight,
    count_invalid_filters,
    filter_entropy,
    graft_state_dict,
    invalid_in_both,
    make_plan,
    peer_distances,
    reference_entropy,
    weight_entropies,
    weight_entropy,
)
from graft.models import build_model

FAST = settings(max_examples=60, deadline=None)
floats = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


def random_tensor(seed: int, shape=(8, 4, 3, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand((), generator=g) * 3


def plain_entropy(x: torch.Tensor, bins: int) -> float:
    """The definition, element by element: bin = floor((x - min) / width), max in the top bin."""
    x = x.reshape(-1).double()
    lo, hi = x.min().item(), x.max().item()
    if hi == lo:
        return 0.0
    counts = [0] * bins
    for v in x.tolist():
        counts[min(int((v - lo) / (hi - lo) * bins), bins - 1)] += 1
    return -sum(c / len(x) * math.log(c / len(x)) for c in counts if c)


def official_entropy(x: torch.Tensor, n: int = 10) -> float:
    """grafting_cifar/grafting.py's entropy, restated: a loop of masked passes, on x's device."""
    x = x.reshape(-1)
    scale = (x.max() - x.min()) / n
    entropy = torch.zeros((), device=x.device)
    for i in range(n):
        p = torch.sum((x >= x.min() + i * scale) * (x < x.min() + (i + 1) * scale), dtype=torch.float) / len(x)
        if p != 0:
            entropy -= p * torch.log(p)
    return float(entropy)


def seeded_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10)


def official_alpha(h_self: float, h_peer: float, A: float = 0.4, c: float = 500) -> float:
    """grafting_cifar/grafting.py's alpha, restated: numpy's arctan, and round() of a numpy float."""
    return round(A / np.pi * np.arctan(c * (h_self - h_peer)) + 0.5, 2)


# ------------------------------------------------------------------------------ entropy

@FAST
@given(st.integers(0, 10_000), st.integers(2, 20))
def test_entropy_matches_definition_and_bound(seed, bins):
    x = random_tensor(seed)
    h = weight_entropy(x, bins).item()
    assert h == pytest.approx(plain_entropy(x, bins), abs=1e-5)
    assert 0 <= h <= math.log(bins) + 1e-6


@pytest.mark.parametrize("bins", [2, 10, 17])
def test_entropy_is_log_bins_for_values_spread_evenly(bins):
    # Bin centres of an even grid over [0, 1], 5 values each, plus the two ends.
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    x = torch.cat([centres.repeat(5), torch.tensor([0.0, 1.0])])
    counts = torch.histc(x, bins, 0, 1)
    expected = -(counts / counts.sum() * (counts / counts.sum()).log()).sum().item()
    assert weight_entropy(x, bins).item() == pytest.approx(expected, abs=1e-9)
    even = ((torch.arange(bins * 7) % bins) + 0.5).float()  # exactly 7 values per bin
    assert weight_entropy(even, bins).item() == pytest.approx(math.log(bins), abs=1e-6)


def test_entropy_of_constant_or_empty_is_zero():
    assert str(weight_entropy(torch.full((3, 3), 0.7)).item()) == "0.0"  # +0, not -0
    assert weight_entropy(torch.empty(0)).item() == 0.0
    assert weight_entropies([torch.empty(0), torch.ones(3), torch.empty(2, 0)]).tolist() == [0.0] * 3
    mixed = weight_entropies([torch.tensor([0.0, 1.0]), torch.empty(0)], 2)
    assert mixed.tolist() == [pytest.approx(math.log(2)), 0.0]
    assert reference_entropy(torch.full((3, 3), 0.7)) == 0.0
    assert filter_entropy(torch.ones(4, 2, 3, 3)).tolist() == [0.0] * 4
    assert filter_entropy(torch.ones(0, 2, 3, 3)).shape == (0,)  # no filters: no entropies, no error


def test_maximum_is_counted():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0])  # max alone in the top bin
    p = torch.tensor([0.75, 0.25])
    assert weight_entropy(x, 2).item() == pytest.approx(-(p * p.log()).sum().item())
    # The official code drops the maximum but still divides by all 4 values.
    assert reference_entropy(x, 2) == pytest.approx(-0.75 * math.log(0.75))


def test_batched_and_per_filter_forms_agree_with_single():
    tensors = [random_tensor(s, shape) for s, shape in enumerate([(4, 3, 3, 3), (10,), (7, 5), (1, 1, 1, 1)])]
    batched = weight_entropies(tensors, 10)
    single = torch.stack([weight_entropy(t, 10) for t in tensors])
    torch.testing.assert_close(batched, single)
    w = random_tensor(3)
    per_filter = filter_entropy(w, 10)
    assert per_filter.shape == (w.shape[0],)
    torch.testing.assert_close(per_filter, torch.stack([weight_entropy(f, 10) for f in w]))


@pytest.mark.parametrize("values", [[-3e38, 0.0, 3e38], [0.0, 1e-39, 2e-39]],
                         ids=["max-min-overflows", "bins-over-width-overflows"])
def test_entropy_at_the_ends_of_float32(values):
    x = torch.tensor(values, dtype=torch.float32)  # three values in bins 0, 5 and 9
    assert plain_entropy(x, 10) == pytest.approx(math.log(3))
    assert weight_entropy(x).item() == pytest.approx(math.log(3))
    assert filter_entropy(torch.stack([x, x])).tolist() == [pytest.approx(math.log(3))] * 2
    # In a batch, only that tensor takes the float64 path: the others' values are unchanged.
    others = [random_tensor(1), random_tensor(2, (10,))]
    batched = weight_entropies([others[0], x, others[1]])
    assert batched[1].item() == pytest.approx(math.log(3))
    assert torch.equal(batched[[0, 2]], weight_entropies(others))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_entropy_of_nan_or_inf_is_nan(bad):
    x = random_tensor(0)
    x[1, 2, 0, 0] = bad
    assert math.isnan(weight_entropy(x).item())
    h = weight_entropies([random_tensor(3), x])
    assert not math.isnan(h[0].item()) and math.isnan(h[1].item())


def test_entropy_rejects_bad_bins():
    with pytest.raises(ValueError, match="bins"):
        weight_entropy(torch.randn(3), bins=1)


@FAST
@given(st.integers(0, 10_000))
def test_reference_entropy_matches_official_loop(seed):
    x = random_tensor(seed)
    assert reference_entropy(x) == official_entropy(x)  # bit for bit: c = 500 magnifies any difference


def test_reference_alpha_matches_official_where_a_last_bit_matters():
    # Two MobileNetV2 layers whose official entropies differ by 2.4e-4: a vector sum of the ten
    # terms (instead of the official one-by-one subtraction) moved the rounded alpha 0.48 -> 0.49.
    key = "layers.10.conv2.weight"
    a, b = (seeded_model("mobilenetv2", s).state_dict()[key] for s in (1, 101))
    _, report = graft_state_dict({key: a}, {key: b}, criterion="reference")
    assert report.layers[0].alpha == official_alpha(official_entropy(a), official_entropy(b))


# ------------------------------------------------------------------------------ alpha

@FAST
@given(floats, floats, st.floats(0, 1), st.floats(0, 1000))
def test_alpha_properties(a, b, A, c):
    alpha = adaptive_weight(a, b, A, c)
    assert 0.5 - A / 2 <= alpha <= 0.5 + A / 2
    assert adaptive_weight(a, a, A, c) == 0.5
    assert alpha + adaptive_weight(b, a, A, c) == pytest.approx(1.0, abs=1e-12)


def test_alpha_keeps_float64_precision_next_to_a_python_float():
    alpha = adaptive_weight(torch.tensor(1.0, dtype=torch.float64), 1 + 1e-9)
    assert alpha.item() == pytest.approx(adaptive_weight(1.0, 1 + 1e-9), abs=1e-15) and alpha.item() < 0.5


def test_alpha_on_tensors_matches_floats():
    hs, hp = torch.tensor([1.0, 2.0, 2.001]), torch.tensor([1.5, 2.0, 2.0])
    expected = [adaptive_weight(a, b) for a, b in zip(hs.tolist(), hp.tolist())]
    torch.testing.assert_close(adaptive_weight(hs, hp), torch.tensor(expected))


# ------------------------------------------------------------------------------ graft_state_dict

def tiny_states(model="resnet20", seeds=(0, 1)):
    states = []
    for s in seeds:
        torch.manual_seed(s)
        m = build_model(model, 10)
        with torch.no_grad():  # make BN parameters and statistics non-trivial
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.uniform_(-1, 1)
                    mod.bias.normal_()
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 2)
                    mod.num_batches_tracked.fill_(391)
        states.append(m.state_dict())
    return states


@pytest.mark.parametrize("criterion", ["entropy", "bn_scale", "l1", "constant"])
def test_graft_with_itself_is_identity(criterion):
    own, _ = tiny_states()
    new, report = graft_state_dict(own, own, criterion=criterion)
    for k in own:
        assert torch.equal(new[k], own[k]), k
    assert all(r.alpha == 0.5 for r in report.layers)


def test_two_network_ring_gives_identical_states():
    a, b = tiny_states()
    new_a, _ = graft_state_dict(a, b)
    new_b, _ = graft_state_dict(b, a)
    for k in a:
        assert torch.equal(new_a[k], new_b[k]), k


def test_inputs_are_not_mutated():
    a, b = tiny_states()
    copies = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    for criterion in ("entropy", "bn_scale", "reference", "l1", "constant"):
        graft_state_dict(a, b, criterion=criterion)
    for s, c in zip((a, b), copies):
        assert all(torch.equal(s[k], c[k]) for k in s)


def test_layer_level_blends_conv_bn_and_classifier_with_their_alpha():
    a, b = tiny_states()
    new, report = graft_state_dict(a, b, A=0.4, c=500)
    by_layer = {r.layer: r for r in report.layers}
    assert set(by_layer) == {k for k, t in a.items() if t.dim() >= 2}
    for conv, bn in [("conv1.weight", "bn1"), ("layer2.0.conv2.weight", "layer2.0.bn2")]:
        r = by_layer[conv]
        assert r.score_self == pytest.approx(weight_entropy(a[conv]).item())
        assert r.score_peer == pytest.approx(weight_entropy(b[conv]).item())
        alpha = adaptive_weight(r.score_self, r.score_peer, 0.4, 500)
        assert r.alpha == pytest.approx(alpha)
        for key in [conv] + [f"{bn}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]:
            torch.testing.assert_close(new[key], alpha * a[key] + (1 - alpha) * b[key])
        assert torch.equal(new[f"{bn}.num_batches_tracked"], a[f"{bn}.num_batches_tracked"])
    r = by_layer["linear.weight"]
    alpha = adaptive_weight(r.score_self, r.score_peer)
    torch.testing.assert_close(new["linear.bias"], alpha * a["linear.bias"] + (1 - alpha) * b["linear.bias"])


def test_peer_distance_is_the_difference_relative_to_ones_own_weights():
    own = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.zeros(2, 2), "c": torch.zeros(2, 2)}
    peer = {"a": torch.tensor([[3.0, 0.0]]), "b": torch.ones(2, 2), "c": torch.zeros(2, 2)}
    assert peer_distances(own, peer, ["a", "b", "c"]).tolist() == [0.8, math.inf, 0.0]  # |(0,4)| / |(3,4)|
    a, b = tiny_states()
    _, report = graft_state_dict(a, b)
    for r in report.layers:
        assert r.peer_distance == pytest.approx(((b[r.layer] - a[r.layer]).norm() / a[r.layer].norm()).item())
    distances = [r.peer_distance for r in report.layers]
    assert report.mean_peer_distance() == pytest.approx(sum(distances) / len(distances))
    # float64 weights are compared in float64: a difference float32 rounds away still counts.
    w = {"a": torch.ones(3, dtype=torch.float64)}
    assert peer_distances(w, {"a": w["a"] + 1e-12}, ["a"]).item() == pytest.approx(1e-12, rel=1e-3, abs=0)


def test_reference_mode_matches_official_restatement():
    a, b = tiny_states()
    A, c = 0.4, 500
    expected, w = {}, None
    for key, u in a.items():  # the official loop, restated
        if "conv" in key:
            w = official_alpha(official_entropy(u), official_entropy(b[key]), A, c)
        expected[key] = (u * w + b[key] * (1 - w)).to(u.dtype)
    new, report = graft_state_dict(a, b, A=A, c=c, criterion="reference")
    for key in a:
        assert torch.equal(new[key], expected[key]), key
    assert all(round(r.alpha, 2) == r.alpha for r in report.layers)
    assert len(report.layers) == sum("conv" in k for k in a)


def test_reference_mode_needs_a_conv_key_first():
    state = {"fc.weight": torch.randn(2, 2), "conv.weight": torch.randn(2, 2, 1, 1)}
    with pytest.raises(ValueError, match="reference"):
        graft_state_dict(state, state, criterion="reference")


class ConvBNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2, 2)


def test_filter_level_blends_exactly_the_right_channels():
    torch.manual_seed(0)
    a, b = ConvBNConv().state_dict(), ConvBNConv().state_dict()
    a["bn1.weight"] = torch.tensor([1.0, 0.0, -3.0])
    b["bn1.weight"] = torch.tensor([3.0, 0.0, 1.0])
    a["bn1.running_mean"], b["bn1.running_mean"] = torch.randn(3), torch.randn(3)
    alpha = torch.tensor([0.25, 0.5, 0.75])  # |a|/(|a|+|b|), 0/0 -> 0.5
    new, report = graft_state_dict(a, b, criterion="bn_scale")
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        torch.testing.assert_close(new[key], alpha * a[key] + (1 - alpha) * b[key])
    out = alpha.view(3, 1, 1, 1)
    torch.testing.assert_close(new["conv1.weight"], out * a["conv1.weight"] + (1 - out) * b["conv1.weight"])
    # conv2 has no BN after it: layer alpha on its outputs, times the BN's alpha on its inputs.
    assert report.fallbacks == ["conv2.weight"]
    r = {r.layer: r for r in report.layers}["conv2.weight"]
    keep = adaptive_weight(r.score_self, r.score_peer) * alpha.view(1, 3, 1, 1)
    torch.testing.assert_close(new["conv2.weight"], keep * a["conv2.weight"] + (1 - keep) * b["conv2.weight"])


def test_filter_level_with_a_bn_without_affine_parameters():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 3, 1))  # noqa: E731
    a, b = make().state_dict(), make().state_dict()
    new, report = graft_state_dict(a, b, criterion="bn_scale")
    assert report.fallbacks == ["0.weight", "2.weight"]  # no gamma to weigh filters by
    r = {r.layer: r for r in report.layers}["0.weight"]
    alpha = adaptive_weight(r.score_self, r.score_peer)
    for key in ("0.weight", "1.running_mean"):  # the BN's statistics follow the conv's alpha
        torch.testing.assert_close(new[key], alpha * a[key] + (1 - alpha) * b[key])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_blend_does_not_overflow(dtype):
    big = torch.finfo(dtype).max / 1.5  # own + peer would overflow in the dtype itself
    a = {"conv.weight": torch.full((2, 2, 1, 1), big, dtype=dtype)}
    new, _ = graft_state_dict(a, {"conv.weight": a["conv.weight"].clone()})
    assert new["conv.weight"].dtype == dtype and torch.equal(new["conv.weight"], a["conv.weight"])


def test_plan_pairs_bn_with_the_conv_before_it():
    plan = make_plan(build_model("mobilenetv2", 10).state_dict())
    assert plan.follows["layers.1.shortcut.1.running_var"] == "layers.1.shortcut.0.weight"
    assert plan.follows["layers.1.bn2.weight"] == "layers.1.conv2.weight"
    assert plan.bn_after["layers.1.conv3.weight"] == "layers.1.bn3"
    # Depthwise convs take no input-channel blending (their dim 1 is 1).
    assert "layers.1.bn1" not in plan.next_conv
    assert plan.next_conv["layers.1.bn2"] == "layers.1.conv3.weight"


def test_plan_of_preactivation_wrn_pairs_by_channels():
    plan = make_plan(build_model("wrn16_2", 10).state_dict())
    # blocks.0.bn1 normalises the stem's output (16 channels), not a conv of its own block.
    assert plan.follows["blocks.0.bn1.weight"] == "conv1.weight"
    assert plan.follows["blocks.0.bn2.weight"] == "blocks.0.conv1.weight"



# Ops after which channel j is still channel j (the BN's output reaches the next conv through them).
CHANNEL_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)
CHANNEL_PRESERVING_FUNCTIONS = (operator.add, torch.add, F.relu, torch.relu, F.leaky_relu, F.relu6)


def data_flow(model: nn.Module):
    """From a torch.fx trace: BN -> the module feeding it, and BN -> the convs reading its channels."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())

    def module(node):
        return modules[node.target] if node.op == "call_module" else None

    def readers(node):
        for user in node.users:
            m = module(user)
            if isinstance(m, nn.Conv2d):
                yield user.target
            elif isinstance(m, CHANNEL_PRESERVING_MODULES) or user.target in CHANNEL_PRESERVING_FUNCTIONS:
                yield from readers(user)

    fed_by, read_by = {}, {}
    for node in graph.nodes:
        if isinstance(module(node), nn.BatchNorm2d):
            source = module(node.args[0])
            fed_by[node.target] = node.args[0].target if isinstance(source, (nn.Conv2d, nn.Linear)) else None
            read_by[node.target] = set(readers(node))
    return fed_by, read_by


@pytest.mark.parametrize("name", ["resnet20", "resnet20_leaky", "mobilenetv2", "vgg16_bn", "wrn16_2",
                                  "tv:resnet18", "tv:mobilenet_v2"])
def test_plan_agrees_with_the_traced_data_flow(name):
    model = build_model(name, 10)
    plan = make_plan(model.state_dict())
    fed_by, read_by = data_flow(model)
    for bn, conv in fed_by.items():
        if conv is not None:  # a BN fed by a conv takes that conv's alpha
            assert plan.follows[f"{bn}.weight"] == f"{conv}.weight", bn
        # filter level: a BN's channel alphas go to a conv that really reads those channels
        if bn in plan.next_conv:
            assert plan.next_conv[bn][:-len(".weight")] in read_by[bn], bn

# ------------------------------------------------------------------------------ bad input

def test_mismatched_peer_names_first_bad_key():
    a, b = tiny_states()
    b_renamed = {("x" + k if k == "layer1.0.bn1.bias" else k): v for k, v in b.items()}
    with pytest.raises(ValueError, match="layer1.0.bn1.bias"):
        graft_state_dict(a, b_renamed)
    b_shape = dict(b, **{"linear.weight": torch.zeros(5, 64)})
    with pytest.raises(ValueError, match="linear.weight.*shape"):
        graft_state_dict(a, b_shape)
    b_dtype = dict(b, **{"linear.bias": b["linear.bias"].double()})
    with pytest.raises(ValueError, match="linear.bias.*dtype"):
        graft_state_dict(a, b_dtype)
    with pytest.raises(ValueError, match="the states differ: 'linear.bias' only in the own state"):
        graft_state_dict(a, {k: v for k, v in b.items() if k != "linear.bias"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["own", "peer"])
@pytest.mark.parametrize("key", ["layer3.1.conv2.weight", "layer2.0.bn1.running_var", "linear.bias"])
@pytest.mark.parametrize("criterion", ["entropy", "reference", "l1", "constant"])
def test_non_finite_weights_name_the_layer(bad, side, key, criterion):
    a, b = tiny_states()
    state = a if side == "own" else b
    state[key] = state[key].clone()
    state[key].view(-1)[-1] = bad
    with pytest.raises(ValueError, match=f"{side} state: NaN or Inf in '{key}'"):
        graft_state_dict(a, b, criterion=criterion)


# ------------------------------------------------------------------------------ invalid filters

def test_invalid_filter_counts_on_hand_built_model():
    m = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.Conv2d(4, 2, 1, bias=False), nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([0.5, 0.05, 0.005, -0.2]).view(4, 1, 1, 1))
        m[1].weight.copy_(torch.tensor([[0.01, -0.01, 0.02, 0.0], [1.0, 0, 0, 0]]).view(2, 4, 1, 1))
    counts = count_invalid_filters(m, thresholds=(0.1, 0.01))
    assert counts["total"] == 6
    assert counts["invalid"] == {0.1: 3, 0.01: 1}  # L1 norms: .5 .05 .005 .2 | .04 1
    assert [layer["invalid"] for layer in counts["layers"]] == [{0.1: 2, 0.01: 1}, {0.1: 1, 0.01: 0}]


def test_invalid_in_both_counts_the_filters_no_graft_can_revive():
    own = {"conv.weight": torch.tensor([0.0, 0.05, 0.5, 0.005]).view(4, 1, 1, 1), "fc.weight": torch.zeros(2, 2)}
    peer = {"conv.weight": torch.tensor([0.0, 0.5, 0.05, 0.005]).view(4, 1, 1, 1), "fc.weight": torch.zeros(2, 2)}
    # Filter 0 and 3 are invalid in both under 0.1, filter 1 only in own, 2 only in peer; the
    # linear layer is no conv.
    assert invalid_in_both(own, peer, (0.1, 0.01)) == {0.1: 2, 0.01: 2}
    assert invalid_in_both(own, own, (0.1,)) == {0.1: 3}
    with pytest.raises(ValueError, match=r"the states differ: 'conv.weight': shape \(4, 1, 1, 1\) in the own state"):
        invalid_in_both(own, {"conv.weight": torch.zeros(2, 1, 1, 1)})


def test_resnet32_has_1136_filters_like_the_paper():
    assert count_invalid_filters(build_model("resnet32", 10))["total"] == 1136
