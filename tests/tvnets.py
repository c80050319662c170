"""Nets in torchvision's module layout, small, written here (torchvision does not import beside this torch): a
ResNet-50 (bottlenecks with the stride on the 3x3 conv; a ResNet-D variant), a ConvNeXt (depthwise conv,
permute, LayerNorm, Linear, GELU, Linear, permute back) and an EfficientNet (expand, depthwise, squeeze-and-
excitation, project). The module names are torchvision's, so a user's state dict would load. A test attaches
one with ``--model tests/tvnets.py:ConvNeXt``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (v1.5: the stride on the 3x3 conv), one ReLU module called three times;
    ``avg_down``: timm's ResNet-D shortcut (average pool, then a 1x1 conv of stride 1)."""

    def __init__(self, cin, width, stride, avg_down=False):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            if avg_down and stride != 1:
                self.downsample = nn.Sequential(nn.AvgPool2d(stride, stride), nn.Conv2d(cin, cout, 1, bias=False),
                                                nn.BatchNorm2d(cout))
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 module layout (3, 4, 6, 3 bottlenecks) at an eighth of its width; ``deep_stem``
    and ``avg_down``: timm's ResNet-D (a stem of three 3x3 convs, average-pool shortcuts)."""

    def __init__(self, num_classes=10, deep_stem=False, avg_down=False, base=8):
        super().__init__()
        if deep_stem:
            self.conv1 = nn.Sequential(nn.Conv2d(3, base, 3, 2, 1), nn.BatchNorm2d(base), nn.ReLU(),
                                       nn.Conv2d(base, base, 3, 1, 1), nn.BatchNorm2d(base), nn.ReLU(),
                                       nn.Conv2d(base, base, 3, 1, 1))
        else:
            self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(base), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin, stages = base, []
        for i, blocks in enumerate((3, 4, 6, 3)):
            width = base * 2 ** i
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1, avg_down))
                cin = width * 4
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm over the channels of (N, C, H, W) maps, between two permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: the per-position LayerNorm and MLP run on (N, H, W, C) tensors."""

    def __init__(self, dim, layer_scale=1e-6):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = nn.Identity()

    def forward(self, x):
        result = self.stochastic_depth(self.layer_scale * self.block(x))
        result += x
        return result


class ConvNeXt(nn.Module):
    """torchvision's ConvNeXt module layout: ``features`` = stem (4x4 conv of stride 4, LayerNorm2d), then stages
    of CNBlocks between downsampling layers (LayerNorm2d, 2x2 conv of stride 2); ``avgpool``; ``classifier`` =
    LayerNorm2d, Flatten, Linear."""

    def __init__(self, num_classes=10, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), layer_scale=1e-6):
        super().__init__()
        features = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            features.append(nn.Sequential(*(CNBlock(dim, layer_scale) for _ in range(depth))))
            if i + 1 < len(dims):
                features.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def conv_norm_act(cin, cout, kernel, stride=1, groups=1, act=True):
    """torchvision's Conv2dNormActivation: conv (no bias), batch norm, SiLU."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.SiLU(inplace=True)) if act else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: every map multiplied by a weight computed from all positions.
    ``detached``: the weight taken as a constant (a test's way to the convolutional path's gradient)."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.SiLU(inplace=True), nn.Sigmoid()
        self.detached = False

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return (scale.detach() if self.detached else scale) * x


class MBConv(nn.Module):
    """torchvision's EfficientNet block: expand (1x1), depthwise (k x k, the stride), squeeze-and-excitation,
    project (1x1); a residual where the shape allows."""

    def __init__(self, cin, cout, expand, kernel, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        wide = cin * expand
        layers = [conv_norm_act(cin, wide, 1)] if wide != cin else []
        layers += [conv_norm_act(wide, wide, kernel, stride, groups=wide), SqueezeExcitation(wide, max(1, cin // 4)),
                   conv_norm_act(wide, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = nn.Identity()

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


# (expand, kernel, stride, in, out, blocks): EfficientNet-B0's first five stages at a quarter of their width
B0_STAGES = ((1, 3, 1, 8, 4, 1), (6, 3, 2, 4, 6, 2), (6, 5, 2, 6, 10, 2), (6, 3, 2, 10, 20, 1), (6, 5, 1, 20, 28, 1))


class EfficientNet(nn.Module):
    """torchvision's EfficientNet module layout: ``features`` = stem, stages of MBConvs, a 1x1 head conv;
    ``avgpool``; ``classifier`` = Dropout, Linear."""

    def __init__(self, num_classes=10, stages=B0_STAGES):
        super().__init__()
        features = [conv_norm_act(3, stages[0][3], 3, 2)]
        for expand, kernel, stride, cin, cout, blocks in stages:
            features.append(nn.Sequential(*(MBConv(cin if b == 0 else cout, cout, expand, kernel,
                                                   stride if b == 0 else 1) for b in range(blocks))))
        last = stages[-1][4]
        features.append(conv_norm_act(last, 4 * last, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
