"""The paper's CIFAR architectures, registered with timm, and loaders for small externally trained networks.

Importing this package registers ``cifar_resnet18``, ``cifar_resnet34``, ``cifar_wrn34_10``, ``cifar_wrn28_10``,
``cifar_wrn16_2``, ``cifar_vgg16`` and ``cifar_vgg11`` with timm, so ``timm.create_model("cifar_resnet18",
num_classes=10)`` works offline. Their pretrained_cfg says input (3, 32, 32), mean 0, std 1: inputs are raw [0, 1]
pixels, as in the paper.
"""
from typing import List

from torch import nn

from .cifar_resnet import BasicBlock, CifarResNet, cifar_resnet18, cifar_resnet34
from .shared import (SHARED_MODELS, SharedBlock, SharedResNet, cifar_cnn_a, load_shared_model, mnist_wong_kolter,
                     resnet2b, resnet4b)
from .vgg import CifarVGG, cifar_vgg11, cifar_vgg16
from .wide_resnet import WideResNet, cifar_wrn16_2, cifar_wrn28_10, cifar_wrn34_10

CIFAR_MODELS = ["cifar_resnet18", "cifar_resnet34", "cifar_wrn34_10", "cifar_wrn28_10", "cifar_wrn16_2",
                "cifar_vgg16", "cifar_vgg11"]


def paper_cas_layers(model: nn.Module) -> List[str]:
    """The paper's CAS placement for one of casify's CIFAR models (ResNet: last-stage blocks; WRN: last block's branch
    input and the final feature; VGG: the last block's three ReLUs), ready for ``casify.wrap(model, layers=...)``."""
    if not hasattr(model, "paper_cas_layers"):
        raise TypeError(f"{type(model).__name__} has no known paper placement; pass layers= yourself "
                        "(casify.list_layers(model) lists the candidates)")
    return model.paper_cas_layers()


__all__ = ["BasicBlock", "CIFAR_MODELS", "CifarResNet", "CifarVGG", "SHARED_MODELS", "SharedBlock", "SharedResNet",
           "WideResNet", "cifar_cnn_a", "cifar_resnet18", "cifar_resnet34", "cifar_vgg11", "cifar_vgg16",
           "cifar_wrn16_2", "cifar_wrn28_10", "cifar_wrn34_10", "load_shared_model", "mnist_wong_kolter",
           "paper_cas_layers", "resnet2b", "resnet4b"]
