"""One network's epoch of training and its evaluation, as in torchvision's references
(``train_one_epoch``, ``evaluate``): no files, no ring, no rank checks. The only collective is the
sum of a network's statistics over its own replicas (hybrid mode).
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dist import collectives
from .errors import DataError, TrainingError


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


def is_channels_last(model) -> bool:
    """Whether the model's weights are channels_last (``channels_last: true`` converts the model);
    every loader's batches then follow it on the device (``to_device``), so the model alone says
    the format."""
    for p in model.parameters():
        if p.dim() == 4:  # a conv's weight; one of 1 x 1 kernels, or of one channel, is in both formats
            last, plain = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
            if last != plain:
                return last
    return False


def to_device(images, labels, device, channels_last: bool):
    """A batch on the device, 4-D images made channels_last there when ``channels_last`` (the
    loaders, in memory or over folders, yield contiguous batches)."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, per_iter, scaler, autocast, progress,
                    device, group=None, after_step: Callable[[], None] | None = None) -> dict:
    """One epoch of SGD. Loss, accuracy and images/s are the network's: summed over its replicas
    (``group``) in hybrid mode, where DDP talks to the replicas in every step. ``after_step`` runs
    after each optimizer step (a per-step graft).

    A step whose loss is NaN or Inf is left out of the epoch's loss; with fp16's GradScaler
    (which skips such steps) the epoch goes on, without it the run stops (TrainingError)."""
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    finite_seen = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    channels_last = is_channels_last(model)
    with collectives() if group is not None else contextlib.nullcontext():
        for images, labels in progress(loader):
            images, labels = to_device(images, labels, device, channels_last)
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
            if after_step is not None:
                after_step()
            finite = torch.isfinite(loss.detach()).double() * labels.numel()
            total_loss += torch.nan_to_num(loss.detach().double(), nan=0.0, posinf=0.0, neginf=0.0) * finite
            finite_seen += finite
            correct += (outputs.argmax(1) == labels).sum()
            seen += labels.numel()
            progress.step(total_loss, correct, seen)
        if device.type == "cuda":  # the epoch's time includes the kernels it queued
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if not per_iter:
            scheduler.step()
        totals = torch.stack([total_loss, correct.double(), torch.tensor(float(seen), device=device,
                                                                        dtype=torch.float64), finite_seen])
        if group is not None:
            dist.all_reduce(totals, group=group)
    loss_sum, correct_n, seen_n, finite_n = totals.tolist()
    if finite_n < seen_n and (scaler is None or finite_n == 0):
        raise TrainingError("training loss is NaN or Inf (try a lower optim.lr)")
    return {"train_loss": loss_sum / max(finite_n, 1), "train_acc": 100.0 * correct_n / max(seen_n, 1),
            "images_per_sec": seen_n / seconds, "train_seconds": seconds}


@torch.no_grad()
def evaluate(model, loader, autocast, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Loss and accuracy (``loss``, ``acc``), plus the softmax outputs (for the ensemble) and
    labels."""
    model.eval()
    probs, labels_all, loss_sum = [], [], torch.zeros((), device=device)
    channels_last = is_channels_last(model)
    for images, labels in loader:
        images, labels = to_device(images, labels, device, channels_last)
        with autocast():
            outputs = model(images).float()
        loss_sum += F.cross_entropy(outputs, labels, reduction="sum")  # no host sync per batch
        probs.append(outputs.softmax(1))
        labels_all.append(labels)
    if not probs:
        raise DataError("the evaluated split is empty: no images to evaluate (data.val_fraction too small for "
                        "the data, or an empty test/ folder)")
    probs, labels = torch.cat(probs), torch.cat(labels_all)
    return {"loss": loss_sum.item() / len(labels), "acc": accuracy(probs, labels)}, probs, labels


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in percent, from the integer count (a float32 mean would print 27.59999930858612)."""
    return 100.0 * int((probs.argmax(1) == labels).sum()) / len(labels)
