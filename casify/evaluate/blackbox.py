"""The attacks that use only the deployed model's outputs, as the evaluation sees them: AutoAttack's own Square
(Andriushchenko et al., ECCV 2020) and AutoAttack itself, both from the ``pyautoattack`` package (the attack kinds
``"square"`` and ``"autoattack"``, :mod:`casify.attacks`), and AutoAttack's version for the report. Both are blind to
gradient masking, which is why the checks compare them with the white-box rows.
"""
from __future__ import annotations

# Square and AutoAttack's loader live with the attack kinds (casify.attacks.square / .autoattack); the evaluation
# plan loads AutoAttack through this module's name (so a test or a caller can stand in for it)
from ..attacks.autoattack import load_autoattack
from ..attacks.square import AUTOATTACK_INSTALL, SQUARE_P_INIT, load_square, square_attack


def autoattack_version(flavour: str) -> str:
    from importlib import metadata
    for dist in (flavour, "pyautoattack", "autoattack"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


__all__ = ["AUTOATTACK_INSTALL", "SQUARE_P_INIT", "autoattack_version", "load_autoattack", "load_square",
           "square_attack"]
