"""The names an attack is configured with."""
from __future__ import annotations

from typing import Union

import torch


NORMS = ("linf", "l2")
KINDS = ("pgd", "fgsm", "cw")  # the PGD family's kinds; every registered kind: casify.attacks.ATTACK_KINDS
STARTS = ("uniform", "normal", "none")
KEEPS = ("best", "last")
ROUTINGS = ("predicted", "straight-through", "clean-predicted", "clean-soft", "labels")
STRAIGHT_THROUGH_TEMPERATURE = 1.0
Routing = Union[None, str, torch.Tensor]
