"""Check, before Accelerate loads it, that a sharded (FSDP) checkpoint holds data only.

Why: an FSDP resume goes through ``torch.distributed.checkpoint`` (DCP), which reads each ``.metadata`` file with a
plain ``pickle.load`` and every non-tensor item (an optimizer's ``param_groups``, say) with a full ``torch.load``
(weights_only off). The checkpoint manifest catches a file changed since it was written, but someone
who also rewrites the manifest could run code on resume. So every ``.metadata`` is read first with an unpickler that
builds only DCP's own metadata records, torch's sizes and dtypes and plain containers, and every non-tensor item is
read with ``torch.load(weights_only=True)`` (tensor items too); anything else refuses the checkpoint. DCP and Accelerate are then used
unchanged. No library offers this check (DCP's reader has no safe mode), hence it is written here.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, List

import torch

from .config import RunFolderError

METADATA_SUFFIX = ".metadata"
# what a DCP metadata file may build: its own records (dataclasses and enums), torch's sizes, dtypes, layouts and
# memory formats, paths, and plain containers
SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
                 "bool", "slice", "NoneType"}
DCP_MODULE = "torch.distributed.checkpoint."


class ShardedCheckpointError(RunFolderError):
    """A sharded checkpoint whose metadata or non-tensor items would need code to load."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "_codecs" and name == "encode":  # how protocol 2 pickles bytes
            return super().find_class(module, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch.serialization" and name == "_get_layout":  # a layout by its name
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath"):  # the metadata's checkpoint id
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        if module.startswith(DCP_MODULE) and "." not in name:  # a dotted name could reach into any module
            found = super().find_class(module, name)
            import dataclasses
            import enum
            if (isinstance(found, type) and found.__module__.startswith(DCP_MODULE)
                    and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata record")


def read_metadata(path: Path):
    """A DCP ``.metadata`` file, unpickled with :class:`_MetadataUnpickler`; refused with the file named."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, TypeError, ValueError) as e:
        raise ShardedCheckpointError(f"{path} is not a plain checkpoint metadata file ({' '.join(str(e).split())[:160]}"
                                     "); casify does not run code from a run folder") from None


def _stored_items(metadata, folder: Path) -> List[tuple]:
    """``(name, file, offset, length)`` of every item the metadata lists, tensors and non-tensors alike (an older
    torch read tensor items with a full unpickler too)."""
    out = []
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        if getattr(info, "transform_descriptors", None):  # compressed or otherwise transformed: not checkable
            raise ShardedCheckpointError(f"{folder}: item {index.fqn} is stored transformed "
                                         f"({info.transform_descriptors}); casify reads plain checkpoints only")
        out.append((index.fqn, folder / info.relative_path, int(info.offset), int(info.length)))
    return out


def verify_sharded_checkpoint(folder: Path) -> int:
    """Refuse ``folder`` (:class:`ShardedCheckpointError`) unless every ``.metadata`` file under it reads as plain
    metadata and every item it lists loads with ``weights_only=True``; returns how many metadata files were
    checked."""
    checked = 0
    for path in sorted(Path(folder).rglob(f"*{METADATA_SUFFIX}")):
        metadata = read_metadata(path)
        checked += 1
        for name, file, offset, length in _stored_items(metadata, path.parent):
            if not file.is_file() or file.resolve().parent != path.parent.resolve():
                raise ShardedCheckpointError(f"{path} lists {name} in {file.name}, which is not in its folder")
            with open(file, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:  # any failure: the item is not plain data
                raise ShardedCheckpointError(f"{file} holds {name}, which needs code to load "
                                             f"({' '.join(str(e).split())[:160]}); casify does not run code from a "
                                             "run folder") from None
    return checked


__all__ = ["ShardedCheckpointError", "read_metadata", "verify_sharded_checkpoint"]
