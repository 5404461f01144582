"""Registering casify's CIFAR models with timm, offline and without ImageNet normalisation."""
from __future__ import annotations

from typing import Any, Dict, Optional, Type

from timm.models import build_model_with_cfg
from torch import nn

# The paper (and the adversarial-training literature it follows) feeds raw [0, 1] pixels to the network. timm's
# PretrainedCfg defaults to ImageNet mean/std, so every config here states mean 0 / std 1 explicitly: timm's data
# pipeline (resolve_data_config) then normalises by nothing, and casify.wrap(normalize="auto") inserts an exact
# identity ((x - 0) / 1) instead of silently applying ImageNet statistics.
CIFAR_CFG: Dict[str, Any] = {
    "url": "",
    "num_classes": 10,
    "input_size": (3, 32, 32),
    "pool_size": None,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "first_conv": "conv1",
    "license": "apache-2.0",
}


def cifar_cfg(**overrides: Any) -> Dict[str, Any]:
    """A pretrained_cfg dict for a 32x32, un-normalised CIFAR model (no weights are published: ``url`` is empty)."""
    return {**CIFAR_CFG, **overrides}


def _has_weight_source(kwargs: dict) -> bool:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        cfg = kwargs.get(key)
        if isinstance(cfg, dict) and any(cfg.get(k) for k in ("url", "file", "state_dict", "hf_hub_id")):
            return True
    return False


def create(model_cls: Type[nn.Module], variant: str, pretrained: bool = False,
           feature_cfg: Optional[dict] = None, **kwargs: Any) -> nn.Module:
    """Build ``model_cls`` through timm so it gets ``pretrained_cfg`` (with ``architecture``) like any timm model.

    ``pretrained=True`` needs a weight source (``pretrained_cfg_overlay=dict(file=...)``): no weights are published
    for these architectures, and timm would otherwise fall back to random weights with only a log warning.
    """
    if pretrained and not _has_weight_source(kwargs):
        raise ValueError(f"no pretrained weights are published for {variant!r}; create it with pretrained=False and "
                         "load a state dict, or pass pretrained_cfg_overlay=dict(file='weights.pth')")
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg,
                                **kwargs)
