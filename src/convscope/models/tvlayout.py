"""Nets in torchvision's module layout, so that torchvision's state dicts load as they are: VGG-16, and AlexNet
as torchvision defines it (the one-tower variant of "One weird trick", 64-192-384-256-256 filters, no local
response norm), which is not the paper's 96-filter replication of Krizhevsky's net (``alexnet``)."""

from __future__ import annotations

import torch
from torch import nn

_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """Simonyan & Zisserman's 16-layer net. ``paper_layers`` maps conv1..conv5 to the last ReLU of each block
    and fc6, fc7 to the classifier's ReLUs."""

    def __init__(self, num_classes: int = 1000, input_size: int = 224, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels, block, self.paper_layers = 3, 1, {}
        for v in _CFG:
            if v == "M":
                self.paper_layers[f"conv{block}"] = f"features.{len(layers) - 1}"
                layers.append(nn.MaxPool2d(2, 2))
                block += 1
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        self.paper_layers.update(fc6="classifier.1", fc7="classifier.4")
        self.num_classes, self.input_size = num_classes, input_size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchvisionAlexNet(nn.Module):
    """torchvision's ``alexnet``: conv1 64 filters 11x11 stride 4, no local response norm, adaptive 6x6 pooling
    before the classifier. ``paper_layers`` maps conv1..conv5 and fc6, fc7 to its ReLUs."""

    def __init__(self, num_classes: int = 1000, input_size: int = 224, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        self.paper_layers = {"conv1": "features.1", "conv2": "features.4", "conv3": "features.7",
                             "conv4": "features.9", "conv5": "features.11", "fc6": "classifier.2",
                             "fc7": "classifier.5"}
        self.num_classes, self.input_size = num_classes, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
