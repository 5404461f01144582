"""The CIFAR ResNet-18 of the adversarial-training literature (Madry et al., TRADES, MART, CAS).

A 3x3 stride-1 stem without max-pool keeps 32x32 inputs at 4x4 in ``layer4``. Parameter names follow the widely used
``kuangliu/pytorch-cifar`` layout (``conv1``, ``bn1``, ``layerN.B.shortcut.0/1``, ``linear``), which is also what the
CAS, TRADES and MART code bases save, so their checkpoints load strictly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._timm import cifar_cfg, create

__all__ = ["BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN when the shape changes."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem conv 3x3/1 -> 4 stages of BasicBlocks -> global average pool -> ``linear``.

    Args:
        layers: blocks per stage; (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34.
        num_classes: output classes (0 gives an identity head that returns pooled features).
        in_chans: input channels.
        width: multiplier on the stage widths 64/128/256/512 (0.25 gives 16/32/64/128, for CPU-scale runs).
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3,
                 width: float = 1.0, global_pool: str = "avg"):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"CifarResNet supports only global_pool='avg', got {global_pool!r}")
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.num_classes, self.in_chans, self.width, self.global_pool = num_classes, in_chans, width, global_pool
        # timm.create_model(<registered name>, num_classes=..., in_chans=..., **arch_kwargs) rebuilds this model.
        self.arch_kwargs = {"width": width}
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="relu")]
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=planes, reduction=2 ** i, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = in_planes
        self.linear = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()

    def paper_cas_layers(self) -> List[str]:
        """Where the paper puts CAS: after each block of the last stage (``layer4.0``, ``layer4.1`` for ResNet-18)."""
        return [f"layer4.{i}" for i in range(len(self.layer4))]

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"CifarResNet supports only global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # Adaptive pooling equals the original avg_pool2d(4) at 32x32 and also works on other input sizes.
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "cifar_resnet18": cifar_cfg(classifier="linear"),
    "cifar_resnet34": cifar_cfg(classifier="linear"),
})


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-18 (11.2M parameters at width 1); CAS goes at ``["layer4.0", "layer4.1"]``."""
    return create(CifarResNet, "cifar_resnet18", pretrained, layers=(2, 2, 2, 2), **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs) -> CifarResNet:
    """CIFAR ResNet-34 (same stem and head as ResNet-18, stages of 3/4/6/3 blocks)."""
    return create(CifarResNet, "cifar_resnet34", pretrained, layers=(3, 4, 6, 3), **kwargs)
