"""Datasets and transforms. Every dataset yields ``(image, label)``: a float CHW tensor in [0, 1] and an int.

No normalisation happens here: mean/std live inside the model (``casify.wrap(..., normalize=...)``), so adversarial
eps is always measured in [0, 1] pixel space.

Splits: select checkpoints and tune on a held-out *validation* split, never on the test set. Datasets without a
validation split hold one out of their training set (:func:`train_val_split`); for CIFAR-10 the convention is the
last 5,000 training images.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

__all__ = [
    "DATA_ENV", "DATASET_NAMES", "EpochSeededDataset", "NpzDataset", "TensorImageDataset", "build_dataset", "cifar_train_transform",
    "data_root", "digits_dataset", "imagefolder_dataset", "imagenet_eval_transform", "imagenet_train_transform",
    "dataset_name", "short_name", "to_image_tensor", "torchvision_dataset", "train_val_split",
]

DATA_ENV = "CASIFY_DATA"
DATASET_NAMES = ("digits", "cifar10", "cifar100", "svhn", "imagefolder:<root>", "<path>.npz",
                 "hfds:<Hub id or save_to_disk folder>", "wds:<tar shard pattern>")
RECORD_SOURCES = ("hfds", "wds")  # Hugging Face datasets, WebDataset shards (timm's prefixes; hfds/ and wds/ work too)
RECORD_KWARGS = ("image_key", "label_key", "num_classes")
SPLITS = ("train", "val", "test")


def data_root(root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where named datasets live: ``root`` if given, else ``$CASIFY_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get(DATA_ENV, "data")).expanduser()


# ----------------------------------------------------------------------------------------------------------- transforms

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

class TensorImageDataset(Dataset):
    """Images already in memory (uint8 NHWC/NHW arrays or float NCHW tensors) with integer labels."""

    def __init__(self, images, labels, transform: Optional[Callable] = None, classes: Optional[Sequence[str]] = None):
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images, self.labels, self.transform = images, np.asarray(labels).astype(np.int64), transform
        self.num_classes = len(classes) if classes is not None else int(self.labels.max()) + 1 if len(self.labels) else 0
        # without class names the count is only the largest label + 1 (a 1-image file would read "6 classes"):
        # a guess that the model's class count overrides (casify.data_fit), never a statement to hold it to
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

_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}


def torchvision_dataset(name: str, split: str = "train", root=None, download: bool = False,
                        transform: Optional[Callable] = None) -> Dataset:
    """CIFAR-10, CIFAR-100 or SVHN from torchvision, as [0, 1] tensors (``transform`` then runs on the tensor).

    Nothing is downloaded unless ``download=True``: missing files raise an error saying so.
    ``split`` is "train" or "test" (SVHN also "extra"); hold out validation data with :func:`train_val_split`.
    """
    import torchvision.datasets as tvd
    if name not in _TORCHVISION:
        raise ValueError(f"unknown torchvision dataset {name!r}; choose one of {sorted(_TORCHVISION)}")
    allowed = ("train", "test", "extra") if name == "svhn" else ("train", "test")
    if split not in allowed:
        raise ValueError(f"{name} has splits {allowed}, got {split!r}")
    root = data_root(root) / name
    pipeline = ToImageTensor() if transform is None else _Then(ToImageTensor(), transform)
    cls = getattr(tvd, _TORCHVISION[name])
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


class _Then:
    """Compose two callables (picklable, unlike a lambda)."""

    def __init__(self, first: Callable, second: Callable):
        self.first, self.second = first, second

    def __call__(self, x):
        return self.second(self.first(x))


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


# ------------------------------------------------------------------------------------------------------------- factory

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

    ``"hfds:<Hub id or folder>"`` (:mod:`casify.hf_dataset`: a folder written by ``save_to_disk``, or a Hub dataset
    fetched with ``download=True``) and ``"wds:<shard pattern>"`` (:mod:`casify.webdataset_shards`: tar shards,
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

    if name in _TORCHVISION:
        tf = transform or (cifar_train_transform(image_size or 32, padding=(image_size or 32) // 8) if train_aug else None)
        if image_size and transform is None:
            tf = _Then(ResizeTensor(image_size), tf) if tf is not None else ResizeTensor(image_size)
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
            tf = _Then(ResizeTensor(image_size), tf) if tf is not None else ResizeTensor(image_size)
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
    """One split of a Hugging Face dataset (the split rule: :mod:`casify.hf_dataset`)."""
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
