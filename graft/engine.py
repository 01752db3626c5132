"""One network's epoch of training and its evaluation, as in torchvision's references
(``train_one_epoch``, ``evaluate``): no files, no ring, no rank checks. The only collective is the
sum of a network's statistics over its own replicas (hybrid mode).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ring
from .errors import UserError


class TrainingError(UserError):
    """Training cannot go on (the loss is NaN or Inf)."""


def make_autocast(amp: str, device: torch.device):
    """A factory of autocast contexts for ``amp`` (off | bf16 | fp16); fp16 falls back to fp32
    off CUDA (train refuses it there before this is reached; graft-eval evaluates in fp32)."""
    if amp == "off" or (amp == "fp16" and device.type != "cuda"):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); None where unknown
    (no /proc/cpuinfo). Without it, CPU autocast to bfloat16 is emulated: 19 img/s against
    161 in fp32 for ResNet-20 on an AVX2-only EPYC (studies/cifar10_cpu.yaml records the measurement)."""
    try:
        with open(cpuinfo) as f:
            flags = f.read()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("model name" in /proc/cpuinfo; platform's guess where that is missing)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """The machine a run ran on, as its records name it: CPU, core count and GPU. Wall times and
    low-order bits of fp32 results depend on it."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu}"


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, per_iter, scaler, autocast, progress,
                    device, group=None) -> dict:
    """One epoch of SGD. Loss, accuracy and images/s are the network's: summed over its replicas
    (``group``) in hybrid mode, where DDP talks to the replicas in every step."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    with ring.collectives() if group is not None else contextlib.nullcontext():
        for images, labels in progress(loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                outputs = model(images)
                loss = loss_fn(outputs, labels, images)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if per_iter:
                scheduler.step()
            total_loss += loss.detach() * labels.numel()
            correct += (outputs.argmax(1) == labels).sum()
            seen += labels.numel()
            progress.step(total_loss, correct, seen)
        seconds = time.perf_counter() - start
        if not per_iter:
            scheduler.step()
        totals = torch.stack([total_loss.double(), correct.double(), torch.tensor(float(seen), device=device)])
        if group is not None:
            dist.all_reduce(totals, group=group)
    loss_sum, correct_n, seen_n = totals.tolist()
    if not math.isfinite(loss_sum):
        raise TrainingError("training loss is NaN or Inf (try a lower optim.lr)")
    return {"train_loss": loss_sum / max(seen_n, 1), "train_acc": 100.0 * correct_n / max(seen_n, 1),
            "images_per_sec": seen_n / seconds, "train_seconds": seconds}


@torch.no_grad()
def evaluate(model, loader, autocast, device, split: str = "test") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Loss and accuracy (keys named after ``split``), plus the softmax outputs (for the
    ensemble) and labels."""
    model.eval()
    probs, labels_all, loss_sum = [], [], torch.zeros((), device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            outputs = model(images).float()
        loss_sum += F.cross_entropy(outputs, labels, reduction="sum")  # no host sync per batch
        probs.append(outputs.softmax(1))
        labels_all.append(labels)
    probs, labels = torch.cat(probs), torch.cat(labels_all)
    return {f"{split}_loss": loss_sum.item() / len(labels), f"{split}_acc": accuracy(probs, labels)}, probs, labels


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in percent, from the integer count (a float32 mean would print 27.59999930858612)."""
    return 100.0 * int((probs.argmax(1) == labels).sum()) / len(labels)
