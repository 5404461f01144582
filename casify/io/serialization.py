"""Writing a wrapped model to a folder: ``model.safetensors``, then ``config.json`` with the weights' SHA-256.

The core of ``save_pretrained``, below the model class: it reads a wrapped model only through its public surface
(``casify_config``, ``base_model``, ``state_dict()``), so :class:`casify.model.defended.DefendedModel` can own its ``save_pretrained``
method without importing anything above it. Loading lives in :mod:`casify.model.loading`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

from safetensors.torch import save_file
from torch import nn

from ..core.config_validation import FORMAT, LoadError, validate_config
from ..core.spec import infer_base_spec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


TEMP_MARK = ".casify-tmp-"  # in the name of every temporary file atomic_write makes: what a killed write leaves


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` (``.<name>.casify-tmp-<random>``), then rename it onto
    ``path`` (never half-written). A kill mid-write leaves only that sibling, which the next run deletes.

    The file gets the permissions any new file of the user gets (0666 less the umask), not the 0600 of the
    temporary file it was written as."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_wrapped(model) -> bool:
    """Whether ``model`` is a wrapped model (it has a ``casify_config`` and its original as ``base_model``)."""
    return isinstance(model, nn.Module) and isinstance(model.__dict__.get("casify_config"), dict) \
        and isinstance(getattr(model, "base_model", None), nn.Module)


def model_config(model: nn.Module) -> dict:
    """The JSON-able description of ``model``: base model spec, CAS layers and settings, normalisation, classes."""
    config = json.loads(json.dumps(model.casify_config))
    if config.get("base_model") is None:
        config["base_model"] = infer_base_spec(model.base_model)
        model.casify_config["base_model"] = config["base_model"]
    config["format"] = FORMAT
    return config


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], metrics: Optional[dict] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` (every state-dict tensor, contiguous, on CPU), then ``config.json`` with the
    weights' SHA-256, each atomically.

    The config is checked as :func:`casify.from_pretrained` will check it before anything is written, so a folder
    that saves is a folder that loads.
    """
    if not is_wrapped(model):
        raise TypeError(f"save_pretrained expects a model from casify.wrap, got {type(model).__name__}")
    out = Path(save_directory)
    config = model_config(model)
    if metrics is not None:
        config["metrics"] = metrics
    if extra:
        config.update(extra)
    config.pop("weights_sha256", None)
    config.pop("weights_dtype", None)  # recorded below from the tensors written
    try:
        validate_config(json.loads(json.dumps(config)), "the config being saved")
    except LoadError as e:
        raise ValueError(f"{e}. from_pretrained would refuse this folder, so nothing was written") from None
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Tied weights share storage; safetensors refuses shared tensors, so store independent copies.
    seen = {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if ptr is not None and ptr in seen:
            state[k] = v.clone()
        seen[ptr] = k
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # what from_pretrained builds the model in, and checks the file against
        config["weights_dtype"] = dtypes.pop()
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    # Written after the weights, so the checksum describes the file that is there.
    config["weights_sha256"] = sha256_file(out / WEIGHTS_NAME)
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def verify_weights(weights: Path, config: dict) -> None:
    """Refuse a weights file whose SHA-256 differs from the one saved in the config (folders saved before casify
    recorded it have none and are not checked)."""
    expected = config.get("weights_sha256")
    if expected is None:
        return
    actual = sha256_file(weights)
    if actual != expected:
        raise LoadError(f"{weights} was modified or corrupted after it was saved: its SHA-256 is {actual}, but "
                        f"{CONFIG_NAME} records {expected}. Download or copy the folder again, or re-save the model")
