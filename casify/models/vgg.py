"""VGG16 with batch norm for 32x32 inputs, as in the CAS code (kuangliu/pytorch-cifar layout).

Five blocks of 3x3 conv-BN-ReLU separated by 2x2 max-pools: at 32x32 the last block's three convs run at 2x2 and the
final pool leaves 1x1x512, read by one linear ``classifier``. Parameter names are ``features.<i>`` / ``classifier``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._timm import cifar_cfg, create

__all__ = ["CifarVGG", "VGG_CFGS"]

VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG-BN for CIFAR; ``width`` scales every conv's channels (0.25 for CPU-scale runs)."""

    def __init__(self, cfg: Union[str, Sequence[Union[int, str]]] = "vgg16", num_classes: int = 10, in_chans: int = 3,
                 width: float = 1.0, global_pool: str = "avg"):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"CifarVGG supports only global_pool='avg', got {global_pool!r}")
        cfg = VGG_CFGS[cfg] if isinstance(cfg, str) else list(cfg)
        self.num_classes, self.in_chans, self.width, self.global_pool = num_classes, in_chans, width, global_pool
        # timm.create_model(<registered name>, num_classes=..., in_chans=..., **arch_kwargs) rebuilds this model.
        self.arch_kwargs = {"width": width}
        layers: List[nn.Module] = []
        self.feature_info = []
        channels, reduction = in_chans, 1
        for v in cfg:
            if v == "M":
                tap = f"features.{len(layers) - 1}"  # the ReLU before each max-pool
                self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=tap))
                layers.append(nn.MaxPool2d(2, 2))
                reduction *= 2
            else:
                out = max(1, int(round(v * width)))
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = channels
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

    def paper_cas_layers(self) -> List[str]:
        """The paper's S = 3 placement: after each conv-BN-ReLU of the last block (the ReLUs after the last but one
        max-pool)."""
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        start = pools[-2] if len(pools) > 1 else -1
        return [f"features.{i}" for i, m in enumerate(self.features)
                if isinstance(m, nn.ReLU) and start < i < pools[-1]]

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"CifarVGG supports only global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # at 32x32 the map is already 1x1
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({name: cifar_cfg(classifier="classifier", first_conv="features.0")
                                      for name in ("cifar_vgg16", "cifar_vgg11")})


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG16-BN for CIFAR (14.7M parameters); CAS goes after the three ReLUs of the last block."""
    return create(CifarVGG, "cifar_vgg16", pretrained, feature_cfg=dict(flatten_sequential=True), cfg="vgg16", **kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG11-BN for CIFAR (9.2M parameters), a lighter VGG."""
    return create(CifarVGG, "cifar_vgg11", pretrained, feature_cfg=dict(flatten_sequential=True), cfg="vgg11", **kwargs)
