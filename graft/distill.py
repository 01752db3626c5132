"""Cultivation (Meng et al., arXiv 2004.12311): grafting plus knowledge distillation.

Grafting revives invalid filters but dilutes valid ones; distillation does the opposite. The
student loss adds, to cross entropy, ``weight * tau^2 * KL(target || student)`` on probabilities
softened by the temperature ``tau``, where the target is
* the mean of the frozen teachers' softened probabilities (``distill.teachers``), and/or
* in mutual mode, the mean softened prediction of the other networks on the same batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint
from .dist import collectives
from .models import build_model


def load_teachers(paths: list[str], device: torch.device, channels_last: bool,
                  num_classes: int) -> list[nn.Module]:
    """Build each teacher from its graft checkpoint (best.pt or an epoch file), frozen, in eval mode."""
    teachers = []
    for path in paths:
        if not Path(path).is_file():
            raise checkpoint.CheckpointError(f"distill.teachers: no such checkpoint: {path} (train a teacher with "
                                             "one network first, see README 'Cultivation')")
        state = checkpoint.load(path, map_location=device)
        setup = state.get("setup") or {}
        if "model" not in setup:
            raise checkpoint.CheckpointError(f"distill.teachers: {path} does not say which model it holds")
        classes = _num_classes(state["model"])
        if classes != num_classes:
            raise checkpoint.CheckpointError(f"distill.teachers: {path} predicts {classes} classes, the students "
                                             f"{num_classes}: a teacher must be trained on the same data")
        model = build_model(setup["model"], classes)
        model.load_state_dict(state["model"])
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.eval().requires_grad_(False)
        teachers.append(model)
    return teachers


def _num_classes(state: dict) -> int:
    """The classifier's output size: the last 2-D weight's rows."""
    return [t for t in state.values() if t.dim() == 2][-1].shape[0]


def soft_kl(student_logits: Tensor, target_probs: Tensor, tau: float) -> Tensor:
    """tau^2 * KL(target || softmax(student / tau)), averaged over the batch."""
    log_student = F.log_softmax(student_logits.float() / tau, dim=1)
    return F.kl_div(log_student, target_probs, reduction="batchmean") * tau * tau


@torch.no_grad()
def teacher_probs(teachers: list[nn.Module], images: Tensor, tau: float) -> Tensor:
    return torch.stack([F.softmax(t(images).float() / tau, dim=1) for t in teachers]).mean(0)


@torch.no_grad()
@collectives()
def peer_probs(student_logits: Tensor, tau: float, group) -> Tensor:
    """Mutual mode: the mean softened prediction of the *other* networks on this same batch.
    One all_reduce of a (batch x classes) tensor per step: the networks move in lockstep."""
    own = F.softmax(student_logits.detach().float() / tau, dim=1)
    total = own.clone()
    dist.all_reduce(total, group=group)
    others = dist.get_world_size(group) - 1
    return (total - own) / others


def make_loss(cfg, teachers: list[nn.Module], group):
    """The training loss as a function of (outputs, labels, images)."""
    d = cfg.distill
    mutual = d.mutual and group is not None

    def loss_fn(outputs: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        loss = F.cross_entropy(outputs, labels)
        if teachers:
            loss = loss + d.weight * soft_kl(outputs, teacher_probs(teachers, images, d.tau), d.tau)
        if mutual:
            loss = loss + d.weight * soft_kl(outputs, peer_probs(outputs, d.tau, group), d.tau)
        return loss

    return loss_fn
