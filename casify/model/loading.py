"""Loading wrapped models from a folder or a Hub repo (``config.json`` + ``model.safetensors``), and the one import
for saving and publishing too.

Nothing is ever unpickled: weights are safetensors, the config is JSON, and the architecture is rebuilt from its name
(timm or torchvision) or from a model the caller passes, then wrapped with the saved :class:`~casify.core.config.DefenseConfig`
through the same ``casify.wrap`` a fresh model goes through. From the Hub, ``huggingface_hub.snapshot_download``
fetches ``config.json`` alone, then, once it was checked, ``model.safetensors`` of the same commit; nothing else in
the repo. Writing lives below the model class (:mod:`casify.io.serialization`, :mod:`casify.io.publish`) and is re-exported
here (``save_pretrained``, ``push_to_hub``, ``write_hub_folder``, ``upload_patterns``, ``model_config``,
``sha256_file``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.config import SavedConfig, read_saved_config
from ..core.config_validation import FORMAT, LoadError, read_config, validate_config  # noqa: F401  (re-exported)
from .defended import DefendedModel
from ..io.publish import UPLOAD_FILES, UPLOAD_SUFFIXES, push_to_hub, upload_patterns, write_hub_folder  # noqa: F401
from ..io.serialization import (CONFIG_NAME, WEIGHTS_NAME, atomic_write, model_config, save_pretrained,  # noqa: F401
                            sha256_file, verify_weights)
from ..core.spec import build_base, infer_base_spec  # noqa: F401  (re-exported)
from .surgery import wrap

__all__ = ["from_pretrained", "load_config", "verify_weights", "save_pretrained", "push_to_hub", "write_hub_folder",
           "upload_patterns", "model_config", "sha256_file", "LoadError", "CONFIG_NAME", "WEIGHTS_NAME"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _not_on_disk(text: str, given_path: bool) -> Optional[str]:
    """The error for a name that does not exist locally and must have been meant as a local path, or None when it
    may be a Hub repo id. A typo in a folder name should fail at once, not after the Hub client's retries."""
    if _REPO_ID.fullmatch(text) is None:  # paths: '.', '/', '~', backslashes, more than one '/'
        return f"no folder at {text!r}: it is neither a local folder nor a Hub repo id of the form 'user/name'"
    if given_path:
        return f"no folder at {text!r}; if you meant the Hub repo {text!r}, pass it as a string, not a path object"
    first = text.split("/", 1)[0]
    if Path(first).is_dir():
        return (f"no folder at {text!r} (the local folder {first!r} has nothing named {text.split('/', 1)[1]!r}); if "
                f"you meant the Hub repo {text!r}, the local folder {first!r} makes the name a path: pass "
                f"huggingface_hub.snapshot_download({text!r}, allow_patterns=['config.json', 'model.safetensors'])")
    return None


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub_snapshot(repo_id: str, filename: str, revision: Optional[str], token) -> Path:
    """The local snapshot folder of ``repo_id`` holding ``filename``, fetched with ``huggingface_hub.snapshot_download``
    restricted to that one file (``allow_patterns``): nothing else in the repo is downloaded. Offline
    (``HF_HUB_OFFLINE``) only the local Hub cache is read."""
    from huggingface_hub import snapshot_download
    offline = _hub_offline()
    note = " (HF_HUB_OFFLINE is set, so only the local Hub cache was searched)" if offline else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=[filename],
                                        local_files_only=offline))
    except Exception as e:  # any hub failure: network, missing repo or revision, offline cache miss
        raise LoadError(f"no local folder {repo_id!r}, and the Hub repo {repo_id!r} could not be read{note}: "
                        f"{type(e).__name__}: {e}") from e
    if not (folder / filename).is_file():  # snapshot_download skips a pattern that matches nothing in the repo
        at = f" at revision {revision!r}" if revision else ""
        if offline:
            raise LoadError(f"no local folder {repo_id!r}, and the local Hub cache of {repo_id!r}{at} has no "
                            f"{filename}{note}")
        raise LoadError(f"no local folder {repo_id!r}, and the Hub repo {repo_id!r}{at} has no {filename}; is it a "
                        "repo written by casify's push_to_hub?")
    return folder


def _pinned(folder: Path, revision: Optional[str]) -> Optional[str]:
    """The commit a Hub cache snapshot folder holds (its name), so the weights come from the commit the config was
    read from even if the branch moves in between; else ``revision`` as given."""
    return folder.name if _COMMIT.fullmatch(folder.name) else revision


def _resolve_folder(path_or_repo: Union[str, os.PathLike], revision: Optional[str],
                    token=None) -> Tuple[Path, Optional[str]]:
    """The local folder holding ``config.json`` and the Hub repo id it came from (None for a local folder).

    From the Hub only ``config.json`` is fetched here: the weights are downloaded after the config was checked.
    """
    text = os.fspath(path_or_repo)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return path, None
    if path.exists():
        raise LoadError(f"{path} is a file; pass the folder written by save_pretrained")
    error = _not_on_disk(text, given_path=not isinstance(path_or_repo, str))
    if error is not None:
        raise LoadError(error)
    return _hub_snapshot(text, CONFIG_NAME, revision, token), text


def check_inside(folder: Path, path: Path) -> None:
    """Refuse a file of a model folder that is a symbolic link to somewhere outside it: loading ``folder`` reads what
    is in ``folder``, not a file elsewhere that a link planted there names. In a Hub cache snapshot
    (``models--user--name/snapshots/<commit>``) the files are links into the repo's ``blobs/``, which is inside."""
    if not path.is_symlink():
        return
    root = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        root = folder.parent.parent.resolve()
    target = path.resolve()
    if root != target and root not in target.parents:
        raise LoadError(f"{path} is a symbolic link to {target}, outside the model folder {folder}: casify reads "
                        "only the files inside a model folder; copy the file into it instead of linking")


def _config_file(folder: Path) -> Path:
    """The folder's ``config.json``, refused when absent or a link to outside the folder."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise LoadError(f"{folder} has no {CONFIG_NAME}; is it a folder written by casify's save_pretrained?")
    check_inside(folder, config_file)
    return config_file


def load_config(path_or_repo, revision: Optional[str] = None, token=None) -> dict:
    """The checked config of a saved folder or Hub repo (see :func:`casify.core.config_validation.validate_config`)."""
    folder, _ = _resolve_folder(path_or_repo, revision, token)
    return read_config(_config_file(folder))


def _weights_file(folder: Path, repo_id: Optional[str], revision: Optional[str], token) -> Path:
    """The folder's ``model.safetensors``; from the Hub, fetched only now that the config was checked, and of the
    same snapshot (commit) as the config."""
    if repo_id is not None:
        weights = _hub_snapshot(repo_id, WEIGHTS_NAME, _pinned(folder, revision), token) / WEIGHTS_NAME
    else:
        weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise LoadError(f"{folder} has no {WEIGHTS_NAME}")
    check_inside(weights.parent, weights)
    return weights


def _saved_shapes(weights: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading the tensors."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise LoadError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _mismatch(expected: Dict[str, tuple], saved: Dict[str, tuple], unexpected: bool = True) -> List[str]:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected)) if unexpected else []
    shapes = sorted(k for k in set(expected) & set(saved) if tuple(expected[k]) != tuple(saved[k]))
    detail = []
    if missing:
        detail.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        detail.append(f"unexpected keys {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    if shapes:
        detail.append("shape mismatches " + ", ".join(
            f"{k}: saved {tuple(saved[k])} vs model {tuple(expected[k])}" for k in shapes[:5]))
    return detail


def _mismatch_error(weights: Path, detail: List[str]) -> LoadError:
    return LoadError(f"{weights} does not match the architecture in {CONFIG_NAME} ({'; '.join(detail)}). "
                     "Was the folder written by another model, or is model= not the saved architecture?")


def _shapes(tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


class _CannotBuild(LoadError):
    """The architecture a checked spec names failed to build (a spec the library refuses is a plain LoadError)."""


def _build_base(spec: dict) -> nn.Module:
    """The freshly initialised base a checked spec names, on the current device (meta for :func:`check_weights_fit`,
    which passes over an architecture that cannot be built there)."""
    if spec["source"] == "custom":
        return build_base(spec)  # raises ValueError: build it yourself and pass it as model=
    try:
        return build_base(spec)
    except LoadError:
        raise
    except Exception as e:  # e.g. a WideResNet depth that is not 6n + 4
        raise _CannotBuild(f"could not build {spec['source']} model {spec['name']!r} with {spec['kwargs']}: "
                           f"{type(e).__name__}: {e}") from e


def check_weights_fit(saved: SavedConfig, weights: Path, trace_kwargs: dict) -> None:
    """Refuse a config whose sizes disagree with the weights file before anything is allocated.

    The base is built and wrapped on the meta device (shapes, no memory) and compared with the tensor shapes in the
    safetensors header, so the file on disk bounds what is then built for real. An architecture that cannot be built
    or traced on meta skips the comparison; its kwargs are still bounded and the strict check after loading holds.
    """
    on_disk = _saved_shapes(weights)
    for key, shape in on_disk.items():
        if key.startswith("cas_modules.") and key.endswith(".classifier.weight") and shape[:1] != (saved.num_classes,):
            raise _mismatch_error(weights, [f"{key}: saved {shape} vs cas.num_classes = {saved.num_classes}"])
    try:
        with torch.device("meta"):
            meta = _build_base(saved.base_spec)
    except _CannotBuild:
        return
    detail = _mismatch(_shapes(meta.state_dict()), on_disk, unexpected=False)
    if detail:
        raise _mismatch_error(weights, detail)
    try:
        meta = wrap(meta, saved.config, **trace_kwargs)  # parameters on meta: CAS modules and the dummy input go there too
    except Exception:
        return  # the real wrap reports its own error
    detail = _mismatch(_shapes(meta.state_dict()), on_disk)
    if detail:
        raise _mismatch_error(weights, detail)


def _load_weights(wrapped: DefendedModel, weights: Path, saved_dtype: Optional[str], map_location) -> DefendedModel:
    """``wrapped`` holding the file's tensors, strictly: the same names and shapes, and no silent cast."""
    state = load_file(str(weights), device=str(map_location))
    detail = _mismatch(_shapes(wrapped.state_dict()), _shapes(state))
    if detail:
        raise _mismatch_error(weights, detail)
    if saved_dtype is not None:
        _check_file_dtype(weights, state, saved_dtype)
        wrapped = wrapped.to(getattr(torch, saved_dtype))  # the model is built in the dtype it was saved in
    _check_dtypes(weights, wrapped.state_dict(), state)
    wrapped.load_state_dict(state, strict=True)
    return wrapped


def from_pretrained(path_or_repo: Union[str, os.PathLike], model: Optional[nn.Module] = None, *,
                    revision: Optional[str] = None, token=None, map_location="cpu", leaf_modules: Sequence[type] = (),
                    autowrap_functions: Sequence = ()) -> DefendedModel:
    """Rebuild a wrapped model from a folder (offline) or a Hub repo id and load its weights strictly.

    ``model`` is the original (un-wrapped) architecture, needed only when the base is not a timm or torchvision model.
    The config is checked before anything is downloaded or built (see :mod:`casify.core.config_validation`), the weights
    against the SHA-256 recorded at save time, and the architecture's shapes against the weights before it is built.
    """
    folder, repo_id = _resolve_folder(path_or_repo, revision, token)
    # The same path as a fresh wrap: the saved DefenseConfig, resolved names only. Fields that describe the file
    # (format, weights_sha256) stay behind; metrics, training and other saved fields come along as inert data.
    saved = read_saved_config(_config_file(folder))
    weights = _weights_file(folder, repo_id, revision, token)
    verify_weights(weights, saved.checked)
    if isinstance(model, DefendedModel):
        raise TypeError("pass the original (un-wrapped) architecture as model=, not a wrapped one")
    trace_kwargs = dict(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    if model is None:
        if saved.base_spec["source"] != "custom":
            check_weights_fit(saved, weights, trace_kwargs)
        model = _build_base(saved.base_spec)
    wrapped = wrap(model, saved.config, **trace_kwargs)
    return _load_weights(wrapped, weights, saved.weights_dtype, map_location)


def _check_file_dtype(weights: Path, state: Dict[str, torch.Tensor], saved_dtype: str) -> None:
    """The floating-point tensors of the file are in the dtype its ``config.json`` records."""
    other = {k: v.dtype for k, v in state.items() if v.is_floating_point() and v.dtype != getattr(torch, saved_dtype)}
    if other:
        key, dtype = next(iter(sorted(other.items())))
        raise LoadError(f"{weights} holds {str(dtype).replace('torch.', '')} tensors (e.g. {key}) but {CONFIG_NAME} "
                        f"says the weights are {saved_dtype}: the file was converted or replaced after it was "
                        "saved; save the model again (save_pretrained) rather than converting the file")


def _check_dtypes(weights: Path, expected: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> None:
    """load_state_dict would cast a tensor of another dtype silently (float16 into float32, int64 into int32)."""
    differ = sorted(k for k in expected if k in state and expected[k].dtype != state[k].dtype)
    if differ:
        k = differ[0]
        raise LoadError(f"{weights} holds {k} as {str(state[k].dtype).replace('torch.', '')} but the model has it as "
                        f"{str(expected[k].dtype).replace('torch.', '')} ({len(differ)} tensor(s) differ): loading "
                        "would cast them silently; save the model again with casify (which records its dtype)")
