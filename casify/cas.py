"""The Channel-wise Activation Suppressing module (paper Sec. 4.1), with nothing about models or training.

Global average pooling over the activation's positions, an auxiliary linear classifier with bias, and a channel mask that
is the raw, signed weight row of the routed class. The auxiliary logits are computed from the un-masked activation and
nothing is detached, as in the authors' code (see ``shared/docs/cas-reference.md``).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

INITS = ("identity", "paper")


class CASRoutingWarning(UserWarning):
    """A CAS module ran a training-mode forward without labels, so it routed by its own prediction.

    In the paper's training step the update routes by the true label; a training forward without a label context is
    almost always a bug in the caller's loop. Turn it into an error with
    ``warnings.simplefilter("error", casify.CASRoutingWarning)``, or silence it on purpose with
    ``casify.route(model, labels=None)``.
    """


class CASModule(nn.Module):
    """CAS on one activation: pool, classify, and scale each channel by the routed class's weight row.

    Args:
        num_channels: channels of the activation (K in the paper).
        num_classes: classes of the auxiliary classifier (the model's own class count).
        channel_dim: which axis of the activation holds the channels (1 for NCHW, -1 for NHWC and (N, tokens, C)).
        ndim: number of dimensions of the activation including the batch (3 or 4).
        init: ``"identity"`` sets every weight row to one and the bias to zero, so at insertion the module passes its
            input through unchanged (a pretrained model keeps its function); ``"paper"`` keeps PyTorch's default
            ``nn.Linear`` initialisation, as the authors' code does.
        suppress: apply the mask (CAS). ``False`` keeps the auxiliary classifier and its loss but passes the
            activation through unmasked: the paper's "without suppressing" ablation (Table 2).
    """

    def __init__(self, num_channels: int, num_classes: int, channel_dim: int = 1, ndim: int = 4, init: str = "identity",
                 suppress: bool = True, device=None, dtype=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if ndim not in (3, 4):
            raise ValueError(f"CAS works on 3-D (N, tokens, C) or 4-D (N, C, H, W) / (N, H, W, C) activations, got ndim={ndim}")
        self.num_channels = int(num_channels)
        self.num_classes = int(num_classes)
        self.ndim = int(ndim)
        self.channel_dim = channel_dim % ndim
        if self.channel_dim == 0:
            raise ValueError("channel_dim cannot be the batch axis (0)")
        self.pool_dims = tuple(d for d in range(1, ndim) if d != self.channel_dim)
        self.classifier = nn.Linear(self.num_channels, self.num_classes, bias=True, device=device, dtype=dtype)
        self.init = init
        self.suppress = bool(suppress)
        if init == "identity":  # "paper" keeps the Linear's own default initialisation, drawn once
            self.reset_parameters(init)
        # Routing state, set by casify.route(): None = no context; ("labels", tensor) or ("predicted", None).
        self._route: Optional[tuple] = None
        self._router: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # set_router(); None: routing_for
        self.last_aux_logits: Optional[torch.Tensor] = None

    def __getstate__(self):
        """Copies (``copy.deepcopy``, timm's ``ModelEmaV3``) leave out the last forward's auxiliary logits, a non-leaf
        tensor of that forward's autograd graph that deepcopy refuses, and the routing of an active ``casify.route``
        context, which belongs to the original and would otherwise stay in the copy forever."""
        state = super().__getstate__()
        state["last_aux_logits"] = None
        state["_route"] = None
        state["_router"] = None
        return state

    # -- routing (driven by casify.route; the state is a plain tuple so torch.compile can guard on it) -------------
    @property
    def route_state(self) -> Optional[tuple]:
        """How the next forward routes: None (no ``casify.route`` context: own prediction, with a
        :class:`CASRoutingWarning` in training mode), ``("predicted", None)`` (own prediction on purpose) or
        ``("labels", tensor)`` ((N,) classes or (N, num_classes) weights already on this module's device)."""
        return self._route

    def set_route(self, state: Optional[tuple]) -> Optional[tuple]:
        """Set :attr:`route_state` and return the previous state (for restoring it). ``("labels", y)`` moves ``y``
        to the classifier's device; use :func:`casify.route` rather than calling this directly."""
        if state is not None:
            kind, labels = state
            if kind not in ("labels", "predicted") or (kind == "labels") != (labels is not None):
                raise ValueError(f"a route state is None, ('predicted', None) or ('labels', tensor), got {state!r}")
            if labels is not None:
                state = ("labels", labels.to(self.classifier.weight.device))
        previous, self._route = self._route, state
        return previous

    @property
    def router(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The function that replaces :meth:`routing_for` on this module's forwards, or None (see :meth:`set_router`)."""
        return self._router

    def set_router(self, fn: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> Optional[Callable]:
        """Make ``fn(aux_logits)`` give this module's routing ((N,) classes or (N, num_classes) weights) instead of
        :meth:`routing_for`, and return the previous router (None: the default). Attacks use it for routings the
        deployed model does not have (straight-through); copies of the module leave it out."""
        previous, self._router = self._router, fn
        return previous

    def reset_parameters(self, init: Optional[str] = None) -> None:
        init = init or self.init
        if init == "identity":
            with torch.no_grad():
                self.classifier.weight.fill_(1.0)
                self.classifier.bias.zero_()
        else:
            self.classifier.reset_parameters()
        self.init = init

    def extra_repr(self) -> str:
        layout = {1: "channels-first"}.get(self.channel_dim, "channels-last")
        return (f"channels={self.num_channels}, classes={self.num_classes}, {layout}, ndim={self.ndim}"
                + ("" if self.suppress else ", suppress=False"))

    def channel_importance(self, routing: torch.Tensor) -> torch.Tensor:
        """Rows of the classifier weight for the routed classes: (N,) class indices, or (N, num_classes) class weights
        for a soft mixture of rows (used by attacks that keep the routing differentiable)."""
        weight = self.classifier.weight
        if routing.dim() == 1:
            return weight[routing]
        return routing.to(weight.dtype) @ weight

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != self.ndim or f.shape[self.channel_dim] != self.num_channels:
            raise ValueError(f"CAS module expects a {self.ndim}-D activation with {self.num_channels} channels on axis "
                             f"{self.channel_dim}, got shape {tuple(f.shape)}")
        pooled = f.mean(dim=self.pool_dims)
        aux_logits = self.classifier(pooled)
        self.last_aux_logits = aux_logits
        if not self.suppress:
            return f
        routing = self._routing_for(aux_logits) if self._router is None else self._router(aux_logits)
        mask = self.channel_importance(routing)
        shape = [f.shape[0]] + [1] * (self.ndim - 1)
        shape[self.channel_dim] = self.num_channels
        return f * mask.view(shape).to(f.dtype)

    def routing_for(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """The default routing: the labels of an active ``casify.route`` context, else the module's own prediction."""
        return type(self)._routing_for(self, aux_logits)

    def _routing_for(self, aux_logits: torch.Tensor) -> torch.Tensor:
        # The implementation of routing_for (attacks override routing with set_router, never by patching this).
        route = self._route
        if route is not None and route[0] == "labels":
            labels = route[1]
            if labels.shape[0] != aux_logits.shape[0]:
                raise ValueError(f"casify.route got labels for {labels.shape[0]} examples but the batch has "
                                 f"{aux_logits.shape[0]}; pass one label per example of this forward")
            return labels
        if route is None and self.training:
            warnings.warn("CAS module ran a training-mode forward without labels and routed by its own prediction; "
                          "wrap the update forward in `with casify.route(model, labels=y):` (or use "
                          "`casify.route(model, labels=None)` to route by prediction on purpose)",
                          CASRoutingWarning, stacklevel=3)
        return aux_logits.argmax(dim=1)


def find_cas_modules(model: nn.Module) -> Sequence[CASModule]:
    """Every CAS module inside ``model``, whatever wraps it (DDP, Accelerate, torch.compile), in registration order."""
    return [m for m in model.modules() if isinstance(m, CASModule)]


def aux_logits(model: nn.Module) -> list:
    """The auxiliary logits of the last forward, one (N, num_classes) tensor per CAS module, in graph order."""
    modules = find_cas_modules(model)
    missing = [i for i, m in enumerate(modules) if m.last_aux_logits is None]
    if missing:
        raise RuntimeError("no auxiliary logits yet: run a forward through the model first")
    return [m.last_aux_logits for m in modules]
