"""The attacks that use only the deployed model's outputs: AutoAttack's own Square (Andriushchenko et al., ECCV 2020)
from the ``pyautoattack`` package, and loading AutoAttack itself. Both are blind to gradient masking, which is why
the checks compare them with the white-box rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..attacks import attack_context
from ..threat_model import autoattack_norm

SQUARE_P_INIT = 0.8
AUTOATTACK_INSTALL = "pip install pyautoattack (a casify dependency: reinstall casify-robust)"


def load_autoattack() -> Tuple[type, str]:
    """AutoAttack's class and the import name it came from: PyPI's ``pyautoattack`` (imported as ``pyautoattack``)
    or the authors' GitHub package (imported as ``autoattack``)."""
    try:
        from pyautoattack import AutoAttack
        return AutoAttack, "pyautoattack"
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack
        return AutoAttack, "autoattack"
    except ImportError:
        raise ImportError("autoattack=True needs the optional AutoAttack package, which is not installed: "
                          f"{AUTOATTACK_INSTALL}") from None


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


def autoattack_version(flavour: str) -> str:
    from importlib import metadata
    for dist in (flavour, "pyautoattack", "autoattack"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, n_queries: int = 1000,
                  p_init: float = SQUARE_P_INIT, seed: int = 0, generator: Optional[torch.Generator] = None,
                  norm: str = "linf") -> torch.Tensor:
    """Square attack (``norm``: ``"linf"`` or ``"l2"``) on the deployed model (eval mode, predicted routing), margin loss, one restart.

    AutoAttack's implementation draws from torch's global generator after seeding it with ``seed``; it runs inside
    ``torch.random.fork_rng`` so the caller's random state is untouched. ``generator``, when given, supplies the seed
    (one draw), so a per-row generator gives a per-row seed. Returns examples within the eps-ball and [0, 1].
    """
    square_class = load_square()
    if generator is not None:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
    x = x.detach().float().contiguous()  # Square .view()s its input: a channels-last batch would fail
    with attack_context(model), torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        attack = square_class(lambda inp: model(inp).float(), norm=autoattack_norm(norm), n_queries=int(n_queries), eps=float(eps),
                              p_init=float(p_init), n_restarts=1, seed=int(seed), loss="margin", device=x.device)
        x_adv = attack.perturb(x, y.long())
    return x_adv.detach().clamp(0.0, 1.0).to(x.dtype)


__all__ = ["AUTOATTACK_INSTALL", "SQUARE_P_INIT", "autoattack_version", "load_autoattack", "load_square",
           "square_attack"]
