"""The Channel-wise Activation Suppressing module (Bai et al., ICLR 2021, Sec. 4.1): casify's first defense.

Global average pooling over the activation's positions, an auxiliary linear classifier with bias, and a channel mask that
is the raw, signed weight row of the routed class. The auxiliary logits are computed from the un-masked activation and
nothing is detached, as in the authors' code (see ``shared/docs/cas-reference.md``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .base import LAYOUTS, find_defense_modules, layout_of, register_defense
from .routed import RoutedDefense

INITS = ("identity", "paper")
# The wrapped model's class name in casify 0.1.0, when CAS was its only defense: run folders of that version record it
# in their identity, and a resume reads it as today's DefendedModel (casify.train.checkpoints).
LEGACY_MODEL_CLASS = "CASModel"


@register_defense
class CASModule(RoutedDefense):
    """CAS on one activation: pool, classify, and scale each channel by the routed class's weight row.

    Args:
        num_channels: channels of the activation (K in the paper).
        num_classes: classes of the auxiliary classifier (the model's own class count).
        channel_dim: which axis of the activation holds the channels (1 for NCHW, -1 for NHWC and (N, tokens, C)).
        ndim: number of dimensions of the activation including the batch (2, 3 or 4). On 2-D (N, C) features (an MLP
            head's hidden layer) the pooling is the identity: the auxiliary classifier reads the same vector the
            model's next layer reads.
        init: ``"identity"`` sets every weight row to one and the bias to zero, so at insertion the module passes its
            input through unchanged (a pretrained model keeps its function); ``"paper"`` keeps PyTorch's default
            ``nn.Linear`` initialisation, as the authors' code does.
        suppress: apply the mask (CAS). ``False`` keeps the auxiliary classifier and its loss but passes the
            activation through unmasked: the paper's "without suppressing" ablation (Table 2).
    """

    name = "cas"
    routed = True
    layouts = LAYOUTS  # with "features": CAS's pooling and mask are defined on an (N, C) vector too
    # suppress is the placement section's CAS switch (config.json "cas.suppress", wrap's suppress=), not an option
    OPTIONS: dict = {}

    def __init__(self, num_channels: int, num_classes: int, channel_dim: int = 1, ndim: int = 4, init: str = "identity",
                 suppress: bool = True, device=None, dtype=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if ndim not in (2, 3, 4):
            raise ValueError(f"CAS works on 2-D (N, C) features, 3-D (N, tokens, C) or 4-D (N, C, H, W) / (N, H, W, C) "
                             f"activations, got ndim={ndim}")
        self.num_channels = int(num_channels)
        self.num_classes = int(num_classes)
        self.ndim = int(ndim)
        self.channel_dim = channel_dim % ndim
        if self.channel_dim == 0:
            raise ValueError("channel_dim cannot be the batch axis (0)")
        self.pool_dims = tuple(d for d in range(1, ndim) if d != self.channel_dim)
        self.classifier = torch.nn.Linear(self.num_channels, self.num_classes, bias=True, device=device, dtype=dtype)
        self.init = init
        self.suppress = bool(suppress)
        if init == "identity":  # "paper" keeps the Linear's own default initialisation, drawn once
            self.reset_parameters(init)
        self._init_routing()

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
        return (f"channels={self.num_channels}, classes={self.num_classes}, "
                f"{layout_of(self.channel_dim, self.ndim)}, ndim={self.ndim}"
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
        pooled = f.mean(dim=self.pool_dims) if self.pool_dims else f  # (N, C) features: nothing to pool
        aux_logits = self.classifier(pooled)
        self.last_aux_logits = aux_logits
        if not self.suppress:
            return f
        routing = self._routed_class(aux_logits)
        mask = self.channel_importance(routing)
        shape = [f.shape[0]] + [1] * (self.ndim - 1)
        shape[self.channel_dim] = self.num_channels
        return f * mask.view(shape).to(f.dtype)

    # -- the DefenseModule interface ----------------------------------------------------------------------------
    def aux_outputs(self) -> List[Optional[torch.Tensor]]:
        return [self.last_aux_logits]

    def clear_outputs(self) -> None:
        self.last_aux_logits = None


# find_cas_modules: kept for code written before the family engine; use find_defense_modules (it finds every defense)
find_cas_modules = find_defense_modules

__all__ = ["INITS", "CASModule", "find_cas_modules"]
