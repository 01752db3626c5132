"""The one config schema: dataclasses loaded from YAML, dotted ``key=value`` overrides, validation.

Every error names the key and where it came from (the YAML file or the command line), so a
cluster job fails in its first second with a message a user can act on, before any process
group or data set is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .exchange import EXCHANGES
from .rules import PRESETS, GraftSpec, SpecError

SPEC = GraftSpec()  # the grafting keys' defaults


# What graft-train and graft-run say, with their usage, when given neither a config nor an
# override: every default at once is a 200-epoch run into runs/default, surely not what was meant.
NOTHING_TO_RUN = ("nothing to run: give --config FILE (configs/quickstart.yaml is the smallest) and/or "
                  "key=value overrides")


@dataclass
class DataConfig:
    name: str = "tar"             # cifar10/cifar100 (torchvision files), imagefolder (train/ and test/ class folders), tar (a .tar.gz of such a tree, decoded once and cached), synthetic (smoke tests)
    root: str = "tests/fixtures/cifar10_sample.tar.gz"  # the data's folder or archive
    download: bool = False        # cifar10/cifar100: let torchvision download when online
    train_subset: int = 0         # 0 = all; else a class-balanced subset of this many images
    test_subset: int = 0          # the same for the test split
    val_fraction: float = 0.0     # hold out this class-balanced share of train as validation
    eval_split: str = "test"      # split evaluated every epoch; val: best.pt by validation, the test set once at the end
    workers: int = 2              # DataLoader workers for folder data not held in memory
    cache_dir: str = ""           # decoded tar archives; "" = ~/.cache/graft
    in_memory: bool = True        # uint8 tensors on the training device, batched augmentation
    image_size: int = 32          # side that tar and imagefolder images are brought to


@dataclass
class OptimConfig:
    lr: float = 0.1               # SGD's initial learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"        # step: x gamma every step_size epochs (the paper's 0.1 every 60); cosine: per iteration, an extended run follows the longer curve
    step_size: int = 60
    gamma: float = 0.1
    difflr: bool = False          # network k (1..N) starts at lr * (1 + cos(pi * (N - k) / N)) / 2 (the official code's default)


@dataclass
class GraftingConfig:
    enabled: bool = True          # false: the networks train independently (the baseline)
    rule: str = SPEC.rule         # a named combination that sets criterion, partner, every_steps and alpha: paper (entropy, ring, each epoch: the defaults) or papa (constant alpha 0.99 toward the population mean every 10 steps)
    criterion: str = SPEC.criterion  # entropy (the paper's), reference (the official code's, quirks included), bn_scale (filter level: a ratio of BatchNorm scales per filter), l1 (the layer's L1 norm in place of its entropy), constant (alpha = grafting.alpha). Old configs' level: filter is bn_scale, compat: reference is reference
    partner: str = SPEC.partner   # ring: network k blends in network k-1 (the paper's); population: the mean of every network
    every_steps: int = SPEC.every_steps  # 0: graft at each epoch's end (not after the last); k: every k optimizer steps
    A: float = SPEC.A             # alpha = (A / pi) * arctan(c * (H_self - H_peer)) + 0.5
    c: float = SPEC.c             # see A
    bins: int = SPEC.bins         # histogram bins of the entropy
    alpha: float = SPEC.alpha     # criterion constant: the fixed alpha a network keeps of itself (0.5: plain averaging)
    exchange: str = "auto"        # ring (send to k+1, receive from k-1; what auto picks) or all_gather; the population partner always all-reduces

    def spec(self) -> GraftSpec:
        """The GraftSpec these settings name (validated when the config is loaded)."""
        return GraftSpec(**{k: getattr(self, k) for k in SPEC.settings()})


@dataclass
class DistillConfig:
    teachers: list[str] = field(default_factory=list)  # graft checkpoints (best.pt or epochNNNN.pt)
    tau: float = 2.0              # temperature
    weight: float = 1.0           # loss = CE + weight * tau^2 * KL(target || student)
    mutual: bool = False          # also distill from the other networks' mean prediction (same batches)


@dataclass
class Config:
    model: str = "resnet20"       # resnet8/20/32/44/56/110 (+ _leaky), mobilenetv2, vgg11_bn, vgg16_bn, wrn16_2, wrn28_10, tv:<torchvision name>
    num_classes: int = 0          # 0 = from the data set
    epochs: int = 200
    batch_size: int = 128         # per network (per replica in hybrid mode)
    eval_batch_size: int = 500
    seed: int = 0                 # network k's initial weights from a hash of (seed, k), its data order from seed + 1000 k
    output_dir: str = "runs/default"  # the run directory (docs/outputs.md)
    resume: str = "auto"          # auto: from the newest epoch every network completed; never: afresh (in output_dir-1, -2, ... when output_dir holds checkpoints)
    data_parallel: int = 1        # replicas per network (DDP); world size = networks x data_parallel
    backend: str = "auto"         # auto: NCCL when every process of a node has a GPU of its own, else gloo
    device: str = "auto"          # auto: CUDA when visible
    timeout: float = 1800.0       # seconds a rank waits for its peers (each epoch boundary, the first decode of the data, the end of the run)
    amp: str = "off"              # bf16: autocast (CUDA, or a CPU with AVX512-BF16/AMX; emulated and slow without); fp16: CUDA, with a GradScaler
    channels_last: bool = True    # memory format of the model and the batches
    compile: bool = False         # torch.compile the training model
    progress: bool = True         # tqdm bar on each node's local rank 0 (when stderr is a terminal)
    invalid_thresholds: list[float] = field(default_factory=lambda: [0.1, 0.01])  # L1-norm thresholds of the invalid-filter counts
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grafting: GraftingConfig = field(default_factory=GraftingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def setup(self, networks: int) -> dict:
        """What a checkpoint must agree with to be resumed: every setting that shapes the
        training, flattened to dotted keys. Only RUNTIME settings (where and how fast it runs),
        and ``epochs`` (a run can be extended), may change between a run and its resume."""
        flat = _flatten(self.to_dict())
        return {"networks": networks, **{k: v for k, v in flat.items() if k not in RUNTIME}}


# Settings that do not change what is trained: free to differ when a run is resumed.
# (data.in_memory is not one: folder data in memory and through DataLoader workers is augmented
# and normalised differently.) Paths may move: data.root, distill.teachers.
RUNTIME = {"epochs", "eval_batch_size", "output_dir", "resume", "backend", "device", "timeout", "amp",
           "channels_last", "compile", "progress", "invalid_thresholds", "data.root", "data.download",
           "data.workers", "data.cache_dir", "grafting.exchange", "distill.teachers"}


def setup_differences(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, recorded value, current value) for every setting of ``current`` that differs from
    ``recorded`` (a checkpoint's setup, a plan's arm). Only recorded settings are compared (one
    written before a setting existed still matches; grafting.level and grafting.compat of older
    versions count as the criterion they meant), and a recorded ``num_classes`` of 0 ("from
    the data") matches any."""
    recorded = upgrade_setup(recorded)
    return [(k, recorded[k], v) for k, v in current.items()
            if k in recorded and recorded[k] != v and not (k == "num_classes" and recorded[k] == 0)]


# Older versions named the criterion by two keys: grafting.level (layer | filter) and
# grafting.compat (default | reference). They are still read, as the criterion they meant.
LEGACY = ("level", "compat")


def _legacy_criterion(criterion: str, key: str, value, where: str) -> str:
    """The criterion after an old ``grafting.level`` or ``grafting.compat`` setting."""
    if (key, value) not in {("level", "layer"), ("level", "filter"), ("compat", "default"), ("compat", "reference")}:
        allowed = "layer, filter" if key == "level" else "default, reference"
        raise ConfigError(f"{where}: grafting.{key}: must be one of {allowed}; got {value!r} (grafting.criterion "
                          "replaces it)")
    meant = "bn_scale" if key == "level" else "reference"
    if value in ("layer", "default"):  # undoes what the other value would set
        return "entropy" if criterion == meant else criterion
    if criterion not in ("entropy", meant):
        raise ConfigError(f"{where}: grafting.{key}={value} (the older name of grafting.criterion={meant}) "
                          f"contradicts grafting.criterion={criterion}")
    return meant


def _upgrade_grafting(section: dict, where: str) -> dict:
    """A grafting section with the older keys level and compat turned into criterion."""
    if not isinstance(section, dict) or not any(k in section for k in LEGACY):
        return section
    section = dict(section)
    given = section.get("criterion", SPEC.criterion)
    criterion = given
    for key in LEGACY:
        if key in section:
            criterion = _legacy_criterion(criterion, key, section.pop(key), where)
    if "criterion" in section and criterion != given:
        raise ConfigError(f"{where}: grafting.criterion={given} contradicts the older keys grafting.level/compat "
                          f"(which say {criterion}); give only grafting.criterion")
    if criterion != given or "criterion" in section:  # level: layer alone says nothing new
        section["criterion"] = criterion
    return section


def upgrade_setup(setup: dict) -> dict:
    """A checkpoint's or archive's flat setup with grafting.level and grafting.compat as the
    grafting.criterion they meant."""
    if not any(f"grafting.{k}" in setup for k in LEGACY):
        return setup
    old = {k: setup[f"grafting.{k}"] for k in LEGACY if f"grafting.{k}" in setup}
    try:
        section = _upgrade_grafting(old, "checkpoint")
    except ConfigError:
        return setup
    upgraded = {k: v for k, v in setup.items() if k not in {f"grafting.{k}" for k in LEGACY}}
    return {**upgraded, "grafting.criterion": section.get("criterion", SPEC.criterion)}


def upgrade_grafting(section: dict) -> dict:
    """A saved run's grafting section (its config.yaml) as this version reads it: the older keys
    level and compat as the criterion they meant (one that contradicts itself stays as it is)."""
    try:
        return _upgrade_grafting(section, "config.yaml")
    except ConfigError:
        return section


def _apply_rule(cfg: Config, in_file: set[str], source: str, overridden: set[str]) -> Config:
    """grafting.rule sets the keys its preset names, over the file's values when the rule comes
    from the command line; a key given where the rule is given, or later, against it is refused."""
    g = cfg.grafting
    preset = PRESETS.get(g.rule)
    if not preset:
        return cfg  # '' (none), or an unknown name that validate names
    binding = overridden if "grafting.rule" in overridden else in_file | overridden
    for key, value in preset.items():
        name = f"grafting.{key}"
        if name in binding and getattr(g, key) != value:
            where = "command line" if name in overridden else source
            raise ConfigError(f"{where}: {name}: grafting.rule={g.rule} sets it to {value!r}; got {getattr(g, key)!r} "
                              "(leave it out, or drop the rule)")
    return dataclasses.replace(cfg, grafting=dataclasses.replace(g, **preset))


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


CHOICES = {
    "resume": ("auto", "never"),
    "backend": ("auto", "nccl", "gloo"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("off", "bf16", "fp16"),
    "data.name": ("cifar10", "cifar100", "imagefolder", "tar", "synthetic"),
    "data.eval_split": ("test", "val"),
    "optim.schedule": ("step", "cosine", "constant"),
    "grafting.exchange": EXCHANGES,
    **{f"grafting.{key}": choices for key, choices in GraftSpec.CHOICES.items()},
}

# key -> (low, high), both inclusive; None = unbounded
RANGES = {
    "epochs": (1, None), "batch_size": (1, None), "eval_batch_size": (1, None), "seed": (0, None),
    "num_classes": (0, None), "data_parallel": (1, None), "timeout": (1e-3, None),
    "data.train_subset": (0, None), "data.test_subset": (0, None), "data.val_fraction": (0, 0.9),
    "data.workers": (0, None), "data.image_size": (8, None),
    "optim.lr": (0, None), "optim.momentum": (0, 1), "optim.weight_decay": (0, None),
    "optim.step_size": (1, None), "optim.gamma": (0, 1),
    "distill.tau": (1e-3, None), "distill.weight": (0, None),
    **{f"grafting.{key}": limits for key, limits in GraftSpec.LIMITS.items()},
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    """The keys a file may give: a field with init=False is the code's own (a plan's Arm.nproc)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def build(cls, values: dict, source: str, prefix: str = ""):
    """Make a ``cls`` from a dict, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, "
                          f"got {type(values).__name__}")
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{name}'{hint}")
        kwargs[key] = _convert(hints[key], value, source, name)
    return cls(**kwargs)


def _convert(hint, value, source: str, name: str):
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, name + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name}: expected a list, got {value!r}")
        return [_convert(item, v, source, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):  # bool included
            raise ConfigError(_unquoted(value, source, name))
    raise ConfigError(f"{source}: {name}: expected {hint.__name__}, got {value!r}")


def _unquoted(value, source: str, name: str) -> str:
    """The error for a text setting that YAML read as a number or a boolean: turned back into
    text, it would not be what was written (2024_01 reads as 202401, 0755 as 493)."""
    if isinstance(value, bool):
        kind, why = "boolean", "YAML reads an unquoted true, false, yes, no, on or off as a boolean"
    else:
        kind, why = "number", "YAML reads an unquoted number as one, and may change it: 2024_01 is 202401, 0755 is 493"
    if "[" in name:  # a list's item
        quoted = "'...'"
    elif source == "command line":
        quoted = f"\"{name}='...'\" (the inner quotes are YAML's, the outer the shell's)"
    else:
        quoted = f"{name}: '...'"
    return f"{source}: {name}: expected text, got the {kind} {value!r} ({why}); quote the value as written: {quoted}"


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, source: str = "config", overridden: typing.Collection[str] = ()) -> Config:
    """Check values and combinations; an error names the key and where its value came from
    (``source``, or the command line for a key in ``overridden``)."""
    def fail(key: str, message: str):
        where = "command line" if key in overridden else source
        raise ConfigError(f"{where}: {key}: {message}")

    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
    for key, value in _flatten(cfg.to_dict()).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            fail(key, f"must be a finite number; got {value!r}")
    for key, (low, high) in RANGES.items():
        value = _get(cfg, key)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            fail(key, f"must be {bounds}; got {value!r}")
    if any(t <= 0 for t in cfg.invalid_thresholds):
        fail("invalid_thresholds", f"must be positive; got {cfg.invalid_thresholds}")
    problem = check_model_name(cfg.model)
    if problem:
        fail("model", problem)
    try:
        cfg.grafting.spec()
    except SpecError as e:
        key, _, message = str(e).partition(": ")
        fail(f"grafting.{key}", message)
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        fail("optim.nesterov", "needs optim.momentum > 0")
    if cfg.distill.mutual and cfg.data_parallel != 1:
        fail("distill.mutual", "needs data_parallel=1 (every network must see the same batches)")
    if not cfg.data.in_memory and cfg.data.name != "imagefolder":
        fail("data.in_memory", f"false reads image files through DataLoader workers: it needs data.name=imagefolder, "
                               f"not {cfg.data.name!r} (which is always held in memory)")
    if cfg.data.eval_split == "val" and cfg.data.val_fraction <= 0:
        fail("data.eval_split", "'val' needs data.val_fraction > 0")
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """``optim.lr=0.05`` -> (["optim", "lr"], 0.05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: expected key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"command line: {key}: cannot parse value {raw!r}: {problem}") from None
    return key.strip().split("."), value


def _leaves(parts: list[str], value) -> typing.Iterator[tuple[list[str], object]]:
    """A mapping given for a section sets the keys it names, as dotted overrides would
    (``grafting={A: 0.2, c: 100}`` is ``grafting.A=0.2 grafting.c=100``): the section's other
    keys keep what the file says."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaves([*parts, str(key)], inner)
    else:
        yield parts, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file; expected a YAML config") from None
        try:
            values = yaml.load(text, UniqueKeyLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if values is None:  # nothing but whitespace and comments: surely not the run meant
            raise ConfigError(f"{path}: empty config file (no keys): nothing says what to train; "
                              "start from one of configs/ (configs/quickstart.yaml is the smallest)")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    if isinstance(values.get("grafting"), dict):
        values = {**values, "grafting": _upgrade_grafting(values["grafting"], source)}
    cfg = build(Config, values, source)
    section = values.get("grafting")
    explicit = {f"grafting.{k}" for k in section} if isinstance(section, dict) else set()
    overridden = set()
    for parts, value in (leaf for text in overrides for leaf in _leaves(*parse_override(text))):
        if parts[:1] == ["grafting"] and len(parts) == 2 and parts[1] in LEGACY:
            criterion = _legacy_criterion(cfg.grafting.criterion, parts[1], value, "command line")
            if criterion == cfg.grafting.criterion:  # level=layer, compat=default: nothing to change
                continue
            parts, value = ["grafting", "criterion"], criterion
        merged = cfg.to_dict()
        node = merged
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                name = ".".join(parts[:i + 1])
                raise ConfigError(f"command line: unknown key '{'.'.join(parts)}' ('{name}' is not a section)")
            node = node[part]
        if parts[-1] not in node:
            build(_section_class(parts[:-1]), {parts[-1]: value}, "command line",
                   "".join(p + "." for p in parts[:-1]))
        if value == {} and isinstance(node[parts[-1]], dict):  # it once reset the section to its defaults
            name = ".".join(parts)
            raise ConfigError(f"command line: {name}={{}}: an empty mapping sets no key of the section; name the "
                              f"keys to set ({name}.KEY=VALUE or {name}={{KEY: VALUE}}), or leave it out")
        node[parts[-1]] = value
        cfg = build(Config, merged, "command line")
        overridden.add(".".join(parts))
    cfg = _apply_rule(cfg, explicit | overridden, source, overridden)
    return validate(cfg, source, overridden)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (the
    plain loader keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_model_name(name: str) -> str | None:
    """None for a model graft can build, else what is wrong (with the closest name)."""
    from .models import unknown_model_message

    return unknown_model_message(name)


def _section_class(parts: list[str]):
    cls = Config
    for part in parts:
        cls = typing.get_type_hints(cls)[part]
    return cls


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write atomically: a crash never leaves half a config.yaml."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def reference_markdown() -> str:
    """Every key as a Markdown table: default, allowed values, and the comment beside its field
    in this file. docs/config.md is this table (a test keeps the two equal)."""
    import inspect
    import re

    def comments(cls) -> dict[str, str]:
        found = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
            if m and m.group(2):
                found[m.group(1)] = m.group(2).strip()
        return found

    def rows(cls, prefix=""):
        notes = comments(cls)
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from rows(hint, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if key in CHOICES:
                allowed = ", ".join(c if c else "'' (none)" for c in CHOICES[key])
            elif key in RANGES:
                low, high = RANGES[key]
                allowed = f">= {low:g}" if high is None else f"{low:g} to {high:g}"
            else:
                allowed = getattr(hint, "__name__", str(hint))
            note = notes.get(f.name, "").split("  # noqa")[0].replace("|", "\\|")
            yield f"| `{key}` | `{default!r}` | {allowed} | {note} |"

    return "\n".join(["| key | default | allowed | meaning |", "|---|---|---|---|", *rows(Config)]) + "\n"
