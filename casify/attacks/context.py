"""How a model is run while it is attacked: eval mode, a routing (deployed, straight-through / BPDA, fixed), and the
deployed scoring."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses.base import aux_logits
from ..defenses import attack_aux_logits, find_defense_modules, routed_modules
from ..core.routing import route
from .constants import ROUTINGS, Routing, STRAIGHT_THROUGH_TEMPERATURE
from .objectives import class_mask

# -- running the model -----------------------------------------------------------------------------------------------
def attack_target(model: nn.Module) -> nn.Module:
    """The module to attack: DDP / DataParallel are unwrapped, since an attack needs no gradient sync and a forward
    through DDP whose parameters never receive gradients breaks its next reduction."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class StraightThrough:
    """Per-module override of the routing: the forward masks with the argmax row exactly as deployed (one-hot plus an
    exact zero), the backward sees the softmax mixture of rows, so d mask / d aux logits is the softmax's Jacobian
    times the weight matrix. ``active`` switches it off for the deployed scoring forwards."""

    def __init__(self, model: nn.Module, temperature: float = STRAIGHT_THROUGH_TEMPERATURE):
        self.all_modules = list(find_defense_modules(model))
        self.modules = [m for m in self.all_modules if m.routed]
        self.temperature = float(temperature)
        self.active = True

    def _router(self, module):
        def routing_for(aux: torch.Tensor) -> torch.Tensor:
            hard = module.routing_for(aux)
            if not self.active or hard.dim() != 1:
                return hard
            soft = F.softmax(aux.float() / self.temperature, dim=1)
            return class_mask(hard, soft.shape[1]).to(soft.dtype) + (soft - soft.detach())
        return routing_for

    def __enter__(self):
        # every defense's own straight-through / BPDA backward (CIFS: through the probe gradient; FSR: through the
        # un-sharpened mask; CAS has none beyond the routing below)
        self._adaptive = [m.set_adaptive_backward(True) for m in self.all_modules]
        self._previous = [m.set_router(self._router(m)) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for m, previous in zip(self.modules, self._previous):
            m.set_router(previous)
        for m, previous in zip(self.all_modules, self._adaptive):
            m.set_adaptive_backward(previous)
        return False


@contextlib.contextmanager
def attack_context(model: nn.Module, routing: Routing = None, y: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Eval mode plus a routing for the duration; every submodule's own train/eval flag is restored afterwards.

    ``routing``: ``None`` or ``"predicted"`` (each CAS module routes by its own prediction, the authors' protocol),
    ``"straight-through"`` (the deployed forward, a softmax-mixture backward through each module's class choice),
    ``"labels"`` (route by ``y``: leaks the label, for diagnostics only), or a tensor of class indices (N,) or soft
    routing weights (N, num_classes). (``"clean-predicted"`` / ``"clean-soft"`` are resolved to tensors by the
    attacks, which see the clean input; see :func:`clean_routing`.)
    """
    modes = [(m, m.training) for m in model.modules()]
    defended = bool(find_defense_modules(model))
    has_routed = bool(routed_modules(model))
    straight = False
    if isinstance(routing, str):
        if routing == "predicted":
            routing = None
        elif routing == "straight-through":
            routing, straight = None, True
        elif routing == "labels":
            if y is None:
                raise ValueError("routing='labels' needs the labels y")
            routing = y
        elif routing in ("clean-predicted", "clean-soft"):
            raise ValueError(f"routing {routing!r} depends on the clean input: resolve it with "
                             "casify.attacks.clean_routing(model, x, kind) first (the attacks do)")
        else:
            raise ValueError(f"routing must be None, one of {ROUTINGS} or a tensor, got {routing!r}")
    if straight and not defended:
        raise ValueError("a routing was given but the model has no CAS modules")
    if routing is not None and not has_routed:
        raise ValueError("a routing was given but the model has no routed defense modules (CAS, CIFS)"
                         if defended else "a routing was given but the model has no CAS modules")
    override = StraightThrough(model) if straight else contextlib.nullcontext()
    model.eval()
    try:
        with route(model, labels=routing) if has_routed else contextlib.nullcontext(), override:
            yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def clean_routing(model: nn.Module, x: torch.Tensor, kind: str = "clean-predicted") -> torch.Tensor:
    """A fixed routing from one clean deployed forward (detached): ``"clean-predicted"``, the model's own predicted
    class (N,); ``"clean-soft"``, the mean over CAS modules of the softmax of each module's auxiliary logits
    (N, num_classes), a mixture of weight rows (``casify.route`` takes one routing for all modules, hence the mean)."""
    if kind not in ("clean-predicted", "clean-soft"):
        raise ValueError(f"kind must be 'clean-predicted' or 'clean-soft', got {kind!r}")
    model = attack_target(model)
    if not routed_modules(model):
        raise ValueError("a routing was given but the model has no routed defense modules (CAS, CIFS)")
    with attack_context(model):
        logits = model(x)
        if kind == "clean-predicted":
            return logits.argmax(dim=1)
        return torch.stack([F.softmax(a.float(), dim=1) for a in aux_logits(model)]).mean(dim=0)


def forward_logits(model: nn.Module, x: torch.Tensor, defended: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Final and auxiliary logits as float32, so that losses never run in half precision."""
    logits = model(x).float()
    return logits, ([a.float() for a in attack_aux_logits(model)] if defended else [])


def is_low_precision(model: nn.Module, x: torch.Tensor) -> bool:
    if torch.is_autocast_enabled(x.device.type) or x.dtype in (torch.float16, torch.bfloat16):
        return True
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())




@contextlib.contextmanager
def deployed_routing(model: nn.Module, defended: bool) -> Iterator[None]:
    """Inside an attack: score on the deployed model (predicted routing, no straight-through override)."""
    if not defended:
        yield
        return
    modules = routed_modules(model)
    if not modules:
        yield
        return
    overrides = [m.set_router(None) for m in modules]
    try:
        with route(model, labels=None):
            yield
    finally:
        for m, fn in zip(modules, overrides):
            m.set_router(fn)
