"""The model a user names on the command line: a saved folder, a Hub repo, a weights file, or a registered name.

Why: ``casify eval`` and ``casify analyze`` took only folders of registered architectures, so casify's own shared
models (``resnet4b.pth``) and a user's own architecture could not be evaluated from the CLI. A user's code is
imported only when they name it with ``--arch module:factory`` on the command line; a saved config never names code
to import (:mod:`casify.core.config_validation`).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .loading import from_pretrained
from .defended import DefendedModel
from ..models import SHARED_MODELS, load_shared_model
from .surgery import wrap

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class ModelSourceError(ValueError):
    """The named model cannot be found or built; the message says what to pass instead."""


def import_arch(arch: str) -> nn.Module:
    """``"module:factory"`` -> ``factory()``, the un-wrapped model. The current folder is searched too (the user
    named the module on the command line, as ``python -m`` would find it)."""
    module_name, sep, factory_name = arch.partition(":")
    if not sep or not module_name or not factory_name:
        raise ModelSourceError(f"--arch {arch!r}: expected MODULE:FACTORY, e.g. --arch mynets:small_cnn "
                               "(mynets.py in the current folder, small_cnn() returns the model)")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(f"--arch {arch!r}: cannot import {module_name!r} ({e})") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelSourceError(f"--arch {arch!r}: {module_name} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"--arch {arch!r}: {factory_name}() returned a {type(model).__name__}, not a model")
    return model


def _state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelSourceError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _from_weights_file(path: Path, arch: Optional[str]) -> DefendedModel:
    """A weights file: into ``--arch``'s model, or one of casify's shared models by file name; wrapped without CAS."""
    if arch is None:
        try:
            base, normalize = load_shared_model(path)
        except ValueError:
            raise ModelSourceError(
                f"{path} is a weights file of an architecture casify cannot tell from its name (it knows "
                f"{sorted(SHARED_MODELS)}); pass --arch MODULE:FACTORY, or a folder written by save_pretrained"
            ) from None
        return wrap(base, [], normalize=normalize)
    base = import_arch(arch)
    try:
        base.load_state_dict(_state_dict(path), strict=True)
    except RuntimeError as e:
        raise ModelSourceError(f"{path} does not fit --arch {arch}: {str(e).splitlines()[0]}") from None
    return wrap(base.eval(), [])


def load_model(name: str, arch: Optional[str] = None) -> DefendedModel:
    """The wrapped model ``name`` stands for (see the module doc), in eval mode."""
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ModelSourceError(f"{path} is a file but not a weights file ({', '.join(WEIGHT_SUFFIXES)}); pass "
                                   "the folder written by save_pretrained")
        return _from_weights_file(path, arch).eval()
    base = import_arch(arch) if arch else None
    try:
        return from_pretrained(name, model=base).eval()
    except ValueError as e:
        if "custom architecture" in str(e):
            raise ModelSourceError(f"{name}: the saved base is a custom architecture; name it on the command line "
                                   "with --arch MODULE:FACTORY (FACTORY() returns the un-wrapped model)") from None
        raise


def build_named(name: str, arch: Optional[str] = None) -> nn.Module:
    """For ``casify layers``: a saved model as :func:`load_model` finds it, or a fresh, untrained timm
    (``resnet18``) or torchvision (``torchvision:resnet18``) model; only its shapes are read."""
    if arch and not Path(name).exists():
        return import_arch(arch)
    if name.startswith("torchvision:"):
        import torchvision.models as tvm
        return tvm.get_model(name.split(":", 1)[1], weights=None)
    import timm
    if not Path(name).exists() and timm.is_model(name):
        return timm.create_model(name, pretrained=False)
    return load_model(name, arch)
