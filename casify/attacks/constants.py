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
# The training attacks a run chooses with `train.attack` (each is the attack kind of that name): PGD (multi-step), and
# the single-step ones: FGSM without a random start (Goodfellow et al.; it overfits catastrophically, which the guard's
# test provokes), FGSM with a random start (fgsm_rs.py) and N-FGSM (n_fgsm.py).
TRAINING_ATTACKS = ("pgd", "fgsm", "fgsm_rs", "n_fgsm")
SINGLE_STEP_ATTACKS = ("fgsm", "fgsm_rs", "n_fgsm")
