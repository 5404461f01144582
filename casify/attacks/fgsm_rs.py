"""FGSM with a random start (FGSM-RS; Wong, Rice and Kolter, "Fast is better than free", ICLR 2020): the single-step
training attack that made FGSM adversarial training work.

A uniform start in the eps-ball, one signed-gradient step of alpha = 1.25 eps (the paper's choice, 10/255 for 8/255),
then back into the eps-ball and [0, 1]: one forward and backward per example, about half the cost of PGD-3 AT's
attack. It is :func:`casify.attacks.pgd` with one step, so every objective (the CAS adaptive ``"cas"``, TRADES' ``"kl"``)
and routing works as for PGD. Its known failure, catastrophic overfitting at larger eps, is what the Trainer's guard
watches for (:mod:`casify.train.overfit_guard`)."""
from __future__ import annotations

from ..core.inputs import check_eps
from .kinds import register_attack_kind
from .pgd import PGD

ALPHA_OVER_EPS = 1.25  # the paper's step (Wong et al. 2020, section 4; their train_fgsm.py: alpha 10/255 at eps 8/255)


def eps_value(attack) -> float:
    """The spec's eps as a number before the spec has parsed it (``"8/255"`` as the README writes radii)."""
    return check_eps(attack.eps, norm=attack.norm) if isinstance(attack.eps, str) else float(attack.eps)


@register_attack_kind("fgsm_rs")
class FGSMRandomStart(PGD):
    """One step from a uniform start in the eps-ball; ``alpha`` defaults to 1.25 eps."""

    def prepare(self, attack) -> None:
        attack.steps, attack.restarts = 1, 1
        attack.random_start = "uniform"
        if attack.alpha is None:
            attack.alpha = ALPHA_OVER_EPS * eps_value(attack)

    def describe(self, attack, defended: bool) -> str:
        return "FGSM-RS (Wong et al. 2020): " + super().describe(attack, defended).replace(
            "1 steps of", "1 step of")
