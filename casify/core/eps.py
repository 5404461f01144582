"""Perturbation radii as people write them: ``8/255`` in pixel space [0, 1]. One parser for configs, CLI and reports."""
from __future__ import annotations

import math
from typing import Union


def parse_eps(text: Union[str, float, int]) -> float:
    """``"8/255"`` -> 0.0314, ``"0.031"`` -> 0.031. eps is in [0, 1] pixel units, so ``"8"`` is an error."""
    if isinstance(text, bool):
        raise ValueError(f"cannot read eps {text!r}; write it like 8/255 or 0.031")
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read eps {text!r}; write it like 8/255 or 0.031") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"eps {text!r} is {value:g}, outside [0, 1]: eps is in pixel units, write 8/255, not 8")
    return value


def format_eps(eps: float) -> str:
    """0.0314 -> ``"8/255"``; a radius that is no whole number of grey levels keeps three digits (``"7.91/255"``)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{k:.3g}/255"


NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    """``norm`` lower-cased (``"Linf"`` and ``"L2"``, RobustBench's spelling, are accepted), or a ValueError."""
    value = str(norm).lower()
    if value not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (or RobustBench's 'Linf' / 'L2'), got {norm!r}")
    return value


def autoattack_norm(norm: str) -> str:
    """AutoAttack's spelling of ``norm``."""
    return {"linf": "Linf", "l2": "L2"}[check_norm(norm)]


def format_radius(eps: float, norm: str = "linf") -> str:
    """``8/255`` under L-inf (grey levels); ``0.5`` under L2, where /255 would only obscure the number."""
    if check_norm(norm) == "linf":
        return format_eps(eps)
    return f"{eps:.4g}"
