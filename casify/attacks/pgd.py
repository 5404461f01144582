"""The iterative attacks: PGD (best iterate, restarts), FGSM and CW-inf, and their attack kinds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..defenses import find_defense_modules
from ..core.eps import format_radius
from ..core.inputs import check_attack_inputs
from .constants import KEEPS, NORMS, Routing
from .context import attack_context, attack_target, clean_routing, deployed_routing, forward_logits, is_low_precision
from .kinds import AttackKind, register_attack_kind
from .objectives import Objective, cw_margin, get_objective, predicted_correctly, sees_aux
from .steps import (Generators, input_grad_direction, output_grads, project_, random_start_point, resolve_alpha,
                    select_rows_, start_kind, step_)

# -- attacks ---------------------------------------------------------------------------------------------------------
@dataclass
class AttackInfo:
    """What an attack saw of the deployed model (eval mode, each CAS module routed by its own prediction) while it ran,
    per example: ``fooled``, whether the returned example is misclassified; ``margin``, its CW margin
    ``max_{j!=y} z_j - z_y``; ``fooled_last``, whether the last iterate of some restart was (what a last-iterate
    attack would report); ``fooled_any``, whether any iterate was; ``first_fooled``, the index of the first iterate
    that was (counted over restarts, ``restart * (steps + 1) + step``, the random start being step 0), -1 if none.
    Filled only from the attack's own scoring forwards, so it describes the model the attack was given."""
    fooled: torch.Tensor
    margin: torch.Tensor
    fooled_last: torch.Tensor
    fooled_any: torch.Tensor
    first_fooled: torch.Tensor


class BestIterate:
    """Per example, the iterate that fools the deployed model with the largest margin, else the one with the
    largest (least negative) margin; a later iterate wins ties, so a flat margin returns the last iterate.

    ``x`` is the one buffer that best-iterate tracking costs over a last-iterate attack; it is updated in place
    (a masked copy), so an update allocates nothing of the batch's size."""

    def __init__(self, x: torch.Tensor):
        n = x.shape[0]
        self.x = x.clone()
        self.fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.margin = torch.full((n,), float("-inf"), device=x.device)
        self.fooled_last = torch.zeros_like(self.fooled)
        self.first_fooled = torch.full((n,), -1, dtype=torch.long, device=x.device)
        self.seen = False

    def update(self, x_it: torch.Tensor, margin: torch.Tensor, fooled: torch.Tensor, index: int, last: bool) -> None:
        take = (fooled & ~self.fooled) | ((fooled == self.fooled) & (margin >= self.margin))
        if not self.seen:
            take = torch.ones_like(take)
            self.seen = True
        select_rows_(self.x, take, x_it)
        self.margin = torch.where(take, margin, self.margin)
        self.fooled = self.fooled | fooled
        self.first_fooled = torch.where((self.first_fooled < 0) & fooled, torch.full_like(self.first_fooled, index),
                                        self.first_fooled)
        if last:
            self.fooled_last = self.fooled_last | fooled

    def info(self) -> AttackInfo:
        return AttackInfo(self.fooled.clone(), self.margin.clone(), self.fooled_last.clone(),
                          self.first_fooled >= 0, self.first_fooled.clone())


def resolve_routing(model: nn.Module, x: torch.Tensor, routing: Routing) -> Routing:
    if isinstance(routing, str) and routing in ("clean-predicted", "clean-soft"):
        return clean_routing(model, x, routing)
    return routing


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
        steps: int = 10, norm: str = "linf", objective: Union[str, Objective] = "ce",
        random_start: Union[bool, str] = True, restarts: int = 1, beta: float = 2.0, kappa: float = 50.0,
        start_std: float = 0.001, routing: Routing = None, generator: Generators = None,
        keep: str = "best", return_info: bool = False, start_eps: Optional[float] = None,
        project_eps: Optional[float] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, AttackInfo]]:
    """Projected gradient ascent on ``objective`` within the ``norm`` ball of radius ``eps`` around ``x`` (pixels).

    Args:
        alpha: step size; by default 2.5 * eps / steps (eps for one step).
        norm: ``"linf"`` (signed-gradient steps) or ``"l2"`` (normalised-gradient steps).
        objective: a name from :data:`OBJECTIVES`, ``"aux:<i>"``, ``"cw_aux:<i>"``, or a callable
            ``fn(ObjectiveInput) -> (N,)``.
        random_start: ``True``/``"uniform"`` (uniform in the ball), ``"normal"`` (``x + start_std * N(0, 1)``,
            TRADES' and MART's start), or ``False``/``"none"``.
        restarts: independent runs, each from its own random start; per example the worst over all of them is kept.
        beta: weight of the auxiliary terms in ``"cas"`` / ``"cw_cas"`` / ``"cas_kl"``; kappa: CW confidence.
        routing: how CAS modules route while crafting (see :func:`attack_context` and the module doc); by default
            each routes by its own prediction. Scoring always uses the deployed routing.
        generator: a torch.Generator for reproducible random starts, or one generator per example (then an
            example's starts do not depend on the rest of the batch: what :func:`casify.evaluate.evaluate` does).
        keep: ``"best"`` (default): per example, an iterate that fools the deployed model if any did, else the one
            closest to fooling it (see the module doc); ``"last"``: the last iterate (with restarts, the first restart
            whose last iterate fools, else the one with the largest margin).
        return_info: also return an :class:`AttackInfo` (costs one scoring forward per iterate where it is not free).
        start_eps: the radius of the uniform random start (default ``eps``); project_eps: the radius of the ball each
            iterate is projected back into (default ``eps``; ``math.inf``: only into [0, 1]). Single-step training
            attacks set them (N-FGSM: noise of 2 eps, no projection to the eps-ball; ``casify/attacks/n_fgsm.py``).

    Returns the adversarial examples, detached, with ``x``'s dtype (and the :class:`AttackInfo` if asked for).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be at least 1, got steps={steps}, restarts={restarts}")
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    eps = check_attack_inputs(model, x, y, eps, norm)  # 0..255 pixels, eps=8, labels past the last class: errors
    objective_fn, needs_clean = get_objective(objective)
    start = start_kind(random_start)
    alpha = resolve_alpha(eps, steps, alpha)
    start_eps = eps if start_eps is None else float(start_eps)
    project_eps = eps if project_eps is None else float(project_eps)
    if not (start_eps >= 0 and project_eps > 0):
        raise ValueError(f"start_eps must be >= 0 and project_eps > 0, got {start_eps}, {project_eps}")
    model = attack_target(model)
    defended = bool(find_defense_modules(model))
    low_precision = is_low_precision(model, x)
    # The centre of the ball. The iterate, the step and the projection are float32 even when x or the model is half
    # precision (a bf16 iterate could not move by alpha near 1); a half-precision x stays as it is and is promoted
    # exactly inside each float32 op, so no float32 copy of the clean batch is kept (a float32 x is used as is).
    x_nat = x.detach() if x.dtype in (torch.float16, torch.bfloat16) else x.detach().float()
    y = y.detach()
    routing = resolve_routing(model, x.detach(), routing)
    # The gradient forward is the deployed forward (and scores the iterate for free) unless the crafting routing
    # differs.
    shared_scoring = routing is None or (isinstance(routing, str) and routing == "predicted")
    track_every = keep == "best" or return_info
    inp_kwargs = dict(y=y, beta=beta, kappa=kappa)

    def deployed_margin(x_in: torch.Tensor, logits: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if logits is None:
            with torch.no_grad(), deployed_routing(model, defended):
                logits = model(x_in.to(x.dtype)).float()
        logits = logits.detach()
        return cw_margin(logits, y), ~predicted_correctly(logits, y)  # NaN / inf logits: fooled

    with attack_context(model, routing, y), torch.enable_grad():
        if needs_clean:
            with torch.no_grad():
                clean_logits, clean_aux = forward_logits(model, x_nat.to(x.dtype), defended)
            inp_kwargs.update(clean_logits=clean_logits, clean_aux=clean_aux)
        every = None  # fed every iterate: the best iterate, and what the attack saw
        lasts = None  # fed the last iterate of each restart: keep="last" with restarts
        x_adv = None
        for r in range(restarts):
            x_adv = random_start_point(x_nat, start_eps, norm, start, start_std, generator)
            if track_every and every is None:
                every = BestIterate(x_adv)
            # Memory: besides the model's activations, a step holds the iterate, the best iterate (keep="best") and
            # the input gradient, which becomes the step and is added in place; the projection runs in place too.
            # That is what torchattacks' PGD holds (its clone of the clean batch, its iterate, its gradient), so the
            # peaks match; keep="last" holds one buffer fewer.
            for k in range(steps):
                x_adv.requires_grad_(True)
                logits, aux = forward_logits(model, x_adv.to(x.dtype), defended)
                outputs = [logits] + aux
                if track_every:
                    margin, fooled = deployed_margin(x_adv.detach(), logits if shared_scoring else None)
                    every.update(x_adv.detach(), margin, fooled, r * (steps + 1) + k, last=False)
                _, grads = output_grads(objective_fn, outputs, inp_kwargs)
                direction = input_grad_direction(outputs, grads, x_adv, low_precision)
                del logits, aux, outputs, grads  # the graph is gone before the step
                x_adv = x_adv.detach()  # a float32 buffer of this attack's own (nothing else references it)
                with torch.no_grad():
                    step_(x_adv, direction, alpha, norm)
                    del direction
                    project_(x_adv, x_nat, project_eps, norm)
            if track_every or restarts > 1:
                # The final iterate has had no forward yet: scoring it costs one no-grad forward per restart, which
                # is why keep="best" takes ~3% longer than a last-iterate PGD (10 steps; benchmarks/cost_ratios.py).
                margin, fooled = deployed_margin(x_adv, None)
                if track_every:
                    every.update(x_adv, margin, fooled, r * (steps + 1) + steps, last=True)
                if keep == "last":
                    if lasts is None:
                        lasts = BestIterate(x_adv)
                    lasts.update(x_adv, margin, fooled, r * (steps + 1) + steps, last=True)
    if keep == "best":
        result, info = every.x, (every.info() if return_info else None)
    else:
        result = lasts.x if lasts is not None else x_adv
        info = None
        if return_info:
            info = every.info()
            info.fooled, info.margin = lasts.fooled.clone(), lasts.margin.clone()
    result = result.detach().to(x.dtype)
    if return_info:
        return result, info
    return result





def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
         norm: str = "linf", objective: Union[str, Objective] = "ce", random_start: Union[bool, str] = False,
         beta: float = 2.0, routing: Routing = None, generator: Generators = None,
         keep: str = "best", return_info: bool = False):
    """One gradient step of size ``alpha`` (default ``eps``), projected back to the ball.

    The authors' "FGSM" is ``random_start=True`` with ``objective="cas"``: a uniform start, then one 8/255 step.
    With ``keep="best"`` the start competes with the step (per example, whichever fools the deployed model).
    """
    return pgd(model, x, y, eps=eps, alpha=alpha if alpha is not None else eps, steps=1, norm=norm,
               objective=objective, random_start=random_start, beta=beta, routing=routing, generator=generator,
               keep=keep, return_info=return_info)


CW_OBJECTIVES = ("cw", "cw_cas")


def is_cw_objective(objective: str) -> bool:
    return objective in CW_OBJECTIVES or (isinstance(objective, str) and objective.startswith("cw_aux:"))


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
           steps: int = 20, kappa: float = 50.0, random_start: Union[bool, str] = True, restarts: int = 1,
           objective: str = "cw_cas", beta: float = 2.0, routing: Routing = None,
           generator: Generators = None, keep: str = "best", return_info: bool = False):
    """CW-inf: L-inf PGD on the per-example margin ``min(max_{j!=y} z_j - z_y, kappa)``.

    ``objective``: ``"cw_cas"`` (default: the final logits' margin + beta * the mean margin of the auxiliary heads,
    the adaptive CW; the plain ``"cw"`` on a model without CAS modules), ``"cw"`` (final logits only) or
    ``"cw_aux:<i>"`` (auxiliary head ``i`` alone). ``kappa=50`` is the confidence of the authors' evaluation code;
    with it the attack keeps pushing an example until its wrong-class margin reaches 50.
    """
    if not is_cw_objective(objective):
        raise ValueError(f"cw_inf objective must be one of {CW_OBJECTIVES} or 'cw_aux:<i>', got {objective!r}")
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", objective=objective, kappa=kappa,
               beta=beta, random_start=random_start, restarts=restarts, routing=routing, generator=generator,
               keep=keep, return_info=return_info)


# -- the PGD family as attack kinds (casify.attacks.kinds) -----------------------------------------------------------
@register_attack_kind("pgd")
class PGD(AttackKind):
    """:func:`pgd` on any objective and routing (the suites' PGD rows, and CW's through the ``"cw"`` kind)."""

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        return pgd(model, x, y, eps=attack.eps, alpha=attack.alpha, steps=attack.steps, norm=attack.norm,
                   objective=attack.objective, random_start=attack.random_start, restarts=attack.restarts,
                   beta=attack.beta, kappa=attack.kappa, start_std=attack.start_std,
                   routing=attack.routing if routing is None else routing, generator=generator, keep=attack.keep,
                   return_info=return_info)

    def iterative(self, attack) -> bool:
        return attack.steps > 1

    def sees_aux(self, attack) -> bool:
        return sees_aux(attack.objective) or attack.routing in ("straight-through", "clean-soft")

    def describe(self, attack, defended: bool) -> str:
        a = attack
        if a.kind == "fgsm":
            text = f"1 step of {format_radius(a.alpha, a.norm)}" + (" after a random start" if a.random_start != "none"
                                                               else "")
        else:
            text = f"{a.steps} steps of {format_radius(a.alpha, a.norm)}" + (f", {a.restarts} restarts"
                                                                       if a.restarts > 1 else "")
            text += f", {a.random_start} start" if a.random_start != "none" else ", no random start"
        if a.objective.startswith("cw"):
            text += f", CW margin (kappa {a.kappa:g})" + {"cw": " of the final logits",
                                                          "cw_cas": f" + {a.beta:g} * mean auxiliary margin"}.get(
                a.objective, f" of auxiliary head {a.objective.split(':')[-1]}")
        else:
            text += f", objective {a.objective}"
        if a.norm != "linf":
            text += f", {a.norm} ball"
        if a.routing == "clean-predicted":
            text += "; crafted with every module routed by the clean predicted class"
        elif a.routing == "clean-soft":
            text += "; crafted with a soft routing: softmax of the clean aux logits (mean over modules)"
        elif a.routing == "straight-through":
            text += "; straight-through routing (argmax forward, softmax-mixture backward)"
        text += "; best iterate" if a.keep == "best" else "; last iterate"
        return text

    def settings(self, attack, defended: bool) -> dict:
        settings = attack.to_dict()
        settings["routing"] = attack.routing or "predicted (by each module, as deployed)"
        settings["eps_str"] = format_radius(attack.eps, attack.norm)
        return settings


@register_attack_kind("fgsm")
class FGSM(PGD):
    """One step, one restart (:func:`fgsm`)."""

    def prepare(self, attack) -> None:
        attack.steps, attack.restarts = 1, 1


@register_attack_kind("cw")
class CW(PGD):
    """CW-inf (:func:`cw_inf`): L-inf PGD on a CW margin objective (``"ce"`` becomes ``"cw"``, ``"cas"``
    ``"cw_cas"``, ``"aux:<i>"`` ``"cw_aux:<i>"``)."""
    norms = ("linf",)

    def prepare(self, attack) -> None:
        attack.norm = "linf"
        if not is_cw_objective(attack.objective):
            if isinstance(attack.objective, str) and attack.objective.startswith("aux:"):
                attack.objective = "cw_" + attack.objective
            else:
                attack.objective = "cw_cas" if attack.objective == "cas" else "cw"
