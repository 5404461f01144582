"""FSR: Feature Separation and Recalibration (Kim et al., CVPR 2023), written from the paper and the authors' code
(wkim97/FSR, ``models/resnet_fsr.py``, ``models/gumbel_sigmoid.py``, ``train.py``); nothing copied.

On one activation ``f`` (N, C, H, W): a separation net (conv-BN-ReLU, conv-BN-ReLU, conv; ``hidden`` channels) gives
a robustness map; its sigmoid ``s`` goes through a Gumbel-sigmoid with temperature ``tau`` to an element-wise mask
``m``; the robust part is ``r = f * m``, the non-robust part ``nr = f * (1 - m)``; a recalibration net of the same
shape restores what is useful in the non-robust part, ``rec = nr + net(nr) * (1 - m)``; the module returns
``r + rec``. One auxiliary linear head, shared, reads the pooled ``r``, ``nr`` and ``rec`` (three heads in
:meth:`aux_outputs`, in that order). Training pushes the robust and recalibrated heads toward the label and the
non-robust head toward the model's adversarial prediction (its highest wrong class), weighted ``sep_weight``,
``sep_weight`` and ``rec_weight`` (the authors' ``lam_sep`` and ``lam_rec``).

Where casify follows the authors' code over the paper, or differs from both, and why:

- **The mask at test** (code): the Gumbel noise is replaced by its deterministic value (uniform draws of 0.5), so the
  test mask is the sharpened sigmoid ``s^(1/tau) / (s^(1/tau) + (1 - s)^(1/tau))``, not a hard threshold. casify
  switches on the code's noise by ``module.training`` (the code passes ``is_eval`` by hand, with the same effect in
  its training and test loops: noise in the update forward, none in the attack and at test).
- **The loss** (code's sum, casify's form): the authors' objective is ``CE + lam_sep (CE_r + CE_nr) + lam_rec CE_rec``;
  casify's joint term is ``final + beta x mean over heads of weight x loss``, which is the authors' objective at
  ``beta = 3`` (three heads). The non-robust head's target is the final logits' top class when it is wrong, else
  their second class (the code's ``get_pred``), detached.
- **Placement** (differs from the code): the authors insert one FSR block after the last stage; casify places it
  after any 4-D channels-first activation the user names (one module per layer, each with its own nets and head).
- **Adaptive backward** (casify's own): the authors attack the final logits with the deterministic mask. The
  sharpened mask (tau 0.1) has vanishing gradients where ``s`` saturates; :meth:`set_adaptive_backward` keeps the
  deployed forward and takes the backward through the un-sharpened ``s`` (straight-through), the BPDA row.
- **Function-preserving init** (casify's own): ``init="identity"`` zeroes the recalibration net's last convolution,
  so ``r + rec = f * m + f * (1 - m) = f`` (to rounding) at insertion; ``init="paper"`` keeps PyTorch's defaults.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .base import DefenseModule, integer, number, register_defense

GUMBEL_EPS = 1e-8  # the code's p_value: inside every log and added to tau


def _conv_net(channels: int, hidden: int, device, dtype) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, no biases (the authors' separation and
    recalibration nets)."""
    kw = {"kernel_size": 3, "padding": 1, "bias": False, "device": device, "dtype": dtype}
    return nn.Sequential(nn.Conv2d(channels, hidden, **kw), nn.BatchNorm2d(hidden, device=device, dtype=dtype),
                         nn.ReLU(), nn.Conv2d(hidden, hidden, **kw), nn.BatchNorm2d(hidden, device=device, dtype=dtype),
                         nn.ReLU(), nn.Conv2d(hidden, channels, **kw))


def gumbel_sigmoid(s: torch.Tensor, tau: float, noisy: bool) -> torch.Tensor:
    """The mask from probabilities ``s``: a two-way softmax of ``(log s + g1) / tau`` and ``(log(1 - s) + g2) / tau``
    with Gumbel noise ``g = -log(-log u)`` (``u`` uniform when ``noisy``, 0.5 otherwise); its first entry."""
    def gumbel(like):
        u = torch.rand_like(like) if noisy else torch.full_like(like, 0.5)
        return -(-(u + GUMBEL_EPS).log() + GUMBEL_EPS).log()
    keep = ((s + GUMBEL_EPS).log() + gumbel(s)) / (tau + GUMBEL_EPS)
    drop = ((1 - s + GUMBEL_EPS).log() + gumbel(s)) / (tau + GUMBEL_EPS)
    return torch.stack((keep, drop)).softmax(dim=0)[0]


@register_defense
class FSRModule(DefenseModule):
    """FSR on one channels-first activation (see the module docstring for every choice)."""

    name = "fsr"
    head_names = ("robust", "non_robust", "recalibrated")
    attack_heads = (True, False, True)  # the non-robust head learns a wrong class: no attack target
    layouts = ("channels-first",)
    OPTIONS = {"hidden": integer(64, 1, 4096), "tau": number(0.1, 0.01, 10.0),
               "sep_weight": number(1.0, 0.0, 100.0), "rec_weight": number(1.0, 0.0, 100.0)}

    def __init__(self, num_channels: int, num_classes: int, channel_dim: int = 1, ndim: int = 4,
                 init: str = "identity", hidden: int = 64, tau: float = 0.1, sep_weight: float = 1.0,
                 rec_weight: float = 1.0, device=None, dtype=None):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"FSR init must be one of {self.INITS}, got {init!r}")
        if ndim != 4 or channel_dim % ndim != 1:
            raise ValueError("FSR works on 4-D channels-first activations (N, C, H, W): its nets are convolutions; "
                             f"got ndim={ndim}, channel_dim={channel_dim}")
        self.num_channels, self.num_classes, self.ndim, self.channel_dim = int(num_channels), int(num_classes), 4, 1
        self.hidden, self.tau = int(hidden), float(tau)
        self.sep_weight, self.rec_weight = float(sep_weight), float(rec_weight)
        self.separation = _conv_net(self.num_channels, self.hidden, device, dtype)
        self.recalibration = _conv_net(self.num_channels, self.hidden, device, dtype)
        self.classifier = nn.Linear(self.num_channels, self.num_classes, device=device, dtype=dtype)
        self.init = init
        if init == "identity":
            with torch.no_grad():
                self.recalibration[-1].weight.zero_()
        self.adaptive = False
        self.last_aux_logits: List[Optional[torch.Tensor]] = [None, None, None]

    def __getstate__(self):
        state = super().__getstate__()
        state["last_aux_logits"] = [None, None, None]
        return state

    def extra_repr(self) -> str:
        return f"channels={self.num_channels}, classes={self.num_classes}, hidden={self.hidden}, tau={self.tau}"

    def mask(self, f: torch.Tensor) -> torch.Tensor:
        """The element-wise mask ``m`` of ``f`` (noisy in training mode, deterministic in eval mode)."""
        s = torch.sigmoid(self.separation(f))
        m = gumbel_sigmoid(s, self.tau, noisy=self.training)
        if self.adaptive and not self.training:
            m = m.detach() + (s - s.detach())  # deployed values, the backward of the un-sharpened sigmoid
        return m

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != 4 or f.shape[1] != self.num_channels:
            raise ValueError(f"FSR module expects a 4-D (N, C, H, W) activation with {self.num_channels} channels, "
                             f"got shape {tuple(f.shape)}")
        m = self.mask(f)
        robust = f * m
        non_robust = f * (1 - m)
        recalibrated = non_robust + self.recalibration(non_robust) * (1 - m)
        self.last_aux_logits = [self.classifier(t.mean(dim=(2, 3))) for t in (robust, non_robust, recalibrated)]
        return robust + recalibrated

    # -- the DefenseModule interface ----------------------------------------------------------------------------
    def aux_outputs(self) -> List[Optional[torch.Tensor]]:
        return list(self.last_aux_logits)

    def clear_outputs(self) -> None:
        self.last_aux_logits = [None, None, None]

    def aux_targets(self, y: torch.Tensor, final_logits: torch.Tensor) -> List[torch.Tensor]:
        top2 = final_logits.detach().topk(2, dim=1).indices
        highest_wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
        return [y, highest_wrong, y]

    @property
    def aux_weights(self) -> List[float]:
        return [self.sep_weight, self.sep_weight, self.rec_weight]

    def set_adaptive_backward(self, on: bool) -> bool:
        previous, self.adaptive = self.adaptive, bool(on)
        return previous
