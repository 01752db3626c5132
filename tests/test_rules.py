"""Each grafting rule against an independent re-statement of its formula, on 2 and 3 networks
(in memory: the distributed paths are in test_exchange.py), and GraftSpec's validation."""

import math

import pytest
import torch

from graft import core
from graft.rules import CRITERIA, PARTNERS, PRESETS, GraftSpec, SpecError, graft_state_dict
from test_core import plain_entropy, tiny_states


def restated(own, peer, plan, alpha_of_layer):
    """alpha * own + (1 - alpha) * peer for every tensor that follows a layer, in float64."""
    out = {}
    for key, t in own.items():
        lead = plan.follows.get(key)
        if lead is None:
            out[key] = t
        else:
            a = alpha_of_layer[lead]
            out[key] = (a * t.double() + (1 - a) * peer[key].double()).to(t.dtype)
    return out


def alpha(h_self, h_peer, A=0.4, c=500):
    return A / math.pi * math.atan(c * (h_self - h_peer)) + 0.5


def three_states():
    a, b = tiny_states()
    c = {k: (v * 0.5 + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in a.items()}
    return [a, b, c]


SCORE = {  # a layer's score by its definition, in float64
    "entropy": lambda t: plain_entropy(t, 10),
    "l1": lambda t: t.double().abs().sum().item(),
}


@pytest.mark.parametrize("networks", [2, 3])
@pytest.mark.parametrize("criterion", ["entropy", "l1", "constant"])
@pytest.mark.parametrize("partner", ["ring", "population"])
def test_each_rule_is_its_formula(networks, criterion, partner):
    """The scores are their definitions (within float32 rounding), the alphas the formula of the
    scores, the blend alpha * own + (1 - alpha) * partner for every tensor of a layer."""
    states = three_states()[:networks]
    spec = GraftSpec(criterion=criterion, partner=partner, alpha=0.7)
    mean = {k: (sum(s[k].double() for s in states) / networks).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}
    for k, own in enumerate(states):
        assert PARTNERS["ring"].peer(k, networks) == (k - 1) % networks
        peer = mean if partner == "population" else states[(k - 1) % networks]
        new, report = graft_state_dict(own, peer, spec)
        plan = core.make_plan(own)
        assert [r.layer for r in report.layers] == list(plan.layers)
        for r in report.layers:
            if criterion == "constant":
                assert r.alpha == 0.7
                continue
            assert r.score_self == pytest.approx(SCORE[criterion](own[r.layer]), rel=1e-6)
            assert r.score_peer == pytest.approx(SCORE[criterion](peer[r.layer]), rel=1e-6)
            assert r.alpha == pytest.approx(alpha(r.score_self, r.score_peer), abs=1e-12)
        want = restated(own, peer, plan, {r.layer: r.alpha for r in report.layers})
        for key in own:
            torch.testing.assert_close(new[key], want[key], rtol=1e-5, atol=2e-6, msg=key)


def test_a_criterion_names_its_score_in_the_records():
    a, b = tiny_states()
    assert set(graft_state_dict(a, b)[1].as_records()[0]) == {"layer", "entropy_self", "entropy_peer", "alpha",
                                                              "peer_distance"}
    assert "l1_self" in graft_state_dict(a, b, criterion="l1")[1].as_records()[0]
    assert set(graft_state_dict(a, b, criterion="constant")[1].as_records()[0]) == {"layer", "alpha",
                                                                                    "peer_distance"}


def test_papa_is_a_configuration_and_the_paper_the_default():
    papa = GraftSpec.make(rule="papa")
    assert (papa.criterion, papa.partner, papa.every_steps, papa.alpha) == ("constant", "population", 10, 0.99)
    assert GraftSpec.make(rule="paper") == GraftSpec(rule="paper") and GraftSpec().criterion == "entropy"
    assert set(PRESETS) == {"paper", "papa"} and set(CRITERIA) == {"entropy", "reference", "bn_scale", "l1",
                                                                   "constant"}


@pytest.mark.parametrize("settings,message", [
    (dict(criterion="x"), "criterion: must be one of"),
    (dict(A=float("inf")), "A: must be a finite number"),
    (dict(bins=1.5), "bins: expected int"),
    (dict(A=True), "A: expected float"),
    (dict(rule="papa", every_steps=5), "every_steps: rule papa sets every_steps=10; got 5"),
    (dict(criterion="reference", partner="population"), "criterion: 'reference' reproduces"),
    (dict(compat="reference"), "compat: replaced by criterion"),
    (dict(speed=1), "speed: not a grafting setting"),
])
def test_a_spec_is_validated_once_naming_the_setting(settings, message):
    with pytest.raises(SpecError, match=f"^{message}"):
        GraftSpec.make(**settings)


def test_settings_compare_and_fingerprint_as_values():
    assert GraftSpec(A=0).fingerprint() == GraftSpec(A=0.0).fingerprint()
    assert GraftSpec(A=0.3).fingerprint() != GraftSpec().fingerprint()
