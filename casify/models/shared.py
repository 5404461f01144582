"""Small, externally trained networks (alpha-beta-CROWN's resnet2b / resnet4b / CNN-A, Wong & Kolter's MNIST net).

Builders recreate each architecture with the exact parameter names of the published state dicts, so they load
strictly; :func:`load_shared_model` picks the architecture from the file name. These models expect normalised inputs
(except the MNIST one): the loader returns the mean/std to pass to ``casify.wrap(..., normalize=norm)``, which keeps
every input and every eps in [0, 1] pixel space.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._timm import cifar_cfg, create

__all__ = ["SharedBlock", "SharedResNet", "resnet2b", "resnet4b", "cifar_cnn_a", "mnist_wong_kolter",
           "SHARED_MODELS", "load_shared_model"]

CIFAR_MEAN_STD = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}
CNN_A_MEAN_STD = {"mean": [125.3 / 255, 123.0 / 255, 113.9 / 255], "std": [63.0 / 255, 62.1 / 255, 66.7 / 255]}


class SharedBlock(nn.Module):
    """relu(conv2(relu(conv1(x))) + shortcut(x)); no batch norm, biased convs, 1x1 conv shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(out) + self.shortcut(x))


class SharedResNet(nn.Module):
    """alpha-beta-CROWN's small ResNets: conv1 (stride 2) + ReLU, SharedBlock stages, flatten, linear1-ReLU-linear2."""

    def __init__(self, stem: int, stages, flat: int, hidden: int = 100, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem, 3, 2, 1)
        in_planes = stem
        for i, stage in enumerate(stages):
            blocks = []
            for planes, stride in stage:
                blocks.append(SharedBlock(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stages)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.linear1 = nn.Linear(flat, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(x, 1)  # channel-major, as the authors' view(N, -1)
        return self.linear2(torch.relu(self.linear1(x)))


def _resnet2b(num_classes: int = 10, in_chans: int = 3) -> SharedResNet:
    return SharedResNet(8, [[(16, 2), (16, 1)]], 16 * 8 * 8, num_classes=num_classes, in_chans=in_chans)


def _resnet4b(num_classes: int = 10, in_chans: int = 3) -> SharedResNet:
    return SharedResNet(16, [[(32, 2), (32, 1)], [(32, 2), (32, 1)]], 32 * 4 * 4, num_classes=num_classes,
                        in_chans=in_chans)


def _cnn_4x4(in_chans: int, side: int, num_classes: int) -> nn.Sequential:
    """conv 4x4/2 (16) - ReLU - conv 4x4/2 (32) - ReLU - flatten - 100 - ReLU - classes (indices match the keys)."""
    flat = 32 * (side // 4) ** 2
    model = nn.Sequential(nn.Conv2d(in_chans, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, num_classes))
    model.num_classes, model.in_chans = num_classes, in_chans  # what timm-style code and casify read
    return model


def _cifar_cnn_a(num_classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    return _cnn_4x4(in_chans, 32, num_classes)


def _mnist_wong_kolter(num_classes: int = 10, in_chans: int = 1) -> nn.Sequential:
    return _cnn_4x4(in_chans, 28, num_classes)


# Registered with timm like the CIFAR models, so each built model carries a pretrained_cfg: casify.wrap then knows
# its input size and normalisation (``wrap(model, layers=[])`` needs neither argument), and a wrapped model saves its
# base as a registered name that from_pretrained and ``casify eval`` rebuild. No weights are published (url empty).
default_cfgs = generate_default_cfgs({
    "resnet2b": cifar_cfg(mean=tuple(CIFAR_MEAN_STD["mean"]), std=tuple(CIFAR_MEAN_STD["std"]), classifier="linear2"),
    "resnet4b": cifar_cfg(mean=tuple(CIFAR_MEAN_STD["mean"]), std=tuple(CIFAR_MEAN_STD["std"]), classifier="linear2"),
    "cifar_cnn_a": cifar_cfg(mean=tuple(CNN_A_MEAN_STD["mean"]), std=tuple(CNN_A_MEAN_STD["std"]), first_conv="0",
                             classifier="7"),
    "mnist_wong_kolter": cifar_cfg(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,), first_conv="0", classifier="7"),
})


@register_model
def resnet2b(pretrained: bool = False, **kwargs) -> SharedResNet:
    """8 -> [Block(8,16,2), Block(16,16,1)] -> 1024 -> 100 -> classes; for 3x32x32 inputs."""
    return create(_resnet2b, "resnet2b", pretrained, **kwargs)


@register_model
def resnet4b(pretrained: bool = False, **kwargs) -> SharedResNet:
    """16 -> [Block(16,32,2), Block(32,32,1)], [Block(32,32,2), Block(32,32,1)] -> 512 -> 100 -> classes."""
    return create(_resnet4b, "resnet4b", pretrained, **kwargs)


@register_model
def cifar_cnn_a(pretrained: bool = False, **kwargs) -> nn.Sequential:
    """CNN-A of the SDP-FO benchmark, for 3x32x32 inputs."""
    return create(_cifar_cnn_a, "cifar_cnn_a", pretrained, **kwargs)


@register_model
def mnist_wong_kolter(pretrained: bool = False, **kwargs) -> nn.Sequential:
    """Wong & Kolter's (2018) MNIST conv net, for 1x28x28 inputs, no normalisation."""
    return create(_mnist_wong_kolter, "mnist_wong_kolter", pretrained, **kwargs)


# name -> (builder, input normalisation or None, input size); matched against the file name's stem.
SHARED_MODELS: Dict[str, Tuple[Callable[[], nn.Module], Optional[dict], Tuple[int, int, int]]] = {
    "resnet2b": (resnet2b, CIFAR_MEAN_STD, (3, 32, 32)),
    "resnet4b": (resnet4b, CIFAR_MEAN_STD, (3, 32, 32)),
    "cifar_cnn_a": (cifar_cnn_a, CNN_A_MEAN_STD, (3, 32, 32)),
    "mnist_wong_kolter": (mnist_wong_kolter, None, (1, 28, 28)),
}


def _arch_from_name(path: Path) -> str:
    stem = path.stem.lower()
    # Longest names first, so a more specific architecture name wins over a prefix of it.
    for name in sorted(SHARED_MODELS, key=len, reverse=True):
        if stem == name or stem.startswith(name + "_") or stem.startswith(name + "-"):
            return name
    raise ValueError(f"cannot tell the architecture of {path.name!r} from its name; expected a file named after one "
                     f"of {sorted(SHARED_MODELS)} (e.g. 'cifar_cnn_a_adv.pth'), or pass arch=")


def load_shared_model(path: Union[str, os.PathLike], arch: Optional[str] = None
                      ) -> Tuple[nn.Module, Optional[Dict[str, list]]]:
    """Load one of the small pretrained networks strictly, in eval mode, on the CPU.

    The file is read with ``weights_only=True`` (no arbitrary unpickling); a dict holding ``state_dict`` (the
    alpha-beta-CROWN format, whose other keys are the authors' accuracy figures) is unpacked.

    Returns:
        ``(model, normalize)`` where ``normalize`` is ``{"mean": [...], "std": [...]}`` or None, ready for
        ``casify.wrap(model, ..., normalize=normalize)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    name = arch or _arch_from_name(path)
    if name not in SHARED_MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(SHARED_MODELS)}")
    builder, norm, _ = SHARED_MODELS[name]
    state = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    model = builder()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match the {name} architecture: {exc}") from exc
    model.eval()
    return model, (None if norm is None else {k: list(v) for k, v in norm.items()})
