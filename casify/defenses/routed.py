"""The routing state shared by defenses that pick a class to build their mask (CAS, CIFS).

Inside ``casify.route(model, labels=y)`` every routed module uses class ``y`` (the training phase of CAS and CIFS);
outside it each uses its own prediction (the test phase). Attacks replace the routing with :meth:`set_router` (e.g.
the straight-through routing); copies leave out the routing of an active context and the last forward's logits.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .base import DefenseModule


class CASRoutingWarning(UserWarning):
    """A routed defense module (CAS, CIFS) ran a training-mode forward without labels, so it routed by its own prediction.

    In the paper's training step the update routes by the true label; a training forward without a label context is
    almost always a bug in the caller's loop. Turn it into an error with
    ``warnings.simplefilter("error", casify.CASRoutingWarning)``, or silence it on purpose with
    ``casify.route(model, labels=None)``.
    """


class RoutedDefense(DefenseModule):
    """A defense module whose mask depends on a routed class (see the module docstring). Subclasses call
    :meth:`_init_routing` in ``__init__`` and :meth:`_routed_class` (or :meth:`routing_for`) in ``forward``."""

    routed = True

    def _init_routing(self) -> None:
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
                state = ("labels", labels.to(self._routing_device()))
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

    def _routing_device(self) -> torch.device:
        return next(self.parameters()).device

    def routing_for(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """The default routing: the labels of an active ``casify.route`` context, else the module's own prediction."""
        return RoutedDefense._routing_for(self, aux_logits)

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
            warnings.warn(f"{self.name.upper()} module ran a training-mode forward without labels and routed by its own "
                          "prediction; wrap the update forward in `with casify.route(model, labels=y):` (or use "
                          "`casify.route(model, labels=None)` to route by prediction on purpose)",
                          CASRoutingWarning, stacklevel=4)
        return aux_logits.argmax(dim=1)

    def _routed_class(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """The routing of this forward: the router's if an attack set one, else :meth:`routing_for`."""
        return self._routing_for(aux_logits) if self._router is None else self._router(aux_logits)
