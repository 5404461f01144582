"""CIFS: Channel-wise Importance-based Feature Selection (Yan et al., ICML 2021), written from the paper and the
authors' code (HanshuYAN/CIFS, ``models/nets/resnet_CIFS.py``); nothing copied.

On one activation ``f``: a probe head (global average pooling, then a linear layer, or a small MLP) gives logits
``z``; the channel importance is the gradient of the probe's top-k logits with respect to ``f``, summed over the
positions of each channel; a softmax over channels of that importance is the mask, and the module returns
``f * mask``. The probe's logits on ``f`` are the module's auxiliary head (trained with the method's loss, beta x mean
over heads, as CAS's).

Where casify follows the authors' code over the paper, or differs from both, and why:

- **Detached features** (code): the mask is computed on a detached copy of ``f``, so a plain input gradient treats
  the mask as a constant. The adaptive attack rows (``routing="straight-through"``) switch
  :meth:`set_adaptive_backward` on, which computes the same mask on ``f`` itself (no detach), and route the top-1
  class straight-through (as CAS's). With the linear probe the mask depends on ``f`` only through the two chosen
  classes, so there the straight-through routing is the whole adaptive backward; the no-detach part matters for the
  MLP probe, whose hidden activations depend on ``f``.
- **One probe per wrap** (differs from the code): the authors put an MLP probe on ``layer4.0`` and a linear one on
  ``layer4.1``; casify's options apply to every wrapped layer (wrap twice, or choose one probe for all).
- **Which logits** (code): top-2 by default (``top_k=2``): in training the routed class (the true label, through
  :func:`casify.route`) plus the probe's second-ranked class; at test the probe's own top-1 and top-2. ``top_k=1``
  keeps the routed class alone (the paper's top-1 variant). As in the code, the second class is the probe's
  second-ranked one even when the label is not its first.
- **Probe** (code): ``probe="linear"`` (GAP + Linear, the authors' second block) or ``"mlp"`` (GAP + Linear(C, 128)
  + Softplus(beta=5) + Linear, their first block). Both the routed gradient and the probe head use the same probe.
- **Closed form** (differs from the code's mechanics, not its values): the authors take the gradient with
  ``autograd.grad(create_graph=True)`` inside the forward; the probe reads ``f`` only through its mean over positions,
  so the same gradient has a closed form (:meth:`CIFSModule.importance`), differentiable in the probe's weights as
  theirs is (the probe is trained through the mask as well as through its own loss), with no backward pass inside
  the forward (scoring under ``no_grad`` and torch.compile work unchanged). A test checks it against
  ``autograd.grad`` on both probes, in train and eval mode.
- **Loss scale** (differs from the code): the authors multiply the joint loss by ``3 / (beta + 1)``; casify's joint
  term is the same for every defense (``final + beta x mean over heads``), identical to theirs at their beta of 2.
- **Function-preserving init** (casify's own): ``mask_scale="channels"`` multiplies the softmax by the channel count
  (mask mean 1) and ``init="identity"`` zeroes the probe's output layer, so the mask is exactly 1 at insertion and a
  pretrained model keeps its function. The authors' form is ``mask_scale="softmax"``, ``init="paper"`` (the default).
- **Layouts**: the authors' NCHW only; here any layout CAS takes (the sum over positions runs over every non-channel
  axis).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import choice, integer, register_defense
from .routed import RoutedDefense


def _one_hot(classes: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(classes, num_classes).to(dtype)


@register_defense
class CIFSModule(RoutedDefense):
    """CIFS on one activation (see the module docstring for every choice)."""

    name = "cifs"
    INITS = ("paper", "identity")
    OPTIONS = {"top_k": integer(2, 1, 2), "probe": choice("linear", ("linear", "mlp")),
               "hidden": integer(128, 1, 4096), "mask_scale": choice("softmax", ("softmax", "channels"))}

    def __init__(self, num_channels: int, num_classes: int, channel_dim: int = 1, ndim: int = 4, init: str = "paper",
                 top_k: int = 2, probe: str = "linear", hidden: int = 128, mask_scale: str = "softmax",
                 device=None, dtype=None):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"CIFS init must be one of {self.INITS}, got {init!r}")
        if init == "identity" and mask_scale != "channels":
            raise ValueError("CIFS init='identity' needs mask_scale='channels' (a softmax mask sums to 1, so it cannot "
                             "pass the activation through); or use init='paper', the authors' form")
        if ndim not in (3, 4):
            raise ValueError(f"CIFS works on 3-D or 4-D activations, got ndim={ndim}")
        self.num_channels, self.num_classes, self.ndim = int(num_channels), int(num_classes), int(ndim)
        self.channel_dim = channel_dim % ndim
        if self.channel_dim == 0:
            raise ValueError("channel_dim cannot be the batch axis (0)")
        self.pool_dims = tuple(d for d in range(1, ndim) if d != self.channel_dim)
        self.top_k, self.probe, self.hidden, self.mask_scale = int(top_k), probe, int(hidden), mask_scale
        self.adaptive = False  # the adaptive backward, switched on by attacks (set_adaptive_backward)
        width = self.num_channels
        if probe == "mlp":
            self.hidden_layer = nn.Linear(width, self.hidden, device=device, dtype=dtype)
            width = self.hidden
        self.classifier = nn.Linear(width, self.num_classes, device=device, dtype=dtype)
        self.init = init
        if init == "identity":
            with torch.no_grad():
                self.classifier.weight.zero_()
                self.classifier.bias.zero_()
        self._init_routing()

    def extra_repr(self) -> str:
        return (f"channels={self.num_channels}, classes={self.num_classes}, probe={self.probe}, top_k={self.top_k}, "
                f"mask_scale={self.mask_scale}")

    def probe_logits(self, f: torch.Tensor) -> torch.Tensor:
        """The probe head on an activation: GAP, then the linear layer (or Linear, Softplus(beta=5), Linear)."""
        pooled = f.mean(dim=self.pool_dims)
        if self.probe == "mlp":
            pooled = F.softplus(self.hidden_layer(pooled), beta=5.0)
        return self.classifier(pooled)

    def _selection(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, classes) weights of the logits whose gradient is the importance: the routed class (one-hot, or the
        soft weights an attack's router gives) plus, with top_k=2, the probe's second-ranked class."""
        routing = self._routed_class(logits)
        weights = routing.to(logits.dtype) if routing.dim() == 2 else _one_hot(routing, self.num_classes, logits.dtype)
        if self.top_k == 2:
            second = logits.detach().topk(2, dim=1).indices[:, 1]
            weights = weights + _one_hot(second, self.num_classes, logits.dtype)
        return weights

    def importance(self, f: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(N, channels): the gradient of the selected probe logits with respect to ``f``, summed over each channel's
        positions, in closed form. The probe reads ``f`` only through its mean ``g`` over positions, so the sum over
        positions of d z / d f is d z / d g: the selected rows of the linear layer (``probe="linear"``), or
        ``(sel W2 * sigmoid(5 h)) W1`` through the Softplus(beta=5) hidden layer ``h = W1 g + b1`` (``"mlp"``).
        Equal to the authors' ``autograd.grad`` (create_graph) up to rounding, without a second backward pass inside
        the forward (so torch.compile traces it whole); tests check it against ``autograd.grad``."""
        selection = self._selection(logits)
        rows = selection @ self.classifier.weight.to(selection.dtype)
        if self.probe == "mlp":
            hidden = self.hidden_layer(f.mean(dim=self.pool_dims))
            rows = (rows * torch.sigmoid(5.0 * hidden)) @ self.hidden_layer.weight
        return rows

    def mask(self, f: torch.Tensor) -> torch.Tensor:
        """The channel mask for ``f``, (N, channels): softmax over channels of :meth:`importance` (times the channel
        count with ``mask_scale="channels"``), computed on a detached ``f`` unless the adaptive backward is on."""
        feat = f if self.adaptive else f.detach()
        logits = self.probe_logits(feat)
        mask = F.softmax(self.importance(feat, logits).float(), dim=1).to(f.dtype)
        if self.mask_scale == "channels":
            mask = mask * self.num_channels
        return mask

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != self.ndim or f.shape[self.channel_dim] != self.num_channels:
            raise ValueError(f"CIFS module expects a {self.ndim}-D activation with {self.num_channels} channels on axis "
                             f"{self.channel_dim}, got shape {tuple(f.shape)}")
        mask = self.mask(f)
        self.last_aux_logits = self.probe_logits(f)
        shape = [f.shape[0]] + [1] * (self.ndim - 1)
        shape[self.channel_dim] = self.num_channels
        return f * mask.view(shape)

    # -- the DefenseModule interface ----------------------------------------------------------------------------
    def aux_outputs(self) -> List[Optional[torch.Tensor]]:
        return [self.last_aux_logits]

    def clear_outputs(self) -> None:
        self.last_aux_logits = None

    def set_adaptive_backward(self, on: bool) -> bool:
        previous, self.adaptive = self.adaptive, bool(on)
        return previous
