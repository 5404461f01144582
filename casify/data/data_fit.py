"""Does a dataset fit a model? The one check that :func:`casify.evaluate.evaluate`, :class:`casify.train.Trainer` and
the CLI all run before any work, so the Python API refuses what the CLI refuses, with the same words.

Why a module of its own: every mistake here gives a number instead of an error. A model with another class count
than the data scores 0 % (or chance) and looks merely weak; 0..255 pixels make every eps meaningless; an empty
dataset divides by zero or reads 0.00 %. Each is one clear error (a different image size only warns: many models
take any size, but the accuracy may not mean what it does at the size the model was built for).

The class count comes from the **model** (its defense modules, its config's ``num_classes``, a timm-style
``num_classes``, else the width of its output on one image), never from the data: a dataset without class names
only knows its largest label (a 1-image file would read "6 classes"). The data's labels must lie below it, and a
dataset that states its class count (a named dataset, an image folder) must state the same one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..core.inputs import check_images, model_num_classes


class InputSizeWarning(UserWarning):
    """The data's images have another height or width than the one the model was wrapped for."""


@dataclass(frozen=True)
class DataFit:
    """What the check learned: ``n`` examples, the model's class count (None when even a forward could not tell) and
    the shape of one image."""
    n: int
    num_classes: Optional[int]
    image_shape: Tuple[int, ...]


def _unwrap(dataset: Dataset) -> Tuple[Dataset, Optional[List[int]]]:
    """The dataset under any ``Subset``s and the indices into it they select (None: all)."""
    indices: Optional[List[int]] = None
    while isinstance(dataset, Subset):
        own = list(dataset.indices)
        indices = own if indices is None else [own[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def stated_num_classes(dataset: Dataset) -> Optional[int]:
    """The class count a dataset states (a named dataset's, an image folder's, class names given), else None; a
    count guessed from the largest label (``num_classes_from_labels``) is not a statement."""
    for ds in (dataset, _unwrap(dataset)[0]):
        n = getattr(ds, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return None if getattr(ds, "num_classes_from_labels", False) else n
    return None


def dataset_labels(dataset: Dataset) -> Optional[torch.Tensor]:
    """Every label, read without loading an image, where the dataset keeps them in one array (casify's tensor and
    .npz datasets, ``TensorDataset``, torchvision's CIFAR / SVHN / ImageFolder, through ``Subset``s); else None."""
    base, indices = _unwrap(dataset)
    labels = None
    if isinstance(base, TensorDataset) and len(base.tensors) >= 2:
        labels = base.tensors[1]
    else:
        for attr in ("labels", "targets"):
            value = getattr(base, attr, None)
            if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
                labels = value
                break
    if labels is None:
        return None
    try:
        labels = torch.as_tensor(np.asarray(labels.cpu() if torch.is_tensor(labels) else labels))
    except (TypeError, ValueError):
        return None
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool or len(labels) != len(base):
        return None
    return labels if indices is None else labels[torch.as_tensor(indices, dtype=torch.long)]


def model_class_count(model: nn.Module, image: Optional[torch.Tensor] = None) -> Optional[int]:
    """The classes the model predicts: what it states (defense modules, ``casify_config``, ``num_classes``), else the
    width of its output on ``image`` (one image, C x H x W; a no-grad forward in eval mode), else None."""
    try:
        stated = model_num_classes(model)
    except (TypeError, ValueError):  # a num_classes property over a config that holds none
        stated = None
    if stated is None:
        cas = (getattr(model, "casify_config", None) or {}).get("cas") or {}
        n = cas.get("num_classes")
        stated = int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    if stated is not None or image is None:
        return stated
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(image[None].to(device).float())
    except RuntimeError as e:
        raise ValueError(f"the model cannot take these images (one of shape {tuple(image.shape)} fails its "
                         f"forward: {' '.join(str(e).split())[:300]})") from None
    finally:
        for module, training in modes:
            module.training = training
    return int(out.shape[1]) if torch.is_tensor(out) and out.dim() == 2 else None


def check_data_fits(model: nn.Module, dataset: Dataset, data_name: str = "the data") -> DataFit:
    """Refuse data that cannot give an honest number on ``model`` (ValueError / TypeError, one line naming the fix):
    no examples; images that are not float pixels in [0, 1] (uint8 or 0..255: divide by 255; NaN / inf); a channel
    count other than the model's; labels at or past the model's class count; a dataset that states another class
    count than the model's. Another height / width than the model was wrapped for warns (:class:`InputSizeWarning`).
    Only the first image is read (the attacks check every batch); labels are read without images where the dataset
    keeps them in one array."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{data_name} holds no examples (0 images): there is nothing to measure; check the dataset's "
                         "path and split")
    x, y = dataset[0][:2]
    if not torch.is_tensor(x):
        raise TypeError(f"{data_name} gives images of type {type(x).__name__}; casify takes tensors of float pixels "
                        "in [0, 1] (torchvision's ToTensor() makes them)")
    try:
        check_images(x[None], readable=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{data_name}: {e}") from None
    shape = tuple(int(d) for d in x.shape)
    expected = ((getattr(model, "casify_config", None) or {}).get("cas") or {}).get("input_size")
    if expected:
        expected = tuple(int(d) for d in expected)
        if len(shape) != len(expected) or shape[0] != expected[0]:
            raise ValueError(f"{data_name} has images of shape {shape} but the model takes {expected} "
                             f"({expected[0]} channels): convert the images (e.g. grayscale to RGB) or use the "
                             "model's own kind of data")
        if shape != expected:
            warnings.warn(f"{data_name} has images of shape {shape} but the model was wrapped for {expected}; its "
                          "accuracy may not mean what it does at its own size (resize the data, or check the "
                          "dataset)", InputSizeWarning, stacklevel=3)
    classes = model_class_count(model, x)
    stated = stated_num_classes(dataset)
    if classes is not None and stated is not None and stated != classes:
        raise ValueError(f"the model has {classes} classes but {data_name} has {stated}: its accuracy there would "
                         "mean nothing; use data of the model's own classes (or a model trained on these)")
    labels = dataset_labels(dataset)
    if labels is None:
        labels = torch.as_tensor([int(y)]) if not torch.is_tensor(y) or y.dim() == 0 else None
    if classes is not None and labels is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(f"{data_name} has labels in [{low}, {high}] but the model has {classes} classes "
                             f"(labels 0..{classes - 1}): use data of the model's own classes (or a model trained "
                             "on these)")
    return DataFit(n=n, num_classes=classes, image_shape=shape)


__all__ = ["DataFit", "InputSizeWarning", "check_data_fits", "dataset_labels", "model_class_count",
           "stated_num_classes"]
