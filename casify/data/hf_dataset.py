"""Hugging Face ``datasets`` as a data source: ``hfds:<Hub id or folder>`` in a recipe's ``data.name`` (or
``data.test``).

A folder is one written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``); a
Hub id (``ILSVRC/imagenet-1k``) is fetched by ``load_dataset`` into datasets' own cache, only with ``data.download:
true`` (nothing is downloaded unless asked, as for torchvision's datasets). Either way the records are an Arrow table
read by position (a map-style dataset, not the streaming reader), so a run resumes exactly and each item's augmentation
is seeded from its index (:class:`casify.data.EpochSeededDataset`).

Splits: a labelled ``test`` split is the test set, ``validation`` (or ``val``) then selects checkpoints; without a
labelled ``test`` (ImageNet's has no labels), ``validation`` is the test set, as for an ImageNet image folder, and the
held-out split comes out of ``train``. A folder holding one split (a ``Dataset``) is split like a single-split .npz."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

from .image_records import IMAGE_KEYS, LABEL_KEYS, RecordImageDataset, pick_key, require

EXTRA = "hf"
ALL = "all"  # the key of a folder's single split


def hf_splits(ref: str, download: bool = False, root=None) -> Dict[str, object]:
    """The named splits of a saved folder or Hub dataset (``{"all": dataset}`` for a folder holding one split)."""
    source = f"hfds:{ref}"
    datasets = require("datasets", EXTRA, source)
    folder = Path(ref).expanduser()
    if folder.is_dir():
        loaded = datasets.load_from_disk(str(folder))
    elif ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise FileNotFoundError(f"{source}: no folder {folder} (a folder written by save_to_disk, or a Hub id such "
                                "as ILSVRC/imagenet-1k)")
    elif not download:
        raise FileNotFoundError(f"{source}: not a local folder; to fetch the Hub dataset {ref!r} (or reuse the copy "
                                "in datasets' cache) set data.download: true")
    else:
        loaded = datasets.load_dataset(ref, cache_dir=None if root is None else str(Path(root).expanduser()))
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    if isinstance(loaded, datasets.Dataset):
        return {ALL: loaded}
    raise ValueError(f"{source}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")


def hf_image_dataset(table, source: str, transform: Optional[Callable] = None, image_key: Optional[str] = None,
                     label_key: Optional[str] = None) -> RecordImageDataset:
    """``(image, label)`` items of one split; the image and label columns are found by their usual names unless
    given."""
    image_key = pick_key(table.column_names, image_key, IMAGE_KEYS, "image", source)
    label_key = pick_key(table.column_names, label_key, LABEL_KEYS, "label", source)
    feature = table.features[label_key]
    num_classes = getattr(feature, "num_classes", None)
    if num_classes is None and len(table):
        num_classes = 1 + int(max(table[label_key]))
    return RecordImageDataset(table, image_key, label_key, transform, num_classes, source)


def has_labels(table, label_key: Optional[str], source: str) -> bool:
    """Whether a split is labelled (ImageNet's test split on the Hub holds -1 for every label)."""
    key = pick_key(table.column_names, label_key, LABEL_KEYS, "label", source)
    return len(table) > 0 and min(table[key]) >= 0


__all__ = ["hf_image_dataset", "hf_splits", "has_labels"]
