"""Filter grafting in a plain PyTorch training loop: the lines marked "# graft" are all it adds.

    torchrun --standalone --nproc_per_node=2 examples/own_loop.py [epochs]

Each process trains its own network (own seed, own data order); at every epoch end network k
blends in network k-1's weights, layer by layer.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
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


def main(epochs: int = 3) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())  # every network starts and shuffles differently
    train, test, classes, mean, std, _ = load_arrays(DataConfig(root=str(FIXTURE)))
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    model = Net(classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    grafter = graft.Grafter()  # graft
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
        print(f"network {dist.get_rank()} epoch {epoch + 1}: test accuracy {100 * acc:.1f}%; grafted from "
              f"network {report.peer}, mean alpha {report.mean_alpha:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
