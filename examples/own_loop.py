"""Filter grafting in a plain PyTorch training loop: the lines marked "# graft" are all it adds.

    graft-run --standalone --nproc_per_node=2 examples/own_loop.py 3 {network}    # epochs, seed

graft-run starts one process per network and replaces {network} by its index, so each network
has its own seed (own initial weights, own data order); the script runs as if started alone
with python. At every epoch end but the last, network k blends in network k-1's weights.
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import graft  # graft
from graft.config import DataConfig
from graft.data import load_arrays

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cifar10_sample.tar.gz"

class Net(nn.Module):  # a model of one's own: its layers need no particular names
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.body_norm = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem(x)))
        x = F.relu(self.body_norm(self.body(x)))
        return self.head(x.mean((2, 3)))


def main(epochs: int = 3, seed: int = 0) -> None:
    torch.manual_seed(seed)  # every network starts and shuffles differently
    train, test, classes, mean, std, _ = load_arrays(DataConfig(root=str(FIXTURE)))
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    model = Net(classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    grafter = graft.Grafter(epochs=epochs)  # graft
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(train)).split(50):
            loss = F.cross_entropy(model((train.images[batch] / 255 - mean) / std), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            acc = (model((test.images / 255 - mean) / std).argmax(1) == test.labels).float().mean().item()
        report = grafter.graft(model)  # graft
        grafted = "not grafted (the last epoch)" if report is None else \
            f"grafted from network {report.peer}, mean alpha {report.mean_alpha:.3f}"
        print(f"seed {seed} epoch {epoch + 1}: test accuracy {100 * acc:.1f}%; {grafted}", flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
