"""Saving, loading and publishing wrapped models: a folder with ``config.json`` and ``model.safetensors``.

Nothing is ever unpickled: weights are safetensors, the config is JSON, and the architecture is rebuilt from its name
(timm or torchvision) or from a model the caller passes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config_validation import FORMAT, LoadError, read_config, validate_config
from .model import CASModel
from .spec import build_base, infer_base_spec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# What push_to_hub uploads from a folder: the model, its card and evaluation reports, never checkpoints or logs.
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", "eval_report.json", "eval_report.md")
UPLOAD_SUFFIXES = (".png",)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")


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


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_pretrained(model: CASModel, save_directory: Union[str, os.PathLike], metrics: Optional[dict] = None,
                    extra: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` (every state-dict tensor, contiguous, on CPU), then ``config.json`` with the
    weights' SHA-256, each atomically.

    The config is checked as :func:`from_pretrained` will check it before anything is written, so a folder that
    saves is a folder that loads.
    """
    if not isinstance(model, CASModel):
        raise TypeError(f"save_pretrained expects a model from casify.wrap, got {type(model).__name__}")
    out = Path(save_directory)
    config = model_config(model)
    if metrics is not None:
        config["metrics"] = metrics
    if extra:
        config.update(extra)
    config.pop("weights_sha256", None)
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
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    # Written after the weights, so the checksum describes the file that is there.
    config["weights_sha256"] = sha256_file(out / WEIGHTS_NAME)
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


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


def _hub_download(repo_id: str, filename: str, revision: Optional[str], token) -> Path:
    from huggingface_hub import hf_hub_download
    offline = _hub_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, local_files_only=offline))
    except Exception as e:  # any hub failure: network, missing repo or file, offline cache miss
        note = " (HF_HUB_OFFLINE is set, so only the local Hub cache was searched)" if offline else ""
        raise LoadError(f"no local folder {repo_id!r}, and the Hub repo {repo_id!r} could not be read{note}: "
                        f"{type(e).__name__}: {e}") from e


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
    return _hub_download(text, CONFIG_NAME, revision, token).parent, text


def load_config(path_or_repo, revision: Optional[str] = None, token=None) -> dict:
    """The checked config of a saved folder or Hub repo (see :func:`casify.config_validation.validate_config`)."""
    folder, _ = _resolve_folder(path_or_repo, revision, token)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise LoadError(f"{folder} has no {CONFIG_NAME}; is it a folder written by casify's save_pretrained?")
    return read_config(config_file)


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


def _check_sizes_on_meta(spec: dict, config: dict, weights: Path, wrap_kwargs: dict) -> None:
    """Refuse a config whose sizes disagree with the weights file before anything is allocated.

    The base is built and wrapped on the meta device (shapes, no memory) and compared with the tensor shapes in the
    safetensors header, so the file on disk bounds what is then built for real. An architecture that cannot be built
    or traced on meta skips the comparison; its kwargs are still bounded and the strict check after loading holds.
    """
    from .surgery import wrap

    saved = _saved_shapes(weights)
    num_classes = config["cas"]["num_classes"]
    for key, shape in saved.items():
        if key.startswith("cas_modules.") and key.endswith(".classifier.weight") and shape[:1] != (num_classes,):
            raise _mismatch_error(weights, [f"{key}: saved {shape} vs cas.num_classes = {num_classes}"])
    try:
        with torch.device("meta"):
            meta = build_base(spec)
    except LoadError:
        raise
    except Exception:
        return
    detail = _mismatch({k: tuple(v.shape) for k, v in meta.state_dict().items()}, saved, unexpected=False)
    if detail:
        raise _mismatch_error(weights, detail)
    try:
        meta = wrap(meta, **wrap_kwargs)  # parameters on meta: CAS modules and the dummy input go there too
    except Exception:
        return  # the real wrap below reports its own error
    detail = _mismatch({k: tuple(v.shape) for k, v in meta.state_dict().items()}, saved)
    if detail:
        raise _mismatch_error(weights, detail)


def _build_base(spec: dict) -> nn.Module:
    if spec["source"] == "custom":
        return build_base(spec)  # raises ValueError: build it yourself and pass it as model=
    try:
        return build_base(spec)
    except LoadError:
        raise
    except Exception as e:  # e.g. a WideResNet depth that is not 6n + 4
        raise LoadError(f"could not build {spec['source']} model {spec['name']!r} with {spec['kwargs']}: "
                        f"{type(e).__name__}: {e}") from e


def from_pretrained(path_or_repo: Union[str, os.PathLike], model: Optional[nn.Module] = None, *,
                    revision: Optional[str] = None, token=None, map_location="cpu", leaf_modules: Sequence[type] = (),
                    autowrap_functions: Sequence = ()) -> CASModel:
    """Rebuild a wrapped model from a folder (offline) or a Hub repo id and load its weights strictly.

    ``model`` is the original (un-wrapped) architecture, needed only when the base is not a timm or torchvision model.
    The config is checked before anything is downloaded or built (see :mod:`casify.config_validation`), the weights
    against the SHA-256 recorded at save time, and the architecture's shapes against the weights before it is built.
    """
    from .surgery import wrap

    folder, repo_id = _resolve_folder(path_or_repo, revision, token)
    config = load_config(folder)
    if repo_id is not None:
        weights = _hub_download(repo_id, WEIGHTS_NAME, revision, token)
    else:
        weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise LoadError(f"{folder} has no {WEIGHTS_NAME}")
    verify_weights(weights, config)
    if isinstance(model, CASModel):
        raise TypeError("pass the original (un-wrapped) architecture as model=, not a wrapped one")
    cas = config["cas"]
    wrap_kwargs = dict(layers=cas["layers"], num_classes=cas["num_classes"], init=cas["init"],
                       suppress=cas["suppress"], normalize=config["normalize"], input_size=cas["input_size"],
                       channel_dims=cas["channel_dims"], leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions, base_spec=config["base_model"],
                       class_names=config.get("class_names"))
    if model is None:
        if config["base_model"]["source"] != "custom":
            _check_sizes_on_meta(config["base_model"], config, weights, wrap_kwargs)
        model = _build_base(config["base_model"])
    wrapped = wrap(model, **wrap_kwargs)
    for key in ("metrics", "training"):
        if config.get(key) is not None:
            wrapped.casify_config[key] = config[key]
    state = load_file(str(weights), device=str(map_location))
    detail = _mismatch({k: tuple(v.shape) for k, v in wrapped.state_dict().items()},
                       {k: tuple(v.shape) for k, v in state.items()})
    if detail:
        raise _mismatch_error(weights, detail)
    wrapped.load_state_dict(state, strict=True)
    return wrapped


def upload_patterns(folder: Union[str, os.PathLike]) -> List[str]:
    """The files :func:`push_to_hub` uploads from ``folder``: the model, its card, evaluation reports and figures at
    the top level, by exact name (so a stray ``checkpoints/`` or log next to them stays local)."""
    folder = Path(folder)
    names = [p.name for p in sorted(folder.iterdir()) if p.is_file()
             and (p.name in UPLOAD_FILES or p.name.endswith(UPLOAD_SUFFIXES)) and not re.search(r"[*?\[\]]", p.name)]
    return names


def push_to_hub(model: CASModel, repo_id: str, *, evaluation: Optional[dict] = None, dataset_name: str = "unknown",
                dataset_type: str = "unknown", split: str = "test", private: bool = False, token=None,
                commit_message: str = "Upload robust model trained with casify", folder: Optional[os.PathLike] = None):
    """Save the model with a model card (evaluation results in the ``model-index`` metadata) and upload it.

    ``folder``: where to stage the files (kept); by default a temporary directory. Only the model files, the card and
    evaluation reports are uploaded from it (:func:`upload_patterns`), never whatever else is there. Returns the
    commit info.
    """
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(folder) if folder is not None else Path(tmp)
        write_hub_folder(model, staging, repo_id, evaluation=evaluation, dataset_name=dataset_name,
                         dataset_type=dataset_type, split=split)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(staging), commit_message=commit_message,
                                 allow_patterns=upload_patterns(staging))


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
