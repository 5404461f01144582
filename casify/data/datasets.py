"""The dataset classes and the sources casify reads directly: tensors in memory, ``.npz`` files, the embedded digits,
torchvision's CIFAR / SVHN, image folders, and a seeded train / validation split."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .transforms import Then, ToImageTensor, imagenet_eval_transform, to_image_tensor

DATA_ENV = "CASIFY_DATA"
SPLITS = ("train", "val", "test")


def data_root(root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where named datasets live: ``root`` if given, else ``$CASIFY_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get(DATA_ENV, "data")).expanduser()


# ----------------------------------------------------------------------------------------------------------- transforms


class TensorImageDataset(Dataset):
    """Images already in memory (uint8 NHWC/NHW arrays or float NCHW tensors) with integer labels."""

    def __init__(self, images, labels, transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None):
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images, self.labels, self.transform = images, np.asarray(labels).astype(np.int64), transform
        self.num_classes = len(classes) if classes is not None else int(self.labels.max()) + 1 if len(self.labels) else 0
        # without class names the count is only the largest label + 1 (a 1-image file would read "6 classes"):
        # a guess that the model's class count overrides (casify.data.data_fit), never a statement to hold it to
        self.num_classes_from_labels = classes is None
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = to_image_tensor(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


class EpochSeededDataset(Dataset):
    """Draws each item's augmentation randomness from a seed of (seed, epoch, index), never from a shared RNG stream.

    Why: a data loader prefetches batches (and worker processes draw from their own RNGs), so augmentation that reads
    the global RNG makes a run depend on when batches were fetched; a checkpoint then cannot capture where the data
    stream is and a resumed run diverges. Seeding per item makes item ``i`` of epoch ``e`` the same image whatever the
    number of workers, the prefetching, or a crash in between. torch's CPU generator is seeded for the item and
    restored afterwards (dropout and attack starts keep their own stream); Python's ``random`` and NumPy's global RNG
    are reseeded per item, as a DataLoader worker reseeds them, and not restored (restoring NumPy's state costs more
    than a small image's augmentation). Call :meth:`set_epoch` before iterating an epoch (the Trainer does).
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0
        self.num_classes = getattr(dataset, "num_classes", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_seed(self, index: int) -> int:
        """A 63-bit seed, well mixed from (seed, epoch, index): splitmix64 steps (written out: a few integer operations
        are ~10x cheaper per item than numpy's SeedSequence)."""
        z = 0
        for part in (self.seed, self.epoch, int(index)):
            z = (z ^ (part & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
            z ^= z >> 31
        return z >> 1

    def __getitem__(self, index: int):
        seed = self.item_seed(index)
        generator = torch.default_generator  # the CPU generator only: CUDA's stream is left alone
        state = generator.get_state()
        generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


_MASK64 = (1 << 64) - 1


class NpzDataset(TensorImageDataset):
    """Images from an ``.npz`` file: ``x`` (uint8 NHWC, or NHW for grayscale) and ``y``.

    Files holding several splits (MNIST's ``x_train``/``y_train``/``x_test``/``y_test``) are read with
    ``split="train"`` or ``split="test"``. ``indices`` keeps only those rows (e.g. a held-out part).
    """

    def __init__(self, path: Union[str, os.PathLike], split: Optional[str] = None,
                 transform: Optional[Callable] = None, indices: Optional[Sequence[int]] = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no .npz file at {path}")
        with np.load(path, allow_pickle=False) as data:
            keys = sorted(data.files)
            xk, yk = ("x", "y") if split is None else (f"x_{split}", f"y_{split}")
            if xk not in keys or yk not in keys:
                if split is None and any(k.startswith("x_") for k in keys):
                    hint = "; this file holds several splits: pass split=" + " or ".join(
                        repr(k[2:]) for k in keys if k.startswith("x_"))
                else:
                    hint = ""
                raise ValueError(f"{path} has keys {keys}; expected {xk!r} and {yk!r} (images uint8 NHWC or NHW, "
                               f"integer labels){hint}")
            x, y = data[xk], data[yk]
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise ValueError(f"{path}[{xk!r}] has shape {x.shape}; expected NHWC with 1 or 3 channels, or NHW")
        if x.dtype != np.uint8:
            raise ValueError(f"{path}[{xk!r}] has dtype {x.dtype}; expected uint8 pixels 0..255")
        if len(x) != len(y):
            raise ValueError(f"{path}: {xk!r} has {len(x)} images but {yk!r} has {len(y)} labels")
        if indices is not None:
            idx = np.asarray(indices, dtype=np.int64)
            x, y = x[idx], y[idx]
        self.path, self.split = path, split
        super().__init__(x, y, transform)


def _digits_split_indices(labels: np.ndarray, seed: int) -> dict:
    """Per class, shuffle with ``seed`` and take round(20 %) for test, round(10 %) for val, the rest for train."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = int(round(0.2 * len(idx))), int(round(0.1 * len(idx)))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def digits_dataset(split: str = "train", size: int = 16, channels: int = 3, transform: Optional[Callable] = None,
                   seed: int = 0) -> TensorImageDataset:
    """scikit-learn's handwritten digits (1797 real 8x8 images, 16 grey levels), shipped with sklearn: no network.

    Pixels are scaled to [0, 1] (value / 16) and bilinearly upsampled to ``size`` x ``size``; ``channels=3`` repeats
    the grey channel so RGB models take it. The split is stratified and fixed by ``seed``: per class, 20 % test,
    10 % val, the rest train, which for seed 0 gives 1259 / 179 / 359 images.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    from sklearn.datasets import load_digits
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    idx = _digits_split_indices(labels, seed)[split]
    x = torch.from_numpy(digits.images[idx].astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return TensorImageDataset(x, labels[idx], transform)


# ------------------------------------------------------------------------------------------------ torchvision datasets

TORCHVISION_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}


def torchvision_dataset(name: str, split: str = "train", root=None, download: bool = False,
                        transform: Optional[Callable] = None) -> Dataset:
    """CIFAR-10, CIFAR-100 or SVHN from torchvision, as [0, 1] tensors (``transform`` then runs on the tensor).

    Nothing is downloaded unless ``download=True``: missing files raise an error saying so.
    ``split`` is "train" or "test" (SVHN also "extra"); hold out validation data with :func:`train_val_split`.
    """
    import torchvision.datasets as tvd
    if name not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision dataset {name!r}; choose one of {sorted(TORCHVISION_DATASETS)}")
    allowed = ("train", "test", "extra") if name == "svhn" else ("train", "test")
    if split not in allowed:
        raise ValueError(f"{name} has splits {allowed}, got {split!r}")
    root = data_root(root) / name
    pipeline = ToImageTensor() if transform is None else Then(ToImageTensor(), transform)
    cls = getattr(tvd, TORCHVISION_DATASETS[name])
    kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
    if download:
        root.mkdir(parents=True, exist_ok=True)
    try:
        ds = cls(str(root), download=download, transform=pipeline, **kwargs)
    except RuntimeError as exc:
        if download:
            raise
        raise FileNotFoundError(f"{name} ({split}) is not under {root}: point to where it is with --data-root DIR "
                                f"on the command line (root= in Python, or ${DATA_ENV}), or fetch it once on a "
                                f"machine with network access: casify.data.torchvision_dataset({name!r}, "
                                "download=True)") from exc
    ds.num_classes = len(ds.classes) if hasattr(ds, "classes") else 10
    return ds


def imagefolder_dataset(root, transform: Optional[Callable] = None) -> Dataset:
    """A torchvision ImageFolder (``root/<class>/<image>``, the ImageNet layout) yielding [0, 1] tensors.

    Images differ in size, so pass a transform that fixes it (``imagenet_eval_transform()`` by default); the
    transform sees PIL images and must end in a tensor (the ImageNet transforms here do).
    """
    from torchvision.datasets import ImageFolder
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    ds = ImageFolder(str(root), transform=transform if transform is not None else imagenet_eval_transform())
    ds.num_classes = len(ds.classes)
    return ds


# -------------------------------------------------------------------------------------------------------------- splits

def train_val_split(dataset: Dataset, val_size: Union[int, float], seed: Optional[int] = 0) -> Tuple[Subset, Subset]:
    """Split ``dataset`` into (train, val) Subsets, deterministically. Select checkpoints on val, never on the test set.

    Args:
        val_size: number of validation items, or a fraction in (0, 1).
        seed: a seeded random choice of the validation items; None takes the *last* ``val_size`` items in order,
            the CIFAR-10 convention (its official training order is already shuffled). Use a seed for datasets stored
            in class order, such as ImageFolder.
    """
    n = len(dataset)
    k = int(round(val_size * n)) if isinstance(val_size, float) and 0 < val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise ValueError(f"val_size must leave both parts non-empty: got {val_size!r} for {n} items")
    if seed is None:
        order = np.arange(n)
    else:
        order = np.random.default_rng(seed).permutation(n)
    train_idx, val_idx = np.sort(order[: n - k]), np.sort(order[n - k:])
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
