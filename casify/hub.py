"""Saving, loading and publishing wrapped models: a folder with ``config.json`` and ``model.safetensors``.

Nothing is ever unpickled: weights are safetensors, the config is JSON, and the architecture is rebuilt from its name
(timm or torchvision) or from a model the caller passes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from safetensors.torch import load_file, save_file
from torch import nn

from .model import CASModel
from .spec import build_base, infer_base_spec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "casify"


class LoadError(RuntimeError):
    """A saved model could not be loaded as it was saved."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_config(model: CASModel) -> dict:
    """The JSON-able description of ``model``: base model spec, CAS layers and settings, normalisation, classes."""
    config = json.loads(json.dumps(model.casify_config))
    if config.get("base_model") is None:
        config["base_model"] = infer_base_spec(model.base_model)
        model.casify_config["base_model"] = config["base_model"]
    config["format"] = FORMAT
    return config


def save_pretrained(model: CASModel, save_directory: Union[str, os.PathLike], metrics: Optional[dict] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (every state-dict tensor, contiguous, on CPU) atomically."""
    if not isinstance(model, CASModel):
        raise TypeError(f"save_pretrained expects a model from casify.wrap, got {type(model).__name__}")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    if metrics is not None:
        config["metrics"] = metrics
    if extra:
        config.update(extra)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Tied weights share storage; safetensors refuses shared tensors, so store independent copies.
    seen = {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if ptr is not None and ptr in seen:
            state[k] = v.clone()
        seen[ptr] = k
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _resolve_folder(path_or_repo: Union[str, os.PathLike], revision: Optional[str], token=None) -> Path:
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{path} is a file; pass the folder written by save_pretrained")
    repo_id = str(path_or_repo)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise LoadError(f"{repo_id!r} is neither a local folder nor a Hub repo id of the form 'user/name'")
    from huggingface_hub import hf_hub_download
    config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token)
    hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, token=token)
    return Path(config_path).parent


def load_config(path_or_repo, revision: Optional[str] = None, token=None) -> dict:
    folder = _resolve_folder(path_or_repo, revision, token)
    config_file = folder / CONFIG_NAME
    if not config_file.exists():
        raise LoadError(f"{folder} has no {CONFIG_NAME}; is it a folder written by casify's save_pretrained?")
    config = json.loads(config_file.read_text())
    if config.get("format") != FORMAT:
        raise LoadError(f"{config_file} is not a casify config (format={config.get('format')!r})")
    return config


def from_pretrained(path_or_repo: Union[str, os.PathLike], model: Optional[nn.Module] = None, *,
                    revision: Optional[str] = None, token=None, map_location="cpu", leaf_modules: Sequence[type] = (),
                    autowrap_functions: Sequence = ()) -> CASModel:
    """Rebuild a wrapped model from a folder (offline) or a Hub repo id and load its weights strictly.

    ``model`` is the original (un-wrapped) architecture, needed only when the base is not a timm or torchvision model.
    """
    from .surgery import wrap

    folder = _resolve_folder(path_or_repo, revision, token)
    config = load_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise LoadError(f"{folder} has no {WEIGHTS_NAME}")
    base = model if model is not None else build_base(config["base_model"])
    if isinstance(base, CASModel):
        raise TypeError("pass the original (un-wrapped) architecture as model=, not a wrapped one")
    cas = config["cas"]
    wrapped = wrap(base, cas["layers"], num_classes=cas["num_classes"], init=cas.get("init", "identity"),
                   suppress=cas.get("suppress", True),
                   normalize=config.get("normalize"), input_size=cas.get("input_size"),
                   channel_dims={k: int(v) for k, v in cas.get("channel_dims", {}).items()},
                   leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                   base_spec=config["base_model"], class_names=config.get("class_names"))
    for key in ("metrics", "training"):
        if key in config:
            wrapped.casify_config[key] = config[key]
    state = load_file(str(weights), device=str(map_location))
    expected = wrapped.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        detail = []
        if missing:
            detail.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            detail.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if mismatched:
            detail.append("shape mismatches " + ", ".join(
                f"{k}: saved {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:5]))
        raise LoadError(f"{weights} does not match the architecture in {CONFIG_NAME} ({'; '.join(detail)}). "
                        "Was the folder written by another model, or is model= not the saved architecture?")
    wrapped.load_state_dict(state, strict=True)
    return wrapped


def push_to_hub(model: CASModel, repo_id: str, *, evaluation: Optional[dict] = None, dataset_name: str = "unknown",
                dataset_type: str = "unknown", split: str = "test", private: bool = False, token=None,
                commit_message: str = "Upload robust model trained with casify", folder: Optional[os.PathLike] = None):
    """Save the model with a model card (evaluation results in the ``model-index`` metadata) and upload the folder.

    ``folder``: where to stage the files (kept); by default a temporary directory. Returns the commit info.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(folder) if folder is not None else Path(tmp)
        write_hub_folder(model, staging, repo_id, evaluation=evaluation, dataset_name=dataset_name,
                         dataset_type=dataset_type, split=split)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(staging), commit_message=commit_message)


def write_hub_folder(model: CASModel, folder: Union[str, os.PathLike], model_name: str, *,
                     evaluation: Optional[dict] = None, dataset_name: str = "unknown", dataset_type: str = "unknown",
                     split: str = "test") -> Path:
    """``save_pretrained`` plus ``README.md`` (the model card): exactly the files :func:`push_to_hub` uploads."""
    from .model_card import make_model_card

    folder = Path(folder)
    save_pretrained(model, folder, metrics=evaluation)
    config = load_config(folder)
    card = make_model_card(config, model_name, evaluation, dataset_name, dataset_type, split)
    _atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(str(card)))
    return folder
