"""The config schema: YAML, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from graft.config import Config, ConfigError, _get, load_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "epochs: 3\noptim:\n  lr: 0.2\ngrafting:\n  level: filter\n")
    cfg = load_config(path, ["optim.lr=0.05", "grafting.enabled=false", "seed=7", "invalid_thresholds=[0.5]"])
    assert cfg.epochs == 3 and cfg.optim.lr == 0.05 and cfg.grafting.enabled is False
    assert cfg.grafting.criterion == "bn_scale" and cfg.seed == 7 and cfg.invalid_thresholds == [0.5]  # level: filter
    assert cfg.optim.momentum == Config().optim.momentum
    assert isinstance(load_config(path, ["grafting.c=100"]).grafting.c, float)
    assert load_config(write(tmp_path, "optim:\n  weight_decay: 5e-4\n", "e.yaml")).optim.weight_decay == 5e-4
    assert load_config(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4


def test_a_mapping_for_a_section_sets_only_the_keys_it_names(tmp_path):
    """``grafting={A: 0.2}`` once replaced the whole section: the file's c and criterion went
    back to their defaults without a word, and a rule could not see the keys it contradicted."""
    path = write(tmp_path, "grafting:\n  A: 0.3\n  c: 100\n  criterion: l1\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["grafting={A: 0.2}", "optim={momentum: 0.8}"])
    assert (cfg.grafting.A, cfg.grafting.c, cfg.grafting.criterion) == (0.2, 100.0, "l1")
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.01, 0.8)
    with pytest.raises(ConfigError, match=r"grafting.alpha: grafting.rule=papa sets it to 0.99; got 0.5"):
        load_config(None, ["grafting={rule: papa, alpha: 0.5}"])
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.lr.a' \('optim.lr' is not a section\)"):
        load_config(None, ["optim.lr={a: 1}"])


@pytest.mark.parametrize("text,message", [
    ("epochs: -1\n", r"c.yaml: epochs: must be >= 1; got -1"),
    ("grafting:\n  A: 1.5\n", r"grafting.A: must be in \[0, 1\]; got 1.5"),
    ("grafting:\n  bins: 1\n", r"grafting.bins: must be >= 2"),
    ("epoch: 3\n", r"unknown key 'epoch' \(did you mean 'epochs'\?\)"),
    ("optim:\n  lrr: 0.1\n", r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("epochs: three\n", r"epochs: expected int, got 'three'"),
    ("grafting:\n  enabled: 1\n", r"grafting.enabled: expected bool"),
    ("grafting:\n  level: block\n", r"grafting.level: must be one of layer, filter; got 'block' \(grafting.criterion"),
    ("grafting:\n  criterion: entropyy\n",
     r"grafting.criterion: must be one of entropy, reference, bn_scale, l1, constant"),
    ("grafting:\n  criterion: l1\n  level: filter\n", r"grafting.level=filter .* contradicts grafting.criterion=l1"),
    ("grafting:\n  rule: papa\n  criterion: entropy\n",
     r"grafting.criterion: grafting.rule=papa sets it to 'constant'"),
    ("grafting:\n  criterion: reference\n  partner: population\n", r"grafting.criterion: 'reference' reproduces"),
    ("grafting:\n  alpha: 1.5\n", r"grafting.alpha: must be in \[0, 1\]"),
    ("optim: 0.1\n", r"optim: expected a mapping"),
    ("epochs: [1\n", r"c.yaml: not valid YAML \(line"),
    ("- 1\n- 2\n", r"expected a mapping of keys at the top level"),
    ("epochs: 3\noptim:\n  lr: 0.1\nepochs: 4\n",
     r"c.yaml: not valid YAML \(line 4, column 1\): key 'epochs' given twice"),
    ("model: resnet33\n", r"c.yaml: model: unknown model 'resnet33' \(did you mean 'resnet32'\?\)"),
    # it failed on every rank after the process groups were up, naming an internal function
    ("data:\n  name: tar\n  in_memory: false\n", r"c.yaml: data.in_memory: false .* needs data.name=imagefolder"),
])
def test_bad_files_name_the_key_and_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", r"command line: optim.lr: must be >= 0"),
    ("grafting.AA=0.1", r"unknown key 'grafting.AA' \(did you mean 'grafting.A'\?\)"),
    ("epochs", r"expected key=value"),
    ("model.depth=3", r"'model' is not a section"),
    ("distill.teachers=[a.pt", r"^command line: distill.teachers: cannot parse value '\[a.pt': [^\n]+$"),
    # nan passes every range check (nan < low is False); inf made NaN alphas whenever H_self == H_peer
    ("grafting.c=inf", r"command line: grafting.c: must be a finite number; got inf"),
    ("optim.lr=nan", r"command line: optim.lr: must be a finite number; got nan"),
    ("timeout=.inf", r"command line: timeout: must be a finite number; got inf"),
    ("invalid_thresholds=[0.1, .nan]", r"command line: invalid_thresholds: must be a finite number"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match=r"command line: optim.nesterov: needs optim.momentum > 0"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_empty_file_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match=r"c.yaml: empty config file \(no keys\): nothing says what to train"):
        load_config(write(tmp_path, text))


def test_no_config_and_no_overrides_prints_usage_instead_of_training(tmp_path):
    import subprocess
    import sys

    from helpers import env

    proc = subprocess.run([sys.executable, "-m", "graft.train"], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "usage: graft-train [-h] [--config CONFIG] [--print-config] [overrides ...]",
        "graft-train: nothing to run: give --config FILE (configs/quickstart.yaml is the smallest) and/or "
        "key=value overrides"]
    assert list(tmp_path.iterdir()) == []  # no runs/default


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        load_config("nope.yaml")


def test_binary_file(tmp_path):
    path = tmp_path / "data.tar.gz"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="data.tar.gz: not a text file"):
        load_config(path)


def test_a_bad_value_in_the_file_can_be_overridden_and_errors_name_the_source(tmp_path):
    path = write(tmp_path, "epochs: 0\noptim:\n  lr: 0.1\n")
    assert load_config(path, ["epochs=5"]).epochs == 5
    with pytest.raises(ConfigError, match=r"c.yaml: epochs: must be >= 1"):
        load_config(path, ["optim.lr=0.2"])
    with pytest.raises(ConfigError, match=r"command line: model: unknown model 'tv:resnet19'"):
        load_config(path, ["epochs=5", "model=tv:resnet19"])
    assert load_config(None, ["model=tv:resnet18"]).model == "tv:resnet18"


def test_a_model_of_ones_own_is_imported_at_build_time_and_failures_named(tmp_path, monkeypatch):
    from graft.models import build_model

    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes):\n    return nn.Linear(3, num_classes)\n"
        "def broken(num_classes):\n    return undefined_name\n"
        "def number(num_classes):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_config(None, ["model=mynets:tiny"]).model == "mynets:tiny"  # checked for its form only
    assert load_config(None, ["model=nowhere.at_all:Net"]).model == "nowhere.at_all:Net"
    with pytest.raises(ConfigError, match=r"command line: model: 'my-nets:tiny' is not of the form"):
        load_config(None, ["model=my-nets:tiny"])
    assert build_model("mynets:tiny", 7).out_features == 7
    for name, message in [
        ("nowhere.at_all:Net", "model: cannot import module 'nowhere.at_all' (ModuleNotFoundError: No module named "
                               "'nowhere')"),
        ("mynets:tinny", "model: module 'mynets' has no attribute 'tinny'"),
        ("mynets:broken", "model: mynets:broken(num_classes=7) failed (NameError: name 'undefined_name' is not "
                          "defined, at mynets.py:5)"),
        ("mynets:number", "model: mynets:number(num_classes=7) returned a 'int' object, not a torch.nn.Module"),
    ]:
        with pytest.raises(ConfigError) as e:
            build_model(name, 7)
        assert str(e.value) == message


def test_setup_holds_what_shapes_training_and_not_runtime_settings():
    base = Config().setup(2)
    for key in ("optim.difflr", "optim.schedule", "optim.lr", "batch_size", "grafting.A", "distill.tau",
                "data.train_subset", "model", "seed"):
        assert key in base
    for key in ("epochs", "data.root", "timeout", "progress", "compat", "output_dir"):
        assert key not in base
    assert base["networks"] == 2


def test_every_shipped_config_loads():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert paths, "configs/ is empty"
    for path in paths:
        load_config(path)


def test_print_config_round_trips_and_starts_nothing(tmp_path, capsys):
    from graft.train import main

    path = ROOT / "configs" / "cifar10" / "resnet32_graft_difflr.yaml"
    assert main(["--print-config", "--config", str(path), "epochs=3", "grafting.rule=papa"]) == 0
    printed = write(tmp_path, capsys.readouterr().out, "printed.yaml")
    assert load_config(printed) == load_config(path, ["epochs=3", "grafting.rule=papa"])
    assert main(["--print-config", "optim.lrr=1"]) == 1
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def test_docs_config_table_is_the_schema():
    """docs/config.md holds the table generated from graft/config.py: a key added, removed or
    re-described in the code must be regenerated there."""
    from graft.config import _flatten, reference_markdown

    table = reference_markdown()
    assert table in (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: regenerate its table with "
        "python -c 'from graft.config import reference_markdown; print(reference_markdown())'")
    assert table.count("\n| `") == len(_flatten(Config().to_dict()))  # every key has a row


def test_older_level_and_compat_keys_read_as_the_criterion(tmp_path):
    """Configs and archived runs written before grafting.criterion still load, as what they meant."""
    for text, want in [("  level: filter\n", "bn_scale"), ("  compat: reference\n", "reference"),
                       ("  level: layer\n  compat: default\n", "entropy")]:
        assert load_config(write(tmp_path, "grafting:\n" + text)).grafting.criterion == want, text
    path = write(tmp_path, "grafting:\n  criterion: bn_scale\n")
    assert load_config(path, ["grafting.level=layer"]).grafting.criterion == "entropy"
    assert load_config(path, ["grafting.level=filter"]).grafting.criterion == "bn_scale"
    with pytest.raises(ConfigError, match="command line: grafting.compat=reference .* contradicts grafting.criterion"):
        load_config(path, ["grafting.compat=reference"])
    # A checkpoint's setup from before: level/compat compare as the criterion they meant.
    from graft.config import setup_differences

    now = Config().setup(2)
    old = {k: v for k, v in now.items() if k != "grafting.criterion"}
    assert setup_differences({**old, "grafting.level": "layer", "grafting.compat": "default"}, now) == []
    was = setup_differences({**old, "grafting.level": "filter"}, now)
    assert was == [("grafting.criterion", "bn_scale", "entropy")]


def test_a_rule_sets_its_keys_and_refuses_a_contradiction(tmp_path):
    cfg = load_config(None, ["grafting.rule=papa"])
    assert (cfg.grafting.criterion, cfg.grafting.partner, cfg.grafting.every_steps, cfg.grafting.alpha) == (
        "constant", "population", 10, 0.99)
    assert cfg.grafting.spec().per_step
    # A rule on the command line wins over the file's keys; a key given beside it on the command line does not.
    path = write(tmp_path, "grafting:\n  criterion: entropy\n")
    assert load_config(path, ["grafting.rule=papa"]).grafting.criterion == "constant"
    with pytest.raises(ConfigError, match="command line: grafting.alpha: grafting.rule=papa sets it to 0.99; got 0.5"):
        load_config(path, ["grafting.rule=papa", "grafting.alpha=0.5"])
    assert load_config(None, ["grafting.rule=papa", "grafting.alpha=0.99"]).grafting.alpha == 0.99


def test_an_older_key_that_changes_nothing_does_not_fight_a_rule(tmp_path):
    path = write(tmp_path, "grafting:\n  rule: papa\n")
    assert load_config(path, ["grafting.level=layer", "grafting.compat=default"]).grafting.criterion == "constant"


@pytest.mark.parametrize("override,read", [("output_dir=2024_01", "202401"), ("data.cache_dir=0755", "493"),
                                           ("output_dir=1.10", "1.1"), ("device=on", "True")])
def test_a_text_setting_given_a_number_is_refused_not_changed(override, read):
    """``output_dir=2024_01`` once trained into runs/202401: YAML reads the bare value as a number
    and str() of it is not what was written."""
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^command line: {key}: expected text, got the \w+ {read} .*"
                                          rf"quote the value as written: \"{key}='...'\""):
        load_config(None, [override])
    if key != "device":  # quoted, the text is kept as written
        cfg = load_config(None, [f"{key}='{override.partition('=')[2]}'"])
        assert _get(cfg, key) == override.partition("=")[2]


def test_a_text_setting_in_a_file_given_a_number_names_the_file(tmp_path):
    path = write(tmp_path, "output_dir: 2024_01\n")
    with pytest.raises(ConfigError, match=r"c.yaml: output_dir: expected text, got the number 202401 .*"
                                          r"output_dir: '...'$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"c.yaml: distill.teachers\[0\]: expected text, got the number 12"):
        load_config(write(tmp_path, "distill:\n  teachers: [12]\n"))
    assert load_config(write(tmp_path, "output_dir: '2024_01'\n")).output_dir == "2024_01"


def test_an_empty_mapping_for_a_section_is_refused():
    """``optim={}`` once reset the whole section to its defaults (lr 0.05 back to 0.1), though a
    mapping sets only the keys it names."""
    with pytest.raises(ConfigError, match=r"^command line: optim=\{\}: an empty mapping sets no key of the section"):
        load_config(None, ["optim.lr=0.05", "optim={}"])
    with pytest.raises(ConfigError, match=r"^command line: model: expected str, got \{\}"):  # not a section
        load_config(None, ["model={}"])
