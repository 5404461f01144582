"""N-FGSM (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training", NeurIPS 2022):
noise of 2 eps around the input, one step of eps, and no projection back to the eps-ball.

The authors found that a stronger noise (uniform in [-k eps, k eps], k = 2) and *not* clipping the perturbation to the
eps-ball avoid catastrophic overfitting at larger eps with the cost of FGSM (one forward and backward). Its examples
therefore lie up to (k + 1) eps from the input (clipped to [0, 1] only): it is a training attack, and the evaluation
refuses it (``stays_in_ball = False``), since an accuracy measured outside the threat model would mislead.

Options (``Attack.options``): ``noise`` (k, the noise radius in units of eps; 0 means no noise) and ``clip`` (the
radius, in units of eps, the perturbation is projected to; 0 means no projection, the paper's default). It runs through
:func:`casify.attacks.pgd` (one step, ``start_eps = k eps``, ``project_eps`` infinite), so every objective and routing
works as for PGD."""
from __future__ import annotations

import math

from ..defenses.base import number
from .fgsm_rs import eps_value
from .kinds import register_attack_kind
from .pgd import PGD, pgd

NOISE_OVER_EPS = 2.0  # k = 2: uniform noise in [-2 eps, 2 eps] (the paper's default; their train.py --unif 2)
ALPHA_OVER_EPS = 1.0  # a step of eps (their train.py --alpha 8 at --epsilon 8)


@register_attack_kind("n_fgsm")
class NFGSM(PGD):
    """One step of ``alpha`` (default eps) from uniform noise of ``noise`` eps, projected into [0, 1] only."""
    OPTIONS = {"noise": number(NOISE_OVER_EPS, 0.0, 16.0), "clip": number(0.0, 0.0, 16.0)}
    stays_in_ball = False

    def prepare(self, attack) -> None:
        attack.steps, attack.restarts = 1, 1
        attack.random_start = "uniform"
        if attack.alpha is None:
            attack.alpha = ALPHA_OVER_EPS * eps_value(attack)

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        noise, clip = attack.options["noise"], attack.options["clip"]
        return pgd(model, x, y, eps=attack.eps, alpha=attack.alpha, steps=1, norm=attack.norm,
                   objective=attack.objective, random_start="uniform" if noise > 0 else "none", restarts=1,
                   beta=attack.beta, kappa=attack.kappa, routing=attack.routing if routing is None else routing,
                   generator=generator, keep=attack.keep, return_info=return_info,
                   start_eps=noise * attack.eps, project_eps=clip * attack.eps if clip > 0 else math.inf)

    def describe(self, attack, defended: bool) -> str:
        noise, clip = attack.options["noise"], attack.options["clip"]
        where = f"projected to {clip:g} eps" if clip > 0 else "not projected to the eps-ball (only to [0, 1])"
        return (f"N-FGSM (de Jorge et al. 2022): uniform noise of {noise:g} eps, 1 step of alpha {attack.alpha:.5f}, "
                f"{where}, objective {attack.objective}; a training attack")
