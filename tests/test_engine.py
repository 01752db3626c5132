"""The training step and evaluation: batches take the model's memory format on the device."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graft import engine
from graft.engine import evaluate, train_one_epoch
from graft.report import Progress


class Recorder(nn.Module):
    """A small conv net that notes whether each batch it is given is channels_last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.fc(self.conv(x).mean((2, 3)))


def batches(n=3):
    """As a DataLoader over image files yields them: contiguous CPU tensors."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 0, 1])) for _ in range(n)]


def train(model, loader):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loss = lambda outputs, labels, images: F.cross_entropy(outputs, labels)  # noqa: E731
    train_one_epoch(model, loader, loss, optimizer, scheduler, False, None, contextlib.nullcontext,
                    Progress(False, "", len(loader)), torch.device("cpu"))


@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_follow_the_models_memory_format(channels_last):
    """channels_last: true converts the model; every loader's batches (contiguous, as both the
    in-memory and the folder loaders yield them) follow it on the device."""
    model = Recorder()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train(model, batches())
    evaluate(model, batches(), contextlib.nullcontext, torch.device("cpu"))
    assert model.seen == [channels_last] * 6
    assert engine.is_channels_last(model) is channels_last  # the optimizer's steps kept the weights' format


def test_channels_last_batches_are_not_copied():
    """A batch that is channels_last already (a script's own loader) goes through as it is."""
    model = Recorder().to(memory_format=torch.channels_last)
    given = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches(1)]
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    evaluate(model, given, contextlib.nullcontext, torch.device("cpu"))
    assert inputs[0].data_ptr() == given[0][0].data_ptr()
