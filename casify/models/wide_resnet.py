"""WideResNet for CIFAR as in the TRADES / MART / CAS code (Zagoruyko & Komodakis, pre-activation blocks).

Parameter names follow that code (``conv1``, ``blockN.layer.B.bn1/conv1/bn2/conv2/convShortcut``, ``bn1``, ``fc``) so
its checkpoints load; TRADES' WRN also holds an unused ``sub_block1`` (never called in forward): drop its keys first.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._timm import cifar_cfg, create

__all__ = ["WideBasicBlock", "NetworkBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block. When the shape changes, the *pre-activated* input feeds both the branch and the 1x1
    shortcut; otherwise the raw input is the shortcut and ``relu1``'s output (the branch input) is what CAS masks."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            x = self.relu1(self.bn1(x))
            out = x
            shortcut = self.convShortcut(x)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """One group of ``n`` blocks, held in ``.layer`` as in the reference code."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1, drop_rate) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: stem conv 16 -> three groups (16k, 32k, 64k channels) -> BN-ReLU -> pool -> ``fc``.

    ``depth`` must be 6n + 4 (n blocks per group): 34 gives WRN-34-10's 5 blocks per group, 16 gives 2.
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 34), got {depth}")
        if global_pool != "avg":
            raise ValueError(f"WideResNet supports only global_pool='avg', got {global_pool!r}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes, self.in_chans, self.depth, self.global_pool = num_classes, in_chans, depth, global_pool
        # timm.create_model(<registered name>, num_classes=..., in_chans=..., **arch_kwargs) rebuilds this model.
        self.arch_kwargs = {"depth": depth, "widen_factor": widen_factor}
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.num_features = self.head_hidden_size = channels[3]
        self.fc = nn.Linear(channels[3], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="conv1"),
                             dict(num_chs=channels[1], reduction=1, module="block1"),
                             dict(num_chs=channels[2], reduction=2, module="block2"),
                             dict(num_chs=channels[3], reduction=4, module="relu")]
        for m in self.modules():  # the reference code's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def paper_cas_layers(self) -> List[str]:
        """The paper's S = 2 placement: the branch input of the last block of group 3 (``relu1``, shortcut un-masked)
        and the final BN-ReLU feature before pooling."""
        return [f"block3.layer.{len(self.block3.layer) - 1}.relu1", "relu"]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"WideResNet supports only global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # = avg_pool2d(8) at 32x32
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({name: cifar_cfg(classifier="fc")
                                      for name in ("cifar_wrn34_10", "cifar_wrn28_10", "cifar_wrn16_2")})
_FEATURES = {"out_indices": (0, 1, 2, 3)}


def _wrn(variant: str, pretrained: bool, default_depth: int, default_widen: int, **kwargs) -> WideResNet:
    kwargs.setdefault("depth", default_depth)
    kwargs.setdefault("widen_factor", default_widen)
    return create(WideResNet, variant, pretrained, feature_cfg=dict(_FEATURES), **kwargs)


@register_model
def cifar_wrn34_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-34-10 (46M parameters), the paper's large model; ``depth``/``widen_factor`` kwargs override."""
    return _wrn("cifar_wrn34_10", pretrained, 34, 10, **kwargs)


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 (36M parameters), common in the robustness literature."""
    return _wrn("cifar_wrn28_10", pretrained, 28, 10, **kwargs)


@register_model
def cifar_wrn16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-2 (0.7M parameters): the same design at a size that trains on a CPU."""
    return _wrn("cifar_wrn16_2", pretrained, 16, 2, **kwargs)
