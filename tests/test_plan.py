"""A study's plan: the keys it takes, and every shipped plan loads."""

import pytest

from graft.config import ConfigError
from graft.study.plan import load_plan
from helpers import ROOT


@pytest.mark.parametrize("key", ["nproc: 7", "setup: {epochs: 3}"])
def test_what_load_plan_sets_is_no_plan_key(tmp_path, monkeypatch, key):
    """An arm's nproc and setup come from its resolved config: given in a plan, nproc was
    overwritten without a word and setup failed with "arms[0].setup: expected dict"."""
    monkeypatch.chdir(ROOT)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"name: x\nconfig: configs/quickstart.yaml\narms:\n  - name: a\n  - name: b\n    {key}\n")
    name = key.partition(":")[0]
    with pytest.raises(ConfigError, match=rf"^{plan}: unknown key 'arms\[1\].{name}'$"):
        load_plan(plan, data=False)


def test_every_shipped_plan_loads(monkeypatch):
    """Text settings refuse numbers now (output_dir=2024_01 was runs/202401): none of the shipped
    plans, nor the configs they name, gave one."""
    monkeypatch.chdir(ROOT)
    paths = sorted((ROOT / "studies").rglob("*.yaml")) + sorted((ROOT / "tests" / "studies").rglob("*.yaml"))
    assert paths
    for path in paths:
        plan = load_plan(path, data=False)
        assert all(arm.nproc >= 1 and arm.setup for arm in plan.arms), path
