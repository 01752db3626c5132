"""Cultivation: the distillation loss, teachers from checkpoints, and KD runs through the launcher."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from graft import checkpoint
from graft.distill import load_teachers, soft_kl
from helpers import ROOT, torchrun

COMMON = ["model=resnet8", "epochs=1", "batch_size=50", "data.train_subset=200", "data.test_subset=100",
          "progress=false"]


def test_soft_kl_matches_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    tau = 2.0
    p_t = F.softmax(teacher / tau, 1)
    p_s = F.softmax(student / tau, 1)
    expected = tau ** 2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(soft_kl(student, p_t, tau), expected)
    assert soft_kl(teacher, p_t, tau).item() == pytest.approx(0.0, abs=1e-6)


def launch(tmp_path, name, nproc, *overrides):
    out = tmp_path / name
    proc = torchrun(nproc, "-m", "graft.train", "--config", ROOT / "configs" / "quickstart.yaml",
                    f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *COMMON, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kd")
    out, _ = launch(tmp, "teacher", 1, "grafting.enabled=false", "seed=5")
    return tmp, out / "checkpoints" / "net0" / "best.pt"


def test_teacher_loads_frozen_from_its_checkpoint(teacher):
    _, path = teacher
    (model,) = load_teachers([str(path)], torch.device("cpu"), channels_last=False, num_classes=10)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    saved = checkpoint.load(path)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(checkpoint.CheckpointError, match="predicts 10 classes, the students 100"):
        load_teachers([str(path)], torch.device("cpu"), channels_last=False, num_classes=100)


def test_grafting_plus_kd_run(teacher):
    tmp, path = teacher
    kd, proc = launch(tmp, "graft_kd", 2, f"distill.teachers=[{path}]", "distill.tau=4")
    assert "distillation: 1 teacher(s), tau 4, weight 1" in proc.stdout
    plain, _ = launch(tmp, "graft", 2)
    kd_loss = [json.loads(line)["train_loss"] for line in (kd / "metrics.jsonl").read_text().splitlines()]
    plain_loss = [json.loads(line)["train_loss"] for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in kd_loss)
    assert kd_loss != plain_loss  # the KD term is in the loss (same seeds, same batches otherwise)


def test_mutual_mode_runs_with_shared_batches(teacher):
    tmp, _ = teacher
    out, proc = launch(tmp, "mutual", 2, "distill.mutual=true")
    assert "distillation: 0 teacher(s), mutual" in proc.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_missing_teacher_is_named(tmp_path):
    proc = torchrun(1, "-m", "graft.train", "--config", ROOT / "configs" / "quickstart.yaml",
                    f"output_dir={tmp_path / 'x'}", *COMMON, "distill.teachers=[nope.pt]")
    assert proc.returncode != 0
    assert "distill.teachers: no such checkpoint: nope.pt" in proc.stderr
