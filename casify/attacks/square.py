"""AutoAttack's own Square attack (Andriushchenko et al., ECCV 2020) from the ``pyautoattack`` package, as the attack
kind ``"square"``: it uses only the deployed model's outputs, so it is blind to gradient masking (which is why the
evaluation's checks compare it with the white-box rows)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..defenses.base import number
from ..core.eps import autoattack_norm, format_radius
from .context import attack_context
from .kinds import AttackKind, register_attack_kind

SQUARE_P_INIT = 0.8
AUTOATTACK_INSTALL = "pip install pyautoattack (a casify dependency: reinstall casify-robust)"


def load_square() -> type:
    """AutoAttack's ``SquareAttack`` class (either distribution of AutoAttack)."""
    try:
        from pyautoattack.square import SquareAttack
        return SquareAttack
    except ImportError:
        pass
    try:
        from autoattack.square import SquareAttack
        return SquareAttack
    except ImportError:
        raise ImportError("square_queries > 0 runs AutoAttack's Square attack, whose package is not installed: "
                          f"{AUTOATTACK_INSTALL}") from None


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, n_queries: int = 1000,
                  p_init: float = SQUARE_P_INIT, seed: int = 0, generator: Optional[torch.Generator] = None,
                  norm: str = "linf") -> torch.Tensor:
    """Square attack (``norm``: ``"linf"`` or ``"l2"``) on the deployed model (eval mode, predicted routing), margin
    loss, one restart.

    AutoAttack's implementation draws from torch's global generator after seeding it with ``seed``; it runs inside
    ``torch.random.fork_rng`` so the caller's random state is untouched. ``generator``, when given, supplies the seed
    (one draw), so a per-row generator gives a per-row seed. Returns examples within the eps-ball and [0, 1].
    """
    square_class = load_square()
    if isinstance(generator, (list, tuple)):
        raise ValueError("Square draws one seed for the whole batch: pass one torch.Generator, not one per example")
    if generator is not None:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    x = x.detach().float().contiguous()  # Square .view()s its input: a channels-last batch would fail
    with attack_context(model), torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        attack = square_class(lambda inp: model(inp).float(), norm=autoattack_norm(norm), n_queries=int(n_queries),
                              eps=float(eps), p_init=float(p_init), n_restarts=1, seed=int(seed), loss="margin",
                              device=x.device)
        x_adv = attack.perturb(x, y.long())
    return x_adv.detach().clamp(0.0, 1.0).to(x.dtype)


@register_attack_kind("square")
class Square(AttackKind):
    """``steps`` queries of Square on the margin loss (``objective="margin"``; the Attack's default ``"ce"`` reads as
    that), ``options["p_init"]`` the initial square size. One seed per batch, drawn from the row's generator."""
    objectives = ("margin",)
    routings = ()
    per_example_seed = False
    cascade = "black-box"
    row_kind = "black-box"
    OPTIONS = {"p_init": number(SQUARE_P_INIT, 0.0, 1.0)}

    def prepare(self, attack) -> None:
        if attack.objective == "ce":
            attack.objective = "margin"

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        x_adv = square_attack(model, x, y, eps=attack.eps, n_queries=attack.steps, p_init=attack.options["p_init"],
                              generator=generator, norm=attack.norm)
        return (x_adv, None) if return_info else x_adv

    def row_objective(self, attack, defended: bool) -> str:
        return ""  # black-box: none of casify's objectives

    def describe(self, attack, defended: bool) -> str:
        return f"Square attack, {attack.steps} queries, margin loss, p_init {attack.options['p_init']}"

    def settings(self, attack, defended: bool) -> dict:
        return {"n_queries": int(attack.steps), "p_init": attack.options["p_init"], "loss": "margin",
                "norm": attack.norm, "eps_str": format_radius(attack.eps, attack.norm)}


__all__ = ["AUTOATTACK_INSTALL", "SQUARE_P_INIT", "Square", "load_square", "square_attack"]
