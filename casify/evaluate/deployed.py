"""The model as deployed, which every row is scored on: eval mode, every CAS module routed by its own prediction,
no label near the forward (``shared/docs/cas-reference.md``: training mode with ``y`` leaks the label through the
mask). Also the clean-input probes the checks and the fixed-routing attacks need.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..attacks import attack_context, clean_routing, cw_margin, predicted_correctly
from ..defenses import DefenseModule, find_defense_modules


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel / DeepSpeed wrappers (a compiled model stays compiled): the
    evaluation runs the model itself, sharding the data instead."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=True)


class InputTied(nn.Module):
    """Adds an exact zero that depends on the input, so a model that detaches its input gives the attacks a zero
    input gradient (which the checks then flag) instead of an autograd error. The logits are unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out + (0.0 * x.flatten(1).sum(dim=1, keepdim=True)).to(out.dtype)


def architecture_name(model: nn.Module) -> str:
    """The base architecture's name (``cifar_resnet18``, ``resnet50``), which is what a reader wants to know, not the
    wrapper's class (``DefendedModel``): the saved config's ``base_model``, else timm's ``pretrained_cfg``, else the
    class of the model inside the wrapper."""
    model = unwrap_parallel(model)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    config = getattr(model, "casify_config", None)
    if isinstance(config, dict):
        base = config.get("base_model") or {}
        if isinstance(base, dict) and isinstance(base.get("name"), str) and base["name"]:
            return base["name"].split(":")[-1]
    from ..model.defended import DefendedModel
    inner = model.base_model if isinstance(model, DefendedModel) else model
    pretrained = getattr(inner, "pretrained_cfg", None)
    if isinstance(pretrained, dict) and isinstance(pretrained.get("architecture"), str):
        return pretrained["architecture"]
    return type(inner).__name__


def describe_model(model: nn.Module, source: Optional[str] = None) -> dict:
    """Class, base architecture, size and CAS placement of ``model``, for the report."""
    model = unwrap_parallel(model)
    cas = find_defense_modules(model)
    d = {"class": type(model).__name__, "architecture": architecture_name(model),
         "parameters": int(sum(p.numel() for p in model.parameters())), "cas_modules": len(cas)}
    config = getattr(model, "casify_config", None)
    if isinstance(config, dict):
        d["cas_layers"] = list(config.get("cas", {}).get("layers", []))
        d["num_classes"] = config.get("cas", {}).get("num_classes")
        d["base_model"] = config.get("base_model")
        if config.get("training"):
            d["training"] = config["training"]
    elif cas:
        d["cas_layers"] = [name for name, m in model.named_modules() if isinstance(m, DefenseModule)]
    if source is not None:
        d["source"] = str(source)
    return d


@torch.no_grad()
def deployed_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per example (correct, finite): ``model(x).argmax(1) == y`` in eval mode with every CAS module routed by its
    own prediction, False where a logit is NaN or inf (:func:`casify.attacks.predicted_correctly`); and whether
    every logit was finite, so the report can count and name the rows where the model broke."""
    with attack_context(model):
        logits = model(x)
    return predicted_correctly(logits, y), torch.isfinite(logits).all(dim=1)


def deployed_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model(x).argmax(1) == y`` in eval mode with every CAS module routed by its own prediction; NaN or inf
    logits are never correct."""
    return deployed_scores(model, x, y)[0]


def clean_routings(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Routings for the fixed-routing attacks, from one clean deployed forward (detached):

    ``"predicted"``: the model's own predicted class (N,); ``"soft"``: the mean over CAS modules of the softmax of
    each module's auxiliary logits (N, num_classes), a mixture of weight rows. ``casify.route`` takes one routing
    for all modules, hence the mean. (The attacks compute these themselves for ``routing="clean-predicted"`` /
    ``"clean-soft"``: :func:`casify.attacks.clean_routing`.)
    """
    return {"predicted": clean_routing(model, x, "clean-predicted"), "soft": clean_routing(model, x, "clean-soft")}


def zero_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: is the input gradient of the CW margin all zero or non-finite (deployed model)?"""
    with attack_context(model), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        margin = cw_margin(model(x_in).float(), y).sum()
        if not margin.requires_grad:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        (grad,) = torch.autograd.grad(margin, x_in, allow_unused=True)
    if grad is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    flat = grad.detach().float().flatten(1)
    return ~(torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1))
