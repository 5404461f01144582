"""Threat models: what an eps means under each norm, so that L2 runs through the same attacks, plan, runner, checks,
reports and figures as L-inf without each of them special-casing it.

- ``"linf"``: every pixel moves by at most eps; radii are written and plotted in grey levels (``8/255``).
- ``"l2"``: the perturbation's Euclidean length (over all pixels and channels, pixels in [0, 1]) is at most eps;
  radii are plain numbers (``0.5``, RobustBench's CIFAR-10 L2 radius), and may exceed 1.

AutoAttack and its APGD / Square name the norms ``"Linf"`` / ``"L2"`` (:func:`autoattack_norm`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Union

import torch

# the submodules, not the package: the package imports the attack kinds, which import this module
from .spec import Attack
from .steps import Generators, draw_noise
# the norms' names and radii live with the radii (casify.core.eps), below the attacks; re-exported here
from ..core.eps import NORMS, autoattack_norm, check_norm, format_radius, parse_eps

LARGE_EPS_LINF = 128 / 255  # the constant grey image lies in every L-inf ball of this radius


def parse_radius(text: Union[str, float], norm: str = "linf") -> float:
    """A radius as written on the command line: ``8/255`` or ``0.031`` (L-inf, at most 1); under L2 also a length
    above 1 (``2.0``), since an L2 ball of radius 1 is small for a 32x32x3 image."""
    if check_norm(norm) == "linf":
        return parse_eps(text)
    s = str(text).strip()
    try:
        value = float(s.split("/")[0]) / float(s.split("/")[1]) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read the L2 radius {text!r}; write it like 0.5") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"the L2 radius {text!r} must be a finite number >= 0")
    return value


def axis_label(norm: str) -> str:
    """The x label of a robustness curve."""
    return "eps (L-inf, in /255 grey levels)" if check_norm(norm) == "linf" else "eps (L2 radius, pixels in [0, 1])"


def axis_value(eps: float, norm: str) -> float:
    """Where ``eps`` is drawn on that axis: grey levels for L-inf, the radius itself for L2."""
    return eps * 255 if check_norm(norm) == "linf" else eps


def large_eps(norm: str, numel: int) -> float:
    """A radius at which every example can be turned into the constant grey image (so accuracy must reach ~0): 128/255
    under L-inf, ``0.5 * sqrt(d)`` under L2 (the distance from any image in [0, 1]^d to the grey one is at most
    that)."""
    if check_norm(norm) == "linf":
        return LARGE_EPS_LINF
    return 0.5 * math.sqrt(max(int(numel), 1))


def with_norm(attack: Attack, norm: str) -> Attack:
    """``attack`` in the ``norm`` ball. Under L2 a CW row (``kind="cw"`` is L-inf by definition) becomes PGD on the
    same CW margin objective, so the suites keep their rows and names under both norms."""
    if check_norm(norm) == attack.norm:
        return attack
    return dataclasses.replace(attack, kind="pgd" if attack.kind == "cw" else attack.kind, norm=check_norm(norm))


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example distance in ``norm`` (float32)."""
    delta = (x_adv.float() - x.float()).flatten(1)
    if check_norm(norm) == "linf":
        return delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(delta.shape[0])
    return delta.norm(dim=1)


def ball_noise(x: torch.Tensor, eps: float, norm: str, generator: Generators) -> torch.Tensor:
    """``x`` plus noise drawn uniformly from the ``norm`` ball of radius ``eps``, clipped to [0, 1] (the noise baseline
    of the checks). One generator per example keeps an example's draw independent of its batch."""
    if check_norm(norm) == "linf":
        noise = draw_noise("rand", x.shape, generator, x.device) * 2 - 1
        return (x + eps * noise).clamp(0.0, 1.0)
    shape = (1,) + tuple(x.shape[1:])
    gens = generator if isinstance(generator, list) else [generator] * x.shape[0]
    rows = []
    for g in gens:  # a direction uniform on the sphere, a radius eps * u^(1/d): uniform in the ball
        direction = draw_noise("randn", shape, [g] if g is not None else None, x.device)
        u = draw_noise("rand", (1,), [g] if g is not None else None, x.device)
        radius = eps * float(u) ** (1.0 / max(x[0].numel(), 1))
        rows.append(direction * (radius / (direction.norm() + 1e-12)))
    return (x + torch.cat(rows).to(x.dtype)).clamp(0.0, 1.0)


__all__ = ["LARGE_EPS_LINF", "NORMS", "autoattack_norm", "axis_label", "axis_value", "ball_noise", "check_norm",
           "distance", "with_norm", "format_radius", "large_eps", "parse_radius"]
