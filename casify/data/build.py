"""One entry point from a dataset's name to its split: :func:`build_dataset` (the names, the held-out validation
splits, the class counts), and the short names a run records."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset, Subset

from .datasets import (SPLITS, TORCHVISION_DATASETS, NpzDataset, digits_dataset, imagefolder_dataset, torchvision_dataset,
                       train_val_split)
from .transforms import ResizeTensor, Then, cifar_train_transform, imagenet_eval_transform, imagenet_train_transform

DATASET_NAMES = ("digits", "cifar10", "cifar100", "svhn", "imagefolder:<root>", "<path>.npz",
                 "hfds:<Hub id or save_to_disk folder>", "wds:<tar shard pattern>")
RECORD_SOURCES = ("hfds", "wds")  # Hugging Face datasets, WebDataset shards (timm's prefixes; hfds/ and wds/ work too)
RECORD_KWARGS = ("image_key", "label_key", "num_classes")


def _npz_split_keys(path: Path) -> list:
    with np.load(path, allow_pickle=False) as data:
        return sorted(data.files)


def build_dataset(name_or_path: Union[str, os.PathLike], split: str = "train", *, root=None, download: bool = False,
                  augment: bool = False, transform: Optional[Callable] = None,
                  val_size: Optional[Union[int, float]] = None, val_seed: Union[int, None, str] = "default",
                  image_size: Optional[int] = None, **kwargs) -> Dataset:
    """One split ("train", "val" or "test") of a dataset named in a recipe or config.

    Names: ``"digits"`` (offline, sklearn; ``size``/``channels`` kwargs), ``"cifar10"``, ``"cifar100"``, ``"svhn"``
    (torchvision, under ``root`` or ``$CASIFY_DATA``), ``"imagefolder:<root>"`` (``<root>/train``, ``<root>/val``,
    ``<root>/test``; without a ``test/``, ``val/`` is the test set, as for ImageNet), or a path to an ``.npz`` file.

    Validation data, where the dataset has none of its own, is held out of the training split, and "train" then
    excludes it. Defaults: the last 5,000 training images for cifar10/cifar100/svhn; the last 10 % for an .npz
    (the last 5,000 of CIFAR-10's train.npz); a seeded random 10 % for an image folder (stored in class order).
    ``val_size=0`` trains on everything (then "val" is unavailable); ``val_seed`` None means "the last items",
    an int a seeded random choice, "default" the dataset's convention. A single-split .npz (keys ``x``/``y``) used
    as "test" is taken whole.

    ``image_size`` resizes every image of a cifar10/cifar100/svhn/.npz dataset to that square size (before
    augmentation), e.g. 128 to retrofit an ImageNet backbone whose last stage would otherwise be 1x1; for image folders,
    Hugging Face datasets and WebDataset shards it is the crop size (default 224).

    ``"hfds:<Hub id or folder>"`` (:mod:`casify.data.hf_dataset`: a folder written by ``save_to_disk``, or a Hub dataset
    fetched with ``download=True``) and ``"wds:<shard pattern>"`` (:mod:`casify.data.webdataset_shards`: tar shards,
    brace-expanded and globbed) read records by position, so runs on them resume exactly; ``kwargs`` may name the
    ``image_key`` / ``label_key`` fields and ``num_classes``. Their libraries are extras (``casify-robust[hf]``,
    ``casify-robust[wds]``); a missing one is a one-line error naming it.

    ``augment=True`` applies training augmentation to the "train" split only (the paper's pad-crop-flip for 32x32
    data, size/8 padding for digits; RandomResizedCrop(image_size) + flip for image folders); ``transform`` replaces
    the default tensor transform.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = os.fspath(name_or_path)
    return _named(_build_dataset(name, split, root=root, download=download, train_aug=augment and split == "train",
                                 transform=transform, val_size=val_size, val_seed=val_seed, image_size=image_size,
                                 **kwargs), short_name(name), split)


def short_name(name_or_path: Union[str, os.PathLike]) -> str:
    """What a report, a card and a figure call a dataset: ``cifar10`` for a named one (RobustBench's spelling), the
    folder's name for ``imagefolder:<root>`` and the file's stem for an ``.npz``: never a path."""
    name = os.fspath(name_or_path)
    if name.startswith("imagefolder:"):
        return Path(name[len("imagefolder:"):]).expanduser().resolve().name or name
    if name.endswith(".npz"):
        return Path(name).stem
    return name


def dataset_name(dataset: Dataset) -> Tuple[Optional[str], Optional[str]]:
    """(name, split) that :func:`build_dataset` gave ``dataset`` (through ``Subset``s), else (None, None)."""
    while dataset is not None:
        name = getattr(dataset, "casify_name", None)
        if isinstance(name, str):
            return name, getattr(dataset, "casify_split", None)
        dataset = getattr(dataset, "dataset", None) if isinstance(dataset, Subset) else None
    return None, None


def _named(ds: Dataset, name: str, split: str) -> Dataset:
    ds.casify_name, ds.casify_split = name, split
    return ds


def _build_dataset(name: str, split: str, *, root, download: bool, train_aug: bool, transform, val_size, val_seed,
                   image_size, **kwargs) -> Dataset:
    if name == "digits":
        if train_aug and transform is None:
            size = kwargs.get("size", 16)
            transform = cifar_train_transform(size, padding=max(1, size // 8))
        return _with_classes(digits_dataset(split, transform=transform, **kwargs), 10)

    if name in TORCHVISION_DATASETS:
        tf = transform or (cifar_train_transform(image_size or 32, padding=(image_size or 32) // 8) if train_aug else None)
        if image_size and transform is None:
            tf = Then(ResizeTensor(image_size), tf) if tf is not None else ResizeTensor(image_size)
        base = torchvision_dataset(name, "test" if split == "test" else "train", root=root, download=download,
                                   transform=tf)
        if split == "test":
            return base
        return _held_out(base, split, 5000 if val_size is None else val_size, val_seed, None, base.num_classes, name)

    if name.startswith("imagefolder:"):
        folder = Path(name[len("imagefolder:"):]).expanduser()
        size = image_size or 224
        tf = transform or (imagenet_train_transform(size) if train_aug else imagenet_eval_transform(size))
        if (folder / "val").is_dir() and (folder / "test").is_dir():  # the folder has all three splits
            return imagefolder_dataset(folder / split, tf)
        if split == "test":  # ImageNet: the official validation set is everyone's test set
            return imagefolder_dataset(_existing(folder / "test" if (folder / "test").is_dir() else folder / "val",
                                                 folder), tf)
        base = imagefolder_dataset(_existing(folder / "train", folder), tf)
        return _held_out(base, split, 0.1 if val_size is None else val_size, val_seed, 0, base.num_classes, name)

    prefix, ref = record_source(name)
    if prefix is not None:
        unknown = sorted(set(kwargs) - set(RECORD_KWARGS))
        if unknown:
            raise ValueError(f"{name}: data.kwargs {unknown} are not settings of this source; it takes "
                             f"{list(RECORD_KWARGS)}")
        size = image_size or 224
        tf = transform or (imagenet_train_transform(size) if train_aug else imagenet_eval_transform(size))
        if prefix == "wds":
            from .webdataset_shards import tar_shard_dataset
            base = tar_shard_dataset(ref, tf, **kwargs)
            if split == "test":  # one pattern is one split: the test set whole (point data.test at its shards)
                return base
            return _held_out(base, split, 0.1 if val_size is None else val_size, val_seed, 0, base.num_classes, name)
        return _hf_split(ref, name, split, tf, download, root, val_size, val_seed, **kwargs)

    if name.endswith(".npz"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no .npz file at {path}")
        keys = _npz_split_keys(path)
        size = image_size or kwargs.get("size", 32)
        tf = transform or (cifar_train_transform(size, padding=size // 8) if train_aug else None)
        if image_size and transform is None:
            tf = Then(ResizeTensor(image_size), tf) if tf is not None else ResizeTensor(image_size)
        if f"x_{split}" in keys and (split != "train" or "x_val" in keys):  # the file holds this split itself
            return NpzDataset(path, split, tf)
        if split == "test":
            if "x" not in keys:
                raise ValueError(f"{path} has keys {keys}; for split='test' expected 'x_test'/'y_test' or 'x'/'y'")
            return NpzDataset(path, None, tf)
        base = NpzDataset(path, "train" if "x_train" in keys else None, tf)
        return _held_out(base, split, 0.1 if val_size is None else val_size, val_seed, None, base.num_classes, name,
                         from_labels=base.num_classes_from_labels)

    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASET_NAMES)}")


def record_source(name: str) -> Tuple[Optional[str], str]:
    """``("hfds" | "wds", reference)`` for a record-based source (``hfds:<ref>``, or timm's ``hfds/<ref>``), else
    ``(None, name)``."""
    for prefix in RECORD_SOURCES:
        for sep in (":", "/"):
            if name.startswith(prefix + sep) and len(name) > len(prefix) + 1:
                return prefix, name[len(prefix) + 1:]
    return None, name


def _hf_split(ref: str, name: str, split: str, tf: Callable, download: bool, root, val_size, val_seed,
              image_key: Optional[str] = None, label_key: Optional[str] = None, num_classes=None) -> Dataset:
    """One split of a Hugging Face dataset (the split rule: :mod:`casify.data.hf_dataset`)."""
    from .hf_dataset import ALL, has_labels, hf_image_dataset, hf_splits
    parts = hf_splits(ref, download=download, root=root)
    make = lambda part: hf_image_dataset(parts[part], name, tf, image_key, label_key)  # noqa: E731
    val_part = next((p for p in ("validation", "val") if p in parts), None)
    labelled_test = "test" in parts and has_labels(parts["test"], label_key, name)
    if split == "test":
        if labelled_test:
            return make("test")
        if val_part is not None:  # ImageNet: the official validation set is everyone's test set
            return make(val_part)
        if ALL in parts:
            return make(ALL)
        raise ValueError(f"{name} has splits {sorted(parts)}: none is a labelled test or validation split")
    if labelled_test and val_part is not None:
        return make("train" if split == "train" else val_part)
    train_part = "train" if "train" in parts else ALL if ALL in parts else None
    if train_part is None:
        raise ValueError(f"{name} has splits {sorted(parts)}; expected a 'train' split")
    base = make(train_part)
    return _held_out(base, split, 0.1 if val_size is None else val_size, val_seed, 0, base.num_classes, name)


def _existing(path: Path, root: Path) -> Path:
    if not path.is_dir():
        subs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"no folder {path}; {root} holds {subs or 'nothing'} "
                                "(expected train/ and val/ or test/,"
                                " each with one sub-folder per class)")
    return path


def _held_out(base: Dataset, split: str, val_size, seed, default_seed, num_classes: int, name: str,
              from_labels: bool = False) -> Dataset:
    """The "train" or "val" part of ``base`` after holding out ``val_size`` items."""
    seed = default_seed if seed == "default" else seed
    if not val_size:
        if split == "val":
            raise ValueError(f"{name} has no validation split and val_size=0 holds none out; pass val_size=")
        return base
    train, val = train_val_split(base, val_size, seed)
    return _with_classes(train if split == "train" else val, num_classes, from_labels)


def _with_classes(ds: Dataset, num_classes: int, from_labels: bool = False) -> Dataset:
    ds.num_classes = num_classes
    ds.num_classes_from_labels = from_labels
    return ds
