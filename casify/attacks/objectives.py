"""Attack objectives: per-example losses to maximise, looked up by name (:data:`OBJECTIVES`); the joint ones see the
auxiliary heads a defense exposes to attacks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F


# -- objectives ------------------------------------------------------------------------------------------------------
@dataclass
class ObjectiveInput:
    """What an objective sees: float32 outputs of one forward on ``x_adv``, the labels, and the clean reference.

    ``clean_logits`` / ``clean_aux`` are filled only for objectives that declare ``needs_clean`` (the KL ones): they
    are computed once, without gradient, on the unperturbed input under the attack's mode and routing.
    """
    logits: torch.Tensor
    aux: List[torch.Tensor]
    y: torch.Tensor
    beta: float = 2.0
    kappa: float = 50.0
    clean_logits: Optional[torch.Tensor] = None
    clean_aux: Optional[List[torch.Tensor]] = None


Objective = Callable[[ObjectiveInput], torch.Tensor]
OBJECTIVES: Dict[str, Objective] = {}
NEEDS_CLEAN = set()


def register_objective(name: str, needs_clean: bool = False) -> Callable[[Objective], Objective]:
    """Register a per-example objective ``fn(ObjectiveInput) -> (N,) float32`` under ``name``."""
    def decorator(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        if needs_clean:
            NEEDS_CLEAN.add(name)
        return fn
    return decorator


def class_mask(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes) bool, True at each example's class. Not ``F.one_hot``: it reads ``y.min()`` and ``y.max()``
    on the host to check the range, a device sync per call (casify.core.host_sync); ``scatter_`` checks on the device."""
    return torch.zeros(y.shape[0], num_classes, dtype=torch.bool, device=y.device).scatter_(1, y[:, None], True)


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``max_{j != y} z_j - z_y``: positive exactly when the example is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(class_mask(y, logits.shape[1]), float("-inf"))
    return others.amax(dim=1) - true


def predicted_correctly(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: ``argmax == y`` and every logit finite. ``argmax`` over a NaN row returns 0, so without the
    second condition a model that outputs NaN would be credited with every class-0 example: a broken output is
    never a correct one."""
    return (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)


def kl_per_example(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` per example, summed over classes (TRADES' ``kl_div(log q, p)``)."""
    return F.kl_div(F.log_softmax(q_logits, dim=1), F.softmax(p_logits, dim=1), reduction="none").sum(dim=1)


def aux_mean(terms: List[torch.Tensor]) -> torch.Tensor:
    """The per-example mean over the heads' terms; a 0 that broadcasts for a defense without auxiliary heads."""
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean(dim=0)


@register_objective("ce")
def ce_objective(inp: ObjectiveInput) -> torch.Tensor:
    return F.cross_entropy(inp.logits, inp.y, reduction="none")


@register_objective("cas")
def cas_objective(inp: ObjectiveInput) -> torch.Tensor:
    loss = F.cross_entropy(inp.logits, inp.y, reduction="none")
    if inp.aux:
        loss = loss + inp.beta * aux_mean([F.cross_entropy(a, inp.y, reduction="none") for a in inp.aux])
    return loss


@register_objective("cw")
def cw_objective(inp: ObjectiveInput) -> torch.Tensor:
    # CW's f6 (minimised) is max(z_y - max_{j!=y} z_j, -kappa); its negation, per example. The authors' code summed
    # the margin over the batch before the ReLU, so one confident example stopped the whole batch's attack.
    return cw_margin(inp.logits, inp.y).clamp(max=inp.kappa)


@register_objective("cw_cas")
def cw_cas_objective(inp: ObjectiveInput) -> torch.Tensor:
    # The adaptive CW-inf: the final logits' margin plus beta * the mean margin of the auxiliary heads, each capped at
    # kappa per example. Flipping a head's argmax changes its mask, so the heads' margins are part of the attack.
    loss = cw_margin(inp.logits, inp.y).clamp(max=inp.kappa)
    if inp.aux:
        loss = loss + inp.beta * aux_mean([cw_margin(a, inp.y).clamp(max=inp.kappa) for a in inp.aux])
    return loss


@register_objective("kl", needs_clean=True)
def kl_objective(inp: ObjectiveInput) -> torch.Tensor:
    return kl_per_example(inp.clean_logits, inp.logits)


@register_objective("cas_kl", needs_clean=True)
def cas_kl_objective(inp: ObjectiveInput) -> torch.Tensor:
    loss = kl_per_example(inp.clean_logits, inp.logits)
    if inp.aux:
        loss = loss + inp.beta * aux_mean([kl_per_example(c, a) for c, a in zip(inp.clean_aux, inp.aux)])
    return loss


def aux_objective(index: int, margin: bool = False) -> Objective:
    name = f"{'cw_aux' if margin else 'aux'}:{index}"

    def objective(inp: ObjectiveInput) -> torch.Tensor:
        if not inp.aux:
            raise ValueError(f"objective {name!r} needs a model with CAS modules")
        if not -len(inp.aux) <= index < len(inp.aux):
            raise IndexError(f"objective {name!r}: the model has {len(inp.aux)} CAS modules")
        if margin:
            return cw_margin(inp.aux[index], inp.y).clamp(max=inp.kappa)
        return F.cross_entropy(inp.aux[index], inp.y, reduction="none")
    return objective


def get_objective(objective: Union[str, Objective]) -> Tuple[Objective, bool]:
    """The objective function for a name (or a callable, passed through) and whether it needs the clean reference."""
    if callable(objective):
        return objective, bool(getattr(objective, "needs_clean", False))
    if objective in OBJECTIVES:
        return OBJECTIVES[objective], objective in NEEDS_CLEAN
    for prefix, margin in (("aux:", False), ("cw_aux:", True)):
        if isinstance(objective, str) and objective.startswith(prefix):
            try:
                index = int(objective[len(prefix):])
            except ValueError:
                raise ValueError(f"objective {objective!r}: expected '{prefix}<module index>', "
                                 f"e.g. '{prefix}0'") from None
            return aux_objective(index, margin), False
    raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}, 'aux:<i>' or 'cw_aux:<i>'")


def sees_aux(objective: Union[str, Objective]) -> bool:
    """Whether a named objective depends on the auxiliary heads (a callable is assumed to; ``"ce"``, ``"cw"`` and
    ``"kl"`` see only the final logits)."""
    return callable(objective) or objective not in ("ce", "cw", "kl")


def objective_tag(objective: Union[str, Objective]) -> str:
    """How a row is named by its objective on a CAS model: ``"cas"`` (the joint objectives ``cas``, ``cw_cas``,
    ``cas_kl``), ``"aux:<i>"`` (one head, CE or margin), ``"final-logits"`` (``ce``, ``cw``, ``kl``), ``"custom"``."""
    if callable(objective):
        return "custom"
    if objective in ("cas", "cw_cas", "cas_kl"):
        return "cas"
    if objective in ("ce", "cw", "kl"):
        return "final-logits"
    if objective.startswith("cw_aux:"):
        return "aux:" + objective[len("cw_aux:"):]
    return objective
