"""How to rebuild the original model from a saved config: a timm or torchvision name with kwargs, or the user's own."""
from __future__ import annotations

import inspect
import platform
from typing import Optional

import torch
from torch import nn


def versions() -> dict:
    import timm
    import torchvision

    from ..version import __version__
    return {"casify": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _timm_spec(model: nn.Module) -> Optional[dict]:
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or not type(model).__module__.startswith("timm.") and "architecture" not in cfg:
        return None
    name = cfg.get("architecture")
    if not name:
        return None
    import timm
    if not timm.is_model(name):
        return None
    kwargs = {}
    if hasattr(model, "num_classes"):
        kwargs["num_classes"] = int(model.num_classes)
    in_chans = getattr(model, "in_chans", None)
    if in_chans is not None:
        kwargs["in_chans"] = int(in_chans)
    # Architecture kwargs a model records about itself (casify's CIFAR models: width, depth, widen_factor).
    kwargs.update(getattr(model, "arch_kwargs", None) or {})
    spec = {"source": "timm", "name": name, "kwargs": kwargs}
    # The Hub repo of the pretrained config, for the model card only (never used to load anything).
    hub_id = cfg.get("hf_hub_id")
    if isinstance(hub_id, str) and hub_id.count("/") == 1:
        spec["hf_hub_id"] = hub_id
    return spec


def _torchvision_spec(model: nn.Module) -> Optional[dict]:
    if not type(model).__module__.startswith("torchvision.models"):
        return None
    import torchvision.models as tvm
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    matrices = [v for k, v in shapes.items() if k.endswith("weight") and len(v) == 2]
    kwargs = {"num_classes": int(matrices[-1][0])} if matrices else {}
    for name in tvm.list_models(module=tvm):
        builder = tvm.get_model_builder(name)
        if inspect.signature(builder).return_annotation not in (type(model), type(model).__name__):
            continue
        try:
            candidate = builder(weights=None, **kwargs)
        except Exception:
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return {"source": "torchvision", "name": name, "kwargs": kwargs}
    return None


def infer_base_spec(model: nn.Module) -> dict:
    """Best-effort description of how to rebuild ``model``; ``{"source": "custom"}`` means: pass the model on load."""
    spec = _timm_spec(model) or _torchvision_spec(model)
    if spec is not None:
        return spec
    cls = type(model)
    return {"source": "custom", "name": f"{cls.__module__}.{cls.__qualname__}", "kwargs": {}}


def build_base(spec: dict) -> nn.Module:
    """A freshly initialised original model from a spec written by :func:`infer_base_spec` (no weights downloaded).

    The spec is checked first (:func:`casify.core.config_validation.validate_base_spec`): a registered name and only
    architectural kwargs, so a config can neither fetch nor read anything.
    """
    from .config_validation import validate_base_spec

    spec = validate_base_spec(spec, "base_model")
    source = spec["source"]
    if source == "timm":
        import timm
        return timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    if source == "torchvision":
        import torchvision.models as tvm
        return tvm.get_model(spec["name"], weights=None, **spec["kwargs"])
    raise ValueError(f"the saved model's base is a custom architecture ({spec.get('name')}); build it yourself and "
                     "pass it: casify.from_pretrained(path, model=MyModel(...))")
