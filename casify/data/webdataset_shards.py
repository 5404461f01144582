"""WebDataset tar shards as a map-style dataset: ``wds:<pattern>`` in a recipe's ``data.name`` (or ``data.test``).

A shard is a plain tar whose members are grouped into records by their name up to the first dot
(``n01440764_10026.jpg`` + ``n01440764_10026.cls``): WebDataset's convention, which ImageNet's shards on the Hub
(``timm/imagenet-1k-wds``) follow. The pattern is brace-expanded (``train-{0000..1023}.tar``, WebDataset's notation)
and globbed (``train-*.tar``); a pattern that matches no file is an error.

Why not WebDataset's streaming pipeline: it reads shards in order (an iterable dataset), so the data order would depend
on shard shuffling, workers and prefetching and a run could not resume exactly, nor seed each item's augmentation from
its index. Each shard is instead indexed once (``wids``, WebDataset's indexed reader: it maps the tar and reads its
headers) and its records are read by position, so item ``i`` is always the same image."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .image_records import IMAGE_KEYS, LABEL_KEYS, RecordImageDataset, decode_label, pick_key, require

EXTRA = "wds"


def shard_paths(pattern: str) -> List[str]:
    """The shard files a pattern names, in sorted order (braces expanded, then globs); an error if none."""
    braceexpand = require("braceexpand", EXTRA, f"wds:{pattern}")
    paths = []
    for part in braceexpand.braceexpand(str(Path(pattern).expanduser())):
        paths += sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if Path(part).is_file() else [])
    paths = sorted(dict.fromkeys(paths))
    if not paths:
        raise FileNotFoundError(f"wds:{pattern} matches no shard file; give the tar files as a brace pattern "
                                "(/data/imagenet-wds/imagenet1k-train-{0000..1023}.tar) or a glob (.../*-train-*.tar)")
    return paths


class TarShardRecords:
    """Random access to the records of several shards: ``records[i]`` is ``{extension: bytes, ...}``.

    The shards are indexed when this is made (their record counts and labels are needed up front); each process
    opens a shard again on first use (a DataLoader worker receives this object pickled, without open files)."""

    def __init__(self, paths: List[str], source: str):
        self.paths, self.source = list(paths), source
        self._open = {}
        lengths = []
        for k in range(len(self.paths)):
            lengths.append(len(self._shard(k)))
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def _shard(self, k: int):
        if k not in self._open:
            wids = require("wids.wids", EXTRA, self.source)
            self._open[k] = wids.IndexedTarSamples(path=self.paths[k])
        return self._open[k]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fields(self) -> List[str]:
        return sorted(self[0]) if len(self) else []

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        record = self._shard(k)[int(index - self.starts[k])]
        return {key.lstrip("."): value for key, value in record.items() if not key.startswith("__")}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}


def tar_shard_dataset(pattern: str, transform: Optional[Callable] = None, image_key: Optional[str] = None,
                      label_key: Optional[str] = None, num_classes: Optional[int] = None) -> RecordImageDataset:
    """The images and labels of the shards ``pattern`` names (see the module doc). ``num_classes`` is recorded on the
    dataset when given (finding it would read every record's label)."""
    source = f"wds:{pattern}"
    records = TarShardRecords(shard_paths(pattern), source)
    if not len(records):
        raise ValueError(f"{source}: the shards hold no records")
    fields = records.fields()
    image_key = pick_key(fields, image_key, IMAGE_KEYS, "image", source)
    label_key = pick_key(fields, label_key, LABEL_KEYS + ("json",), "label", source)
    decode_label(records[0][label_key])  # a label field that holds no class index fails here, not in a worker
    return RecordImageDataset(records, image_key, label_key, transform, num_classes, source)


__all__ = ["TarShardRecords", "shard_paths", "tar_shard_dataset"]
