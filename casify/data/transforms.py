"""Image transforms: images to float CHW tensors in [0, 1], resizing, and the CIFAR / ImageNet training and evaluation
pipelines (no normalisation: mean/std live inside the model)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def to_image_tensor(img) -> torch.Tensor:
    """A PIL image, an HWC/HW uint8 array or a CHW tensor as a plain float32 CHW tensor in [0, 1]."""
    if isinstance(img, torch.Tensor):
        t = img
    elif isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    else:  # PIL
        from torchvision.transforms.functional import pil_to_tensor
        t = pil_to_tensor(img.convert("RGB") if img.mode not in ("RGB", "L") else img)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()


class ToImageTensor:
    """Transform form of :func:`to_image_tensor` (picklable, for DataLoader workers)."""

    def __call__(self, img) -> torch.Tensor:
        return to_image_tensor(img)

    def __repr__(self) -> str:
        return "ToImageTensor()"


class ResizeTensor:
    """Resize a [0, 1] image tensor to ``size`` x ``size`` (bilinear, antialiased): small images for a model
    pretrained at a larger resolution (e.g. CIFAR for an ImageNet backbone). Picklable for DataLoader workers."""

    def __init__(self, size: int):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"image_size must be a positive integer, got {size!r}")
        self.size = size

    def __call__(self, img) -> torch.Tensor:
        t = to_image_tensor(img)
        if tuple(t.shape[-2:]) == (self.size, self.size):
            return t
        return F.interpolate(t.unsqueeze(0), size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=True).squeeze(0).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"ResizeTensor({self.size})"


def cifar_train_transform(size: int = 32, padding: int = 4) -> Callable:
    """The paper's CIFAR augmentation: zero-pad 4 pixels, random crop back to 32, random horizontal flip.

    Accepts PIL images, uint8 arrays or [0, 1] tensors and returns a [0, 1] float tensor.
    """
    from torchvision import transforms as T
    return T.Compose([ToImageTensor(), T.RandomCrop(size, padding=padding, fill=0, padding_mode="constant"),
                      T.RandomHorizontalFlip()])


def imagenet_train_transform(size: int = 224) -> Callable:
    """Standard ImageNet training augmentation: RandomResizedCrop(size) + horizontal flip, to a [0, 1] tensor."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), ToImageTensor()])


def imagenet_eval_transform(size: int = 224) -> Callable:
    """Standard ImageNet evaluation: resize the short side to size * 256/224, centre-crop ``size``, to [0, 1]."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(int(round(size * 256 / 224)), antialias=True), T.CenterCrop(size), ToImageTensor()])


# ------------------------------------------------------------------------------------------------------ array datasets


class Then:
    """Compose two callables (picklable, unlike a lambda)."""

    def __init__(self, first: Callable, second: Callable):
        self.first, self.second = first, second

    def __call__(self, x):
        return self.second(self.first(x))
