"""Which label each CAS module masks with on a forward.

Inside ``route(model, labels=y)`` every CAS module uses the weight row of ``y`` (the paper's training phase); outside it
each module uses the row of its own prediction (the test phase). Routing is independent of ``train()``/``eval()``: the
adversarial-training step crafts its attack in eval mode with predicted routing, then updates in training mode with
label routing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..defenses import find_defense_modules, routed_modules
from .inputs import ASYNC_ASSERT_DEVICES, check_labels  # noqa: F401  (ASYNC_ASSERT_DEVICES re-exported)


@contextlib.contextmanager
def route(model: nn.Module, labels: Optional[torch.Tensor]) -> Iterator[None]:
    """Route every CAS module in ``model`` (also through DDP / Accelerate wrappers) by ``labels`` for the duration.

    ``labels`` may be class indices (N,), soft weights over classes (N, num_classes) that mix weight rows, or ``None``
    to route by prediction explicitly (no warning in training mode). Contexts nest; the previous routing is restored.
    """
    modules = routed_modules(model)
    if not modules:
        if find_defense_modules(model):
            raise ValueError("casify.route: the model's defense modules route by nothing (e.g. FSR); only routed "
                             "defenses (CAS, CIFS) take labels, so run the forward without casify.route")
        raise ValueError("casify.route: the model has no CAS modules; wrap it with casify.wrap(model, layers=...) first")
    if labels is None:
        state = ("predicted", None)
    else:
        checked = check_labels(labels, modules[0].num_classes)
        state = ("labels", checked)
    previous = [m.set_route(state) for m in modules]
    try:
        yield
    finally:
        for m, prev in zip(modules, previous):
            m.set_route(prev)


TRAIN_ROUTINGS = {
    "label": "the true label (the paper's training step; the mask carries the label to later layers)",
    "predicted": "each module's own argmax (no label in the mask: what the deployed model does)",
    "soft": "each module's softmax over its own auxiliary logits mixes the weight rows (no label, differentiable)",
}
"""How CAS modules may route in a training update (``train_routing`` of the losses and ``TrainConfig.loss_kwargs``).
The two label-free routings test whether the label leak is what makes a trained CAS model echo its first head."""


def _soft_own_prediction(aux_logits: torch.Tensor) -> torch.Tensor:
    return aux_logits.float().softmax(dim=1)


@contextlib.contextmanager
def train_route(model: nn.Module, labels: torch.Tensor, routing: str = "label") -> Iterator[None]:
    """Route the CAS modules of ``model`` for one training forward as ``routing`` (a key of :data:`TRAIN_ROUTINGS`)
    says; ``labels`` are used only by ``"label"``."""
    if routing not in TRAIN_ROUTINGS:
        raise ValueError(f"train routing must be one of {sorted(TRAIN_ROUTINGS)}, got {routing!r}")
    if not routed_modules(model):
        if routing != "label":
            raise ValueError(f"train_routing={routing!r} needs a routed defense (CAS, CIFS); this model's defense "
                             "routes by nothing, so leave train_routing at 'label'")
        yield  # nothing routes: the forward runs as it is
        return
    if routing == "label":
        with route(model, labels=labels):
            yield
        return
    modules = routed_modules(model)
    previous = [m.set_router(_soft_own_prediction) for m in modules] if routing == "soft" else None
    try:
        with route(model, labels=None):
            yield
    finally:
        if previous is not None:
            for m, prev in zip(modules, previous):
                m.set_router(prev)
