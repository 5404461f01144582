"""White-box attacks in pixel space: PGD (L-inf, L2), FGSM and CW-inf, with objectives that know about CAS.

Every attack crafts its examples the way the authors' code does (``shared/docs/cas-reference.md``): the model in eval
mode (batch norm on running statistics) and every CAS module routed by its own prediction, unless the caller passes a
routing. The model's train/eval state is restored module by module afterwards, and only input gradients are taken
(``torch.autograd.grad``), so parameters' ``.grad`` are never touched and an attack can run in the middle of a training
step. Losses are computed in float32 even under autocast, and the loss gradient is rescaled per example at the model's
outputs so that input gradients do not underflow in half precision (only the gradient's direction is used). An
objective may therefore depend on the input only through the logits and auxiliary logits it is given.

Objectives are per-example losses to *maximise*; they are looked up by name (see :data:`OBJECTIVES`):

- ``"ce"``: cross-entropy of the final logits.
- ``"cas"``: CE + beta * mean over CAS modules of the auxiliary CE (the authors' adaptive attack; equals ``"ce"`` on a
  model without CAS modules).
- ``"aux:<i>"``: the CE of auxiliary head ``i`` alone (flipping one module's argmax changes its mask).
- ``"cw"``: the per-example CW margin ``min(max_{j!=y} z_j - z_y, kappa)``.
- ``"kl"``: TRADES' inner objective ``KL(p(x) || p(x'))`` with the clean probabilities (eval mode, same routing) as
  the fixed target; ``"cas_kl"`` adds beta * mean over CAS modules of the same KL per auxiliary head.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .cas import aux_logits, find_cas_modules
from .routing import route

NORMS = ("linf", "l2")
KINDS = ("pgd", "fgsm", "cw")
STARTS = ("uniform", "normal", "none")
Routing = Union[None, str, torch.Tensor]


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


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``max_{j != y} z_j - z_y``: positive exactly when the example is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def kl_per_example(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` per example, summed over classes (TRADES' ``kl_div(log q, p)``)."""
    return F.kl_div(F.log_softmax(q_logits, dim=1), F.softmax(p_logits, dim=1), reduction="none").sum(dim=1)


def _aux_mean(terms: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(terms).mean(dim=0)


@register_objective("ce")
def ce_objective(inp: ObjectiveInput) -> torch.Tensor:
    return F.cross_entropy(inp.logits, inp.y, reduction="none")


@register_objective("cas")
def cas_objective(inp: ObjectiveInput) -> torch.Tensor:
    loss = F.cross_entropy(inp.logits, inp.y, reduction="none")
    if inp.aux:
        loss = loss + inp.beta * _aux_mean([F.cross_entropy(a, inp.y, reduction="none") for a in inp.aux])
    return loss


@register_objective("cw")
def cw_objective(inp: ObjectiveInput) -> torch.Tensor:
    # CW's f6 (minimised) is max(z_y - max_{j!=y} z_j, -kappa); its negation, per example. The authors' code summed
    # the margin over the batch before the ReLU, so one confident example stopped the whole batch's attack.
    return cw_margin(inp.logits, inp.y).clamp(max=inp.kappa)


@register_objective("kl", needs_clean=True)
def kl_objective(inp: ObjectiveInput) -> torch.Tensor:
    return kl_per_example(inp.clean_logits, inp.logits)


@register_objective("cas_kl", needs_clean=True)
def cas_kl_objective(inp: ObjectiveInput) -> torch.Tensor:
    loss = kl_per_example(inp.clean_logits, inp.logits)
    if inp.aux:
        loss = loss + inp.beta * _aux_mean([kl_per_example(c, a) for c, a in zip(inp.clean_aux, inp.aux)])
    return loss


def _aux_objective(index: int) -> Objective:
    def objective(inp: ObjectiveInput) -> torch.Tensor:
        if not inp.aux:
            raise ValueError(f"objective 'aux:{index}' needs a model with CAS modules")
        if not -len(inp.aux) <= index < len(inp.aux):
            raise IndexError(f"objective 'aux:{index}': the model has {len(inp.aux)} CAS modules")
        return F.cross_entropy(inp.aux[index], inp.y, reduction="none")
    return objective


def get_objective(objective: Union[str, Objective]) -> Tuple[Objective, bool]:
    """The objective function for a name (or a callable, passed through) and whether it needs the clean reference."""
    if callable(objective):
        return objective, bool(getattr(objective, "needs_clean", False))
    if objective in OBJECTIVES:
        return OBJECTIVES[objective], objective in NEEDS_CLEAN
    if isinstance(objective, str) and objective.startswith("aux:"):
        try:
            index = int(objective[4:])
        except ValueError:
            raise ValueError(f"objective {objective!r}: expected 'aux:<module index>', e.g. 'aux:0'") from None
        return _aux_objective(index), False
    raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)} or 'aux:<i>'")


# -- running the model -----------------------------------------------------------------------------------------------
def _attack_target(model: nn.Module) -> nn.Module:
    """The module to attack: DDP / DataParallel are unwrapped, since an attack needs no gradient sync and a forward
    through DDP whose parameters never receive gradients breaks its next reduction."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


@contextlib.contextmanager
def attack_context(model: nn.Module, routing: Routing = None, y: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Eval mode plus a routing for the duration; every submodule's own train/eval flag is restored afterwards.

    ``routing``: ``None`` or ``"predicted"`` (each CAS module routes by its own prediction, the authors' protocol),
    ``"labels"`` (route by ``y``: leaks the label, for diagnostics only), or a tensor of class indices (N,) or soft
    routing weights (N, num_classes).
    """
    modes = [(m, m.training) for m in model.modules()]
    has_cas = bool(find_cas_modules(model))
    if isinstance(routing, str):
        if routing == "predicted":
            routing = None
        elif routing == "labels":
            if y is None:
                raise ValueError("routing='labels' needs the labels y")
            routing = y
        else:
            raise ValueError(f"routing must be None, 'predicted', 'labels' or a tensor, got {routing!r}")
    if routing is not None and not has_cas:
        raise ValueError("a routing was given but the model has no CAS modules")
    model.eval()
    try:
        with route(model, labels=routing) if has_cas else contextlib.nullcontext():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _forward(model: nn.Module, x: torch.Tensor, has_cas: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Final and auxiliary logits as float32, so that losses never run in half precision."""
    logits = model(x).float()
    return logits, ([a.float() for a in aux_logits(model)] if has_cas else [])


def _low_precision(model: nn.Module, x: torch.Tensor) -> bool:
    if torch.is_autocast_enabled(x.device.type) or x.dtype in (torch.float16, torch.bfloat16):
        return True
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())


def _input_grad_direction(loss: torch.Tensor, outputs: List[torch.Tensor], x_adv: torch.Tensor,
                          low_precision: bool) -> torch.Tensor:
    """Gradient of ``loss.sum()`` w.r.t. ``x_adv`` in float32, up to a positive scale per example.

    The loss's gradient w.r.t. the model's outputs (float32, exact) is rescaled per example so that its largest entry
    is 1 before it is sent back through the network: a small loss (a confident model, a saturated CE) would otherwise
    underflow to an all-zero input gradient in half precision. Examples are independent in eval mode, so the scale
    changes neither the sign nor the L2 direction. Rows still all zero in half precision are retried once with a
    larger scale; rows whose gradient is zero or not finite get a zero step.
    """
    outputs = [o for o in outputs if o.requires_grad]
    grads = torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    if not pairs:
        return torch.zeros_like(x_adv, dtype=torch.float32)
    outputs, grads = [o for o, _ in pairs], [g for _, g in pairs]
    peak = torch.stack([g.flatten(1).abs().amax(dim=1) for g in grads]).amax(dim=0)
    scale = torch.where(peak > 0, 1.0 / peak.clamp(min=torch.finfo(peak.dtype).tiny), torch.zeros_like(peak))
    direction = torch.zeros_like(x_adv, dtype=torch.float32)
    todo = torch.isfinite(peak) & (peak > 0)
    boosts = (1.0, 2.0 ** 12) if low_precision else (1.0,)
    for i, boost in enumerate(boosts):
        grad_outputs = [g * (scale * boost).view(-1, *([1] * (g.dim() - 1))) for g in grads]
        (grad,) = torch.autograd.grad(outputs, x_adv, grad_outputs=grad_outputs, retain_graph=i < len(boosts) - 1)
        flat = grad.float().flatten(1)
        good = todo & torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1)
        direction[good] = grad.float()[good]
        todo &= ~good
        if not bool(todo.any()):
            break
    return direction


def _rows_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back into the eps-ball around ``x`` and into [0, 1] (clipping to [0, 1] only shrinks the perturbation)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / (_rows_norm(delta) + 1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, start: str, start_std: float,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    if start == "none":
        return x.clone()
    device = generator.device if generator is not None else x.device
    if start == "normal":
        noise = torch.randn(x.shape, generator=generator, device=device).to(x.device) * start_std
    elif norm == "linf":
        noise = (torch.rand(x.shape, generator=generator, device=device).to(x.device) * 2 - 1) * eps
    else:
        # Uniform in the L2 ball: a uniform direction and a radius eps * u^(1/d).
        direction = torch.randn(x.shape, generator=generator, device=device).to(x.device)
        direction = direction / (_rows_norm(direction) + 1e-12)
        u = torch.rand((x.shape[0],), generator=generator, device=device).to(x.device)
        radius = eps * u.pow(1.0 / x[0].numel())
        noise = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return _project(x + noise, x, eps, norm)


def _start_kind(random_start: Union[bool, str]) -> str:
    if random_start is True:
        return "uniform"
    if random_start is False or random_start is None:
        return "none"
    if random_start not in STARTS:
        raise ValueError(f"random_start must be a bool or one of {STARTS}, got {random_start!r}")
    return random_start


def resolve_alpha(eps: float, steps: int, alpha: Optional[float]) -> float:
    """Step size: given, else eps for a single step, else Madry et al.'s 2.5 * eps / steps (2/255 for 8/255, 10)."""
    if alpha is not None:
        return float(alpha)
    return float(eps) if steps == 1 else 2.5 * float(eps) / steps


# -- attacks ---------------------------------------------------------------------------------------------------------
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
        steps: int = 10, norm: str = "linf", objective: Union[str, Objective] = "ce",
        random_start: Union[bool, str] = True, restarts: int = 1, beta: float = 2.0, kappa: float = 50.0,
        start_std: float = 0.001, routing: Routing = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Projected gradient ascent on ``objective`` within the ``norm`` ball of radius ``eps`` around ``x`` (pixels).

    Args:
        alpha: step size; by default 2.5 * eps / steps (eps for one step).
        norm: ``"linf"`` (signed-gradient steps) or ``"l2"`` (normalised-gradient steps).
        objective: a name from :data:`OBJECTIVES`, ``"aux:<i>"``, or a callable ``fn(ObjectiveInput) -> (N,)``.
        random_start: ``True``/``"uniform"`` (uniform in the ball), ``"normal"`` (``x + start_std * N(0, 1)``,
            TRADES' and MART's start), or ``False``/``"none"``.
        restarts: independent runs; per example the first run that misclassifies is kept, else the run with the
            highest objective.
        beta: weight of the auxiliary terms in ``"cas"`` / ``"cas_kl"``; kappa: CW confidence.
        routing: see :func:`attack_context`; by default CAS modules route by their own predictions.
        generator: a torch.Generator for reproducible random starts.

    Returns the adversarial examples, detached, with ``x``'s dtype.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be at least 1, got steps={steps}, restarts={restarts}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    objective_fn, needs_clean = get_objective(objective)
    start = _start_kind(random_start)
    alpha = resolve_alpha(eps, steps, alpha)
    model = _attack_target(model)
    has_cas = bool(find_cas_modules(model))
    low_precision = _low_precision(model, x)
    x_nat = x.detach().float()
    y = y.detach()

    def evaluate(x_in: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        logits, aux = _forward(model, x_in, has_cas)
        inp = ObjectiveInput(logits, aux, y, beta, kappa, clean_logits, clean_aux)
        return objective_fn(inp), [logits] + aux

    with attack_context(model, routing, y), torch.enable_grad():
        clean_logits = clean_aux = None
        if needs_clean:
            with torch.no_grad():
                clean_logits, clean_aux = _forward(model, x_nat.to(x.dtype), has_cas)
        best = best_loss = best_fooled = None
        for _ in range(restarts):
            x_adv = _random_start(x_nat, eps, norm, start, start_std, generator)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                loss, outputs = evaluate(x_adv.to(x.dtype))
                direction = _input_grad_direction(loss, outputs, x_adv, low_precision)
                with torch.no_grad():
                    if norm == "linf":
                        step = alpha * direction.sign()
                    else:
                        step = alpha * direction / (_rows_norm(direction) + 1e-12)
                    x_adv = _project(x_adv.detach() + step, x_nat, eps, norm)
            if restarts == 1:
                best = x_adv
                break
            with torch.no_grad():
                loss, outputs = evaluate(x_adv.to(x.dtype))
                fooled = outputs[0].argmax(dim=1) != y
            if best is None:
                best, best_loss, best_fooled = x_adv, loss, fooled
                continue
            take = ~best_fooled & (fooled | (loss > best_loss))
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_loss = torch.where(take, loss, best_loss)
            best_fooled = best_fooled | fooled
    return best.detach().to(x.dtype)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
         norm: str = "linf", objective: Union[str, Objective] = "ce", random_start: Union[bool, str] = False,
         beta: float = 2.0, routing: Routing = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One gradient step of size ``alpha`` (default ``eps``), projected back to the ball.

    The authors' "FGSM" is ``random_start=True`` with ``objective="cas"``: a uniform start, then one 8/255 step.
    """
    return pgd(model, x, y, eps=eps, alpha=alpha if alpha is not None else eps, steps=1, norm=norm,
               objective=objective, random_start=random_start, beta=beta, routing=routing, generator=generator)


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
           steps: int = 20, kappa: float = 50.0, random_start: Union[bool, str] = True, restarts: int = 1,
           routing: Routing = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CW-inf: L-inf PGD on the per-example margin ``min(max_{j!=y} z_j - z_y, kappa)`` of the final logits.

    ``kappa=50`` is the confidence of the authors' evaluation code; with it the attack keeps pushing an example until
    its wrong-class margin reaches 50.
    """
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", objective="cw", kappa=kappa,
               random_start=random_start, restarts=restarts, routing=routing, generator=generator)


@dataclass
class Attack:
    """A named, serialisable attack setting: ``Attack(...)(model, x, y)`` returns adversarial examples.

    ``kind`` is ``"pgd"``, ``"fgsm"`` (forces one step, one restart) or ``"cw"`` (forces L-inf and the ``"cw"``
    objective). ``eps`` and
    ``alpha`` are in pixel units; ``alpha=None`` resolves as in :func:`resolve_alpha`. :meth:`to_dict` gives the
    resolved settings for reports.
    """
    name: str = "pgd"
    kind: str = "pgd"
    eps: float = 8 / 255
    steps: int = 10
    alpha: Optional[float] = None
    norm: str = "linf"
    objective: str = "ce"
    random_start: Union[bool, str] = True
    restarts: int = 1
    beta: float = 2.0
    kappa: float = 50.0
    start_std: float = 0.001

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "fgsm":
            self.steps, self.restarts = 1, 1
        if self.kind == "cw":
            self.norm, self.objective = "linf", "cw"
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        get_objective(self.objective)
        self.random_start = _start_kind(self.random_start)
        self.alpha = resolve_alpha(self.eps, self.steps, self.alpha)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, routing: Routing = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                   objective=self.objective, random_start=self.random_start, restarts=self.restarts, beta=self.beta,
                   kappa=self.kappa, start_std=self.start_std, routing=routing, generator=generator)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Attack":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Attack fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# The authors' settings (cas-reference.md; MART's from MART's own code). The "cas" objectives equal "ce"/"kl" on a model
# without CAS modules, so the same presets serve both.
PRESETS: Dict[str, Attack] = {
    "pgd20": Attack(name="pgd20", eps=0.031, alpha=0.003, steps=20, objective="cas"),
    "fgsm": Attack(name="fgsm", kind="fgsm", eps=8 / 255, alpha=8 / 255, objective="cas", random_start=True),
    "cw20": Attack(name="cw20", kind="cw", eps=0.031, alpha=0.003, steps=20, kappa=50.0),
    "at-train": Attack(name="at-train", eps=8 / 255, alpha=2 / 255, steps=10, objective="cas"),
    "trades-train": Attack(name="trades-train", eps=0.031, alpha=0.007, steps=10, objective="cas_kl",
                           random_start="normal"),
    "mart-train": Attack(name="mart-train", eps=0.031, alpha=0.007, steps=10, objective="cas", random_start="normal"),
}


def get_attack(name: str, **overrides) -> Attack:
    """A copy of preset ``name`` from :data:`PRESETS` with ``overrides`` applied (alpha is kept unless overridden)."""
    if name not in PRESETS:
        raise ValueError(f"unknown attack preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


__all__ = ["Attack", "OBJECTIVES", "ObjectiveInput", "PRESETS", "attack_context", "cw_inf", "cw_margin", "fgsm",
           "get_attack", "get_objective", "kl_per_example", "pgd", "register_objective", "resolve_alpha"]
