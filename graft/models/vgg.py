"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman 2015): the paper's filter-level model."""

import torch.nn as nn

CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int = 16, num_classes: int = 10):
        super().__init__()
        layers, in_channels = [], 3
        for v in CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


MODELS = {"vgg11_bn": lambda num_classes=10: VGG(11, num_classes),
          "vgg16_bn": lambda num_classes=10: VGG(16, num_classes)}
