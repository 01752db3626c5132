"""CIFAR ResNets (He et al. 2016, section 4.2): three stages of 16/32/64 channels, 6n+2 layers.

The shortcut is option A (stride-2 subsampling and zero-padded channels, no parameters), as in
the paper and the official grafting code, so ResNet-32 has 1136 conv filters and 0.46M
parameters. Attribute names match the official code, which keeps ``compat="reference"`` grafting
(keyed on "conv" in state-dict names) faithful.
"""

from functools import partial

import torch.nn as nn
import torch.nn.functional as F


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, act):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes - in_planes)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, leaky: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.act = F.leaky_relu if leaky else F.relu
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s, self.act))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


MODELS = {
    f"resnet{d}{suffix}": partial(CifarResNet, d, leaky=leaky)
    for d in (8, 20, 32, 44, 56, 110)
    for suffix, leaky in (("", False), ("_leaky", True))
}
