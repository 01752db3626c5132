"""The shipped experiment configs: they load, their names say what they hold, and every CIFAR
model they name trains one step."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graft.config import load_config
from graft.models import CIFAR_MODELS, build_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# quickstart is a demo; cultivation configs are checked on their own below
# The paper's experiments, named after what they run (not the quick start, cultivation, or the
# base configs of the studies under studies/, e.g. configs/cifar10_cpu.yaml).
EXPERIMENTS = [p for p in CONFIGS if p.parent.name not in ("configs", "cultivation")]
CULTIVATION = [p for p in CONFIGS if p.parent.name == "cultivation"]
CIFAR_NAMES = ("resnet32", "resnet56", "resnet110", "mobilenetv2", "wrn28_10")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.fixture(scope="module")
def loaded():
    return {rel(p): load_config(p) for p in CONFIGS}


def test_the_paper_experiments_are_all_there():
    names = {rel(p) for p in CONFIGS}
    expected = {"configs/quickstart.yaml", "configs/ablations/vgg16_layer.yaml",
                "configs/ablations/vgg16_filter.yaml"}
    for dataset in ("cifar10", "cifar100"):
        for model in CIFAR_NAMES:
            for variant in ("baseline", "graft_samelr", "graft_difflr"):
                expected.add(f"configs/{dataset}/{model}_{variant}.yaml")
    expected |= {f"configs/ablations/resnet32_A{a}.yaml" for a in ("0.2", "0.4", "0.6", "0.8", "1.0")}
    expected |= {f"configs/ablations/resnet32_c{c}.yaml" for c in (1, 10, 100, 500, 1000)}
    expected |= {f"configs/imagenet/{m}.yaml" for m in ("resnet18", "resnet34", "resnet50", "resnet50_cosine")}
    assert expected <= names, f"missing: {sorted(expected - names)}"


def test_names_match_contents(loaded):
    for path in EXPERIMENTS:
        name, folder, cfg = path.stem, path.parent.name, loaded[rel(path)]
        where = rel(path)
        if name.endswith("_baseline"):
            assert cfg.grafting.enabled is False, where
        else:
            assert cfg.grafting.enabled is True, where
        assert cfg.optim.difflr is ("difflr" in name or folder == "ablations"), where
        if cfg.optim.difflr:
            assert cfg.optim.schedule == "cosine", where
        if folder in ("cifar10", "cifar100"):
            model = name.rsplit("_", 2 if "_graft_" in name else 1)[0]
            assert cfg.model == model, where
            assert cfg.data.name == folder and cfg.data.root == "data", where
            assert cfg.num_classes == (100 if folder == "cifar100" else 10), where
            assert (cfg.epochs, cfg.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (200, 128, 0.1, 5e-4), where
            if cfg.optim.schedule == "step":
                assert (cfg.optim.step_size, cfg.optim.gamma) == (60, 0.1), where
        if folder == "ablations":
            assert cfg.data.name == "cifar10" and cfg.num_classes == 10, where
            m = re.fullmatch(r"resnet32_([Ac])([0-9.]+)", name)
            if m:
                assert cfg.model == "resnet32", where
                assert getattr(cfg.grafting, m[1]) == float(m[2]), where
            else:
                criterion = {"layer": "entropy", "filter": "bn_scale"}[name.removeprefix("vgg16_")]
                assert cfg.model == "vgg16_bn" and cfg.grafting.criterion == criterion, where
        if folder == "imagenet":
            assert cfg.model == "tv:" + name.removesuffix("_cosine"), where
            assert cfg.optim.schedule == ("cosine" if name.endswith("_cosine") else "step"), where
            assert (cfg.data.name, cfg.data.root, cfg.data.in_memory) == ("imagefolder", "data/imagenet", False), where
            assert (cfg.num_classes, cfg.data.image_size, cfg.epochs, cfg.amp) == (1000, 224, 90, "bf16"), where
            assert (cfg.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (256, 0.1, 1e-4), where


def test_every_run_has_its_own_output_dir(loaded):
    # Two configs sharing a run directory would resume each other's checkpoints.
    dirs = {}
    for path in EXPERIMENTS:
        out = loaded[rel(path)].output_dir
        assert out == f"runs/{path.parent.name}/{path.stem}", rel(path)
        assert out not in dirs, f"{rel(path)} and {dirs.get(out)} share {out}"
        dirs[out] = rel(path)


def _cifar_models():
    models = {}
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.model in CIFAR_MODELS:
            models.setdefault(cfg.model, set()).add(cfg.num_classes or 10)
    return sorted((m, max(c)) for m, c in models.items())


@pytest.mark.parametrize("model,num_classes", _cifar_models())
def test_cifar_model_trains_one_step(model, num_classes):
    torch.manual_seed(0)
    net = build_model(model, num_classes).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, num_classes - 1])
    before = [p.detach().clone() for p in net.parameters()]
    out = net(images)
    assert out.shape == (2, num_classes)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_cultivation_students_point_at_their_teachers_configs(loaded):
    teachers = {load_config(p).output_dir: p for p in CULTIVATION if p.stem.startswith("teacher_")}
    assert teachers, "no teacher configs"
    for path in CULTIVATION:
        cfg = loaded[rel(path)]
        if path.stem.startswith("teacher_"):
            assert cfg.grafting.enabled is False and not cfg.distill.teachers, rel(path)
        for teacher in cfg.distill.teachers:
            run_dir = teacher.split("/checkpoints/")[0]
            assert run_dir in teachers, f"{rel(path)}: no config trains {teacher}"
            assert loaded[rel(teachers[run_dir])].num_classes == cfg.num_classes, rel(path)
