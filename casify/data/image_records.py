"""What the two record-based data sources (:mod:`casify.data.hf_dataset`, :mod:`casify.data.webdataset_shards`) share: the
one-line error for a missing optional library, the image and label decoding of a record, and the image dataset they
both are.

Both are map-style datasets (item ``i`` is always the same record), so :class:`casify.data.EpochSeededDataset` seeds
each item's augmentation from (seed, epoch, index) and a run resumes exactly, as it does on image folders; a streaming
(iterable) reader would make the data order depend on workers and prefetching."""
from __future__ import annotations

import importlib
import io
import json
from typing import Any, Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

DISTRIBUTION = "casify-robust"  # the name on PyPI, which pip installs extras of
IMAGE_KEYS = ("image", "img", "jpg", "jpeg", "png", "webp", "ppm", "bmp")
LABEL_KEYS = ("label", "labels", "cls", "target", "fine_label")


def require(module: str, extra: str, source: str):
    """``import module``, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"data source {source!r} needs the {module!r} library, which is not installed: "
                          f"pip install '{DISTRIBUTION}[{extra}]'") from None


def pick_key(keys: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str, source: str) -> str:
    """The record field that holds the image (or label): ``wanted`` if given and present, else the first of the usual
    names; an error lists the record's fields and how to name one (``data.kwargs``)."""
    keys = list(keys)
    if wanted is not None:
        if wanted not in keys:
            raise ValueError(f"{source}: no field {wanted!r} in its records (fields: {keys}); set data.kwargs."
                             f"{what}_key to one of them")
        return wanted
    for key in candidates:
        if key in keys:
            return key
    raise ValueError(f"{source}: none of its record fields {keys} is a usual {what} field ({list(candidates)}); "
                     f"name it with data.kwargs.{what}_key")


def decode_image(value: Any):
    """A PIL image from what a record holds: a PIL image (``datasets``' Image feature), encoded bytes, or a dict with
    ``bytes`` (an undecoded Image feature)."""
    from PIL import Image
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, io.BytesIO):  # a member of a tar shard (wids)
        value = value.getvalue()
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = Image.open(io.BytesIO(bytes(value)))
    if not isinstance(value, Image.Image):
        raise TypeError(f"cannot read an image from a record field of type {type(value).__name__}")
    return value.convert("RGB") if value.mode != "RGB" else value


def decode_label(value: Any) -> int:
    """An integer class from what a record holds: an int, WebDataset's ``.cls`` text (``b"7"``), or JSON with a
    ``label``."""
    if isinstance(value, io.BytesIO):
        value = value.getvalue()
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8").strip()
        value = json.loads(text) if text.startswith("{") else text
    if isinstance(value, dict):
        value = value.get("label", value.get("cls"))
    if isinstance(value, str):
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"cannot read a class index from {value!r}")
    return int(value)


class RecordImageDataset(Dataset):
    """``(image, label)`` from indexable records: ``records[i]`` is a mapping with an image and a label field.
    ``transform`` runs on the PIL image and must end in a [0, 1] tensor (the ImageNet transforms of
    :mod:`casify.data` do)."""

    def __init__(self, records, image_key: str, label_key: str, transform: Optional[Callable],
                 num_classes: Optional[int], source: str):
        self.records, self.image_key, self.label_key = records, image_key, label_key
        self.transform, self.source = transform, source
        self.num_classes = None if num_classes is None else int(num_classes)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[int(index)]
        image = decode_image(record[self.image_key])
        label = decode_label(record[self.label_key])
        if self.transform is not None:
            image = self.transform(image)
        return image, label


__all__ = ["RecordImageDataset", "decode_image", "decode_label", "pick_key", "require"]
