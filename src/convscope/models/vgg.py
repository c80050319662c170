"""VGG-16 in torchvision's module layout, so that a torchvision state dict loads as it is."""

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
