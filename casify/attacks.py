"""White-box attacks in pixel space: PGD (L-inf, L2), FGSM and CW-inf, with objectives and routings that know about CAS.

Every attack crafts its examples the way the authors' code does (``shared/docs/cas-reference.md``): the model in eval
mode (batch norm on running statistics) and every CAS module routed by its own prediction, unless the caller passes a
routing. The model's train/eval state is restored module by module afterwards, and only input gradients are taken
(``torch.autograd.grad``), so parameters' ``.grad`` are never touched and an attack can run in the middle of a training
step. Losses are computed in float32 even under autocast, and the loss gradient is rescaled per example at the model's
outputs so that input gradients do not underflow in half precision (only the gradient's direction is used). An
objective may therefore depend on the input only through the logits and auxiliary logits it is given; the logits may
themselves depend on the auxiliary logits (a straight-through routing does that).

**Best iterate.** CAS routes by an argmax, so the loss surface is piecewise and the last PGD iterate is often not the
best one: an iterate that fooled the model can be followed by one that does not. By default (``keep="best"``) every
iterative attack scores each iterate on the *deployed* model (eval mode, each CAS module routed by its own prediction,
``argmax(logits) != y``) and returns, per example, an iterate that fools it if any iterate did (the one with the
largest wrong-class margin), else the iterate with the smallest margin of the true class (the later one on ties).
The scoring reuses the forward that computes the gradient when the attack crafts with the deployed routing; restarts
keep the per-example worst over all restarts. ``keep="last"`` returns the last iterate (the training presets use it).

Objectives are per-example losses to *maximise*; they are looked up by name (see :data:`OBJECTIVES`):

- ``"ce"``: cross-entropy of the final logits.
- ``"cas"``: CE + beta * mean over CAS modules of the auxiliary CE (the authors' adaptive attack; equals ``"ce"`` on a
  model without CAS modules).
- ``"aux:<i>"``: the CE of auxiliary head ``i`` alone (flipping one module's argmax changes its mask).
- ``"cw"``: the per-example CW margin ``min(max_{j!=y} z_j - z_y, kappa)`` of the final logits.
- ``"cw_cas"``: the CW margin of the final logits + beta * mean over CAS modules of the same margin of each auxiliary
  head (equals ``"cw"`` on a model without CAS modules); ``"cw_aux:<i>"``: the margin of auxiliary head ``i`` alone.
- ``"kl"``: TRADES' inner objective ``KL(p(x) || p(x'))`` with the clean probabilities (eval mode, same routing) as
  the fixed target; ``"cas_kl"`` adds beta * mean over CAS modules of the same KL per auxiliary head.

Routings (``routing=``) for crafting; scoring always uses the deployed routing:

- ``None`` / ``"predicted"``: each CAS module routes by its own prediction (as deployed);
- ``"straight-through"``: the forward routes by the argmax as deployed, the backward treats each module's mask as the
  softmax mixture of weight rows (BPDA; the gradient reaches the class choice that the argmax blocks);
- ``"clean-predicted"`` / ``"clean-soft"``: fixed for the whole attack to the model's clean predicted class, or to
  the softmax mixture of rows from the clean auxiliary logits (mean over modules);
- ``"labels"`` (leaks the label; diagnostics only), or a tensor of class indices (N,) / soft weights (N, classes).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .cas import aux_logits, find_cas_modules
from .defenses import attack_aux_logits, routed_modules
from .host_sync import host_reads_free
from .inputs import check_attack_inputs, check_eps, read_radius
from .routing import route

NORMS = ("linf", "l2")
KINDS = ("pgd", "fgsm", "cw")
STARTS = ("uniform", "normal", "none")
KEEPS = ("best", "last")
ROUTINGS = ("predicted", "straight-through", "clean-predicted", "clean-soft", "labels")
STRAIGHT_THROUGH_TEMPERATURE = 1.0
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


def class_mask(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes) bool, True at each example's class. Not ``F.one_hot``: it reads ``y.min()`` and ``y.max()``
    on the host to check the range, a device sync per call (casify.host_sync); ``scatter_`` checks on the device."""
    return torch.zeros(y.shape[0], num_classes, dtype=torch.bool, device=y.device).scatter_(1, y[:, None], True)


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``max_{j != y} z_j - z_y``: positive exactly when the example is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(class_mask(y, logits.shape[1]), float("-inf"))
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


@register_objective("cw_cas")
def cw_cas_objective(inp: ObjectiveInput) -> torch.Tensor:
    # The adaptive CW-inf: the final logits' margin plus beta * the mean margin of the auxiliary heads, each capped at
    # kappa per example. Flipping a head's argmax changes its mask, so the heads' margins are part of the attack.
    loss = cw_margin(inp.logits, inp.y).clamp(max=inp.kappa)
    if inp.aux:
        loss = loss + inp.beta * _aux_mean([cw_margin(a, inp.y).clamp(max=inp.kappa) for a in inp.aux])
    return loss


@register_objective("kl", needs_clean=True)
def kl_objective(inp: ObjectiveInput) -> torch.Tensor:
    return kl_per_example(inp.clean_logits, inp.logits)


@register_objective("cas_kl", needs_clean=True)
def cas_kl_objective(inp: ObjectiveInput) -> torch.Tensor:
    loss = kl_per_example(inp.clean_logits, inp.logits)
    if inp.aux:
        loss = loss + inp.beta * _aux_mean([kl_per_example(c, a) for c, a in zip(inp.clean_aux, inp.aux)])
    return loss


def _aux_objective(index: int, margin: bool = False) -> Objective:
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
            return _aux_objective(index, margin), False
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


# -- running the model -----------------------------------------------------------------------------------------------
def _attack_target(model: nn.Module) -> nn.Module:
    """The module to attack: DDP / DataParallel are unwrapped, since an attack needs no gradient sync and a forward
    through DDP whose parameters never receive gradients breaks its next reduction."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class _StraightThrough:
    """Per-module override of the routing: the forward masks with the argmax row exactly as deployed (one-hot plus an
    exact zero), the backward sees the softmax mixture of rows, so d mask / d aux logits is the softmax's Jacobian
    times the weight matrix. ``active`` switches it off for the deployed scoring forwards."""

    def __init__(self, model: nn.Module, temperature: float = STRAIGHT_THROUGH_TEMPERATURE):
        self.all_modules = list(find_cas_modules(model))
        self.modules = [m for m in self.all_modules if m.routed]
        self.temperature = float(temperature)
        self.active = True

    def _router(self, module):
        def routing_for(aux: torch.Tensor) -> torch.Tensor:
            hard = module.routing_for(aux)
            if not self.active or hard.dim() != 1:
                return hard
            soft = F.softmax(aux.float() / self.temperature, dim=1)
            return class_mask(hard, soft.shape[1]).to(soft.dtype) + (soft - soft.detach())
        return routing_for

    def __enter__(self):
        # every defense's own straight-through / BPDA backward (CIFS: through the probe gradient; FSR: through the
        # un-sharpened mask; CAS has none beyond the routing below)
        self._adaptive = [m.set_adaptive_backward(True) for m in self.all_modules]
        self._previous = [m.set_router(self._router(m)) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for m, previous in zip(self.modules, self._previous):
            m.set_router(previous)
        for m, previous in zip(self.all_modules, self._adaptive):
            m.set_adaptive_backward(previous)
        return False


@contextlib.contextmanager
def attack_context(model: nn.Module, routing: Routing = None, y: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Eval mode plus a routing for the duration; every submodule's own train/eval flag is restored afterwards.

    ``routing``: ``None`` or ``"predicted"`` (each CAS module routes by its own prediction, the authors' protocol),
    ``"straight-through"`` (the deployed forward, a softmax-mixture backward through each module's class choice),
    ``"labels"`` (route by ``y``: leaks the label, for diagnostics only), or a tensor of class indices (N,) or soft
    routing weights (N, num_classes). (``"clean-predicted"`` / ``"clean-soft"`` are resolved to tensors by the
    attacks, which see the clean input; see :func:`clean_routing`.)
    """
    modes = [(m, m.training) for m in model.modules()]
    has_cas = bool(find_cas_modules(model))
    has_routed = bool(routed_modules(model))
    straight = False
    if isinstance(routing, str):
        if routing == "predicted":
            routing = None
        elif routing == "straight-through":
            routing, straight = None, True
        elif routing == "labels":
            if y is None:
                raise ValueError("routing='labels' needs the labels y")
            routing = y
        elif routing in ("clean-predicted", "clean-soft"):
            raise ValueError(f"routing {routing!r} depends on the clean input: resolve it with "
                             "casify.attacks.clean_routing(model, x, kind) first (the attacks do)")
        else:
            raise ValueError(f"routing must be None, one of {ROUTINGS} or a tensor, got {routing!r}")
    if straight and not has_cas:
        raise ValueError("a routing was given but the model has no CAS modules")
    if routing is not None and not has_routed:
        raise ValueError("a routing was given but the model has no routed defense modules (CAS, CIFS)"
                         if has_cas else "a routing was given but the model has no CAS modules")
    model.eval()
    try:
        with route(model, labels=routing) if has_routed else contextlib.nullcontext():
            with _StraightThrough(model) if straight else contextlib.nullcontext():
                yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def clean_routing(model: nn.Module, x: torch.Tensor, kind: str = "clean-predicted") -> torch.Tensor:
    """A fixed routing from one clean deployed forward (detached): ``"clean-predicted"``, the model's own predicted
    class (N,); ``"clean-soft"``, the mean over CAS modules of the softmax of each module's auxiliary logits
    (N, num_classes), a mixture of weight rows (``casify.route`` takes one routing for all modules, hence the mean)."""
    if kind not in ("clean-predicted", "clean-soft"):
        raise ValueError(f"kind must be 'clean-predicted' or 'clean-soft', got {kind!r}")
    model = _attack_target(model)
    if not routed_modules(model):
        raise ValueError("a routing was given but the model has no routed defense modules (CAS, CIFS)")
    with attack_context(model):
        logits = model(x)
        if kind == "clean-predicted":
            return logits.argmax(dim=1)
        return torch.stack([F.softmax(a.float(), dim=1) for a in aux_logits(model)]).mean(dim=0)


def _forward(model: nn.Module, x: torch.Tensor, has_cas: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Final and auxiliary logits as float32, so that losses never run in half precision."""
    logits = model(x).float()
    return logits, ([a.float() for a in attack_aux_logits(model)] if has_cas else [])


def _low_precision(model: nn.Module, x: torch.Tensor) -> bool:
    if torch.is_autocast_enabled(x.device.type) or x.dtype in (torch.float16, torch.bfloat16):
        return True
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())


def _output_grads(objective_fn: Objective, outputs: List[torch.Tensor], inp_kwargs: dict
                  ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """The objective's value and its *partial* gradients w.r.t. each output (final logits, then auxiliary logits).

    The objective runs on detached copies of the outputs, so its gradient w.r.t. one output does not include paths
    through another: sending these back from all outputs at once (:func:`_input_grad_direction`) then counts every
    path exactly once, also when the final logits depend on the auxiliary logits (a straight-through routing, a head
    that reads them), and the model's graph is traversed once.
    """
    leaves = [o.detach().requires_grad_(True) for o in outputs]
    with torch.enable_grad():
        loss = objective_fn(ObjectiveInput(leaves[0], leaves[1:], **inp_kwargs))
        if not loss.requires_grad:
            return loss.detach(), [None] * len(outputs)
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    return loss.detach(), list(grads)


def _input_grad_direction(outputs: List[torch.Tensor], grads: List[Optional[torch.Tensor]], x_adv: torch.Tensor,
                          low_precision: bool) -> torch.Tensor:
    """Gradient of the objective w.r.t. ``x_adv`` in float32, up to a positive scale per example.

    ``grads`` are the objective's partial gradients w.r.t. ``outputs`` (float32, exact). They are rescaled per example
    so that the largest entry is 1 before they are sent back through the network: a small loss (a confident model, a
    saturated CE) would otherwise underflow to an all-zero input gradient in half precision. Examples are independent
    in eval mode, so the scale changes neither the sign nor the L2 direction. Rows still all zero in half precision are
    retried once with a larger scale; rows whose gradient is zero or not finite get a zero step.

    The result is a float32 tensor the caller owns (the input gradient itself where autograd handed back a float32
    buffer of its own: no zero-filled buffer lives through the backward), so the attack may overwrite it in place.
    """
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    if not pairs:
        return torch.zeros_like(x_adv, dtype=torch.float32)
    outputs, grads = [o for o, _ in pairs], [g for _, g in pairs]
    peak = torch.stack([g.flatten(1).abs().amax(dim=1) for g in grads]).amax(dim=0)
    scale = torch.where(peak > 0, 1.0 / peak.clamp(min=torch.finfo(peak.dtype).tiny), torch.zeros_like(peak))
    direction = None
    todo = torch.isfinite(peak) & (peak > 0)
    boosts = (1.0, 2.0 ** 12) if low_precision else (1.0,)
    for i, boost in enumerate(boosts):
        grad_outputs = [(g * (scale * boost).view(-1, *([1] * (g.dim() - 1)))).to(o.dtype)
                        for o, g in zip(outputs, grads)]
        (grad,) = torch.autograd.grad(outputs, x_adv, grad_outputs=grad_outputs, retain_graph=i < len(boosts) - 1,
                                      allow_unused=True)
        del grad_outputs
        if grad is None:
            break
        good = todo & _rows_finite_nonzero(grad)
        if direction is None:
            direction = _owned_float32(grad)
            del grad
            _select_rows_(direction, ~good, 0.0)
        else:  # the retry: only the rows that were all zero, copied in
            _select_rows_(direction, good, grad)
        todo &= ~good
        if i == len(boosts) - 1 or not bool(todo.any()):  # a retry costs a backward: worth one sync to skip
            break
    if direction is None:
        return torch.zeros_like(x_adv, dtype=torch.float32)
    return direction


def _select_rows_(dst: torch.Tensor, take: torch.Tensor, src: Union[torch.Tensor, float]) -> None:
    """``dst[i] = src[i]`` (or ``src`` itself, a number) for every row ``i`` where ``take[i]``, in place.

    On a GPU this is always one masked pass: asking first whether all or no rows are taken would make the host wait
    for the device at every attack step (casify.host_sync; tests/test_host_syncs.py). Where the answer costs nothing
    (CPU) the common cases skip the masked pass: every row taken is a plain copy, none is nothing.
    """
    if host_reads_free(dst.device):
        if bool(take.all()):
            dst.copy_(src) if isinstance(src, torch.Tensor) else dst.fill_(src)
            return
        if not bool(take.any()):
            return
    rows = take.view(-1, *([1] * (dst.dim() - 1)))
    if isinstance(src, torch.Tensor):
        torch.where(rows, src, dst, out=dst)
    else:
        dst.masked_fill_(rows, src)


def _rows_finite_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Per row: every entry finite and some entry non-zero (one reduction pass, no full-size temporary)."""
    low, high = t.flatten(1).aminmax(dim=1)  # a NaN anywhere in a row makes both NaN
    return torch.isfinite(low) & torch.isfinite(high) & ((low != 0) | (high != 0))


def _owned_float32(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` itself when it is a dense float32 buffer (autograd's output, which nothing else references; it may be
    a view of autograd's own temporary, as behind a flatten), else a float32 copy: an expanded gradient (behind a sum
    or a broadcast) must not be written in place, and a half-precision one is widened."""
    dense = grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
    if grad.dtype == torch.float32 and dense:
        return grad
    return grad.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


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


def _project_(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """:func:`_project` in place on ``x_adv`` (a float32 buffer the attack owns; ``x`` may be half precision: it is
    promoted exactly). The same float32 operations in the same order as out of place, so bit-identical results."""
    delta = x_adv.sub_(x)
    if norm == "linf":
        delta.clamp_(-eps, eps)
    else:
        delta.mul_((eps / (_rows_norm(delta) + 1e-12)).clamp(max=1.0))
    return delta.add_(x).clamp_(0.0, 1.0)


def _step_(x_adv: torch.Tensor, direction: torch.Tensor, alpha: float, norm: str) -> None:
    """``x_adv += alpha * sign(direction)`` (linf) or ``alpha * direction / ||direction||`` (l2), in place; the
    direction buffer is overwritten with the step."""
    if norm == "linf":
        step = direction.sign_().mul_(alpha)
    else:
        length = _rows_norm(direction) + 1e-12  # of the direction, before it is scaled
        step = direction.mul_(alpha).div_(length)
    x_adv.add_(step)


Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def draw_noise(kind: str, shape, generator: Generators, device) -> torch.Tensor:
    """``torch.rand`` / ``torch.randn`` of ``shape`` (batch first) from one generator, or from one generator per
    example (each draws its own row, so an example's noise does not depend on the rest of the batch)."""
    fn = torch.rand if kind == "rand" else torch.randn
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return fn(shape, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} per-example generators for {shape[0]} examples")
    return torch.stack([fn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]).to(device)


def _random_start(x: torch.Tensor, eps: float, norm: str, start: str, start_std: float,
                  generator: Generators) -> torch.Tensor:
    """The first iterate, a new float32 buffer (``x`` may be half precision; the noise and the iterate are not)."""
    if start == "none":
        return x.to(torch.float32, copy=True)
    if start == "normal":
        noise = draw_noise("randn", x.shape, generator, x.device).mul_(start_std)
    elif norm == "linf":
        noise = draw_noise("rand", x.shape, generator, x.device).mul_(2).sub_(1).mul_(eps)
    else:
        # Uniform in the L2 ball: a uniform direction and a radius eps * u^(1/d).
        if generator is None or isinstance(generator, torch.Generator):
            direction = draw_noise("randn", x.shape, generator, x.device)
            u = draw_noise("rand", (x.shape[0],), generator, x.device)
        else:  # per example: its direction, then its radius, from its own generator
            pairs = [(draw_noise("randn", (1,) + tuple(x.shape[1:]), [g], x.device), draw_noise("rand", (1,), [g], x.device))
                     for g in generator]
            direction, u = torch.cat([d for d, _ in pairs]), torch.cat([r for _, r in pairs])
            del pairs
        direction.div_(_rows_norm(direction) + 1e-12)
        radius = eps * u.pow(1.0 / x[0].numel())
        noise = direction.mul_(radius.view(-1, *([1] * (x.dim() - 1))))
    return _project_(noise.add_(x), x, eps, norm)  # noise + x == x + noise: float addition commutes


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
        return read_radius(alpha, "alpha")
    return float(eps) if steps == 1 else 2.5 * float(eps) / steps


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


class _BestIterate:
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
        _select_rows_(self.x, take, x_it)
        self.margin = torch.where(take, margin, self.margin)
        self.fooled = self.fooled | fooled
        self.first_fooled = torch.where((self.first_fooled < 0) & fooled, torch.full_like(self.first_fooled, index),
                                        self.first_fooled)
        if last:
            self.fooled_last = self.fooled_last | fooled

    def info(self) -> AttackInfo:
        return AttackInfo(self.fooled.clone(), self.margin.clone(), self.fooled_last.clone(),
                          self.first_fooled >= 0, self.first_fooled.clone())


def _resolve_routing(model: nn.Module, x: torch.Tensor, routing: Routing) -> Routing:
    if isinstance(routing, str) and routing in ("clean-predicted", "clean-soft"):
        return clean_routing(model, x, routing)
    return routing


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: Optional[float] = None,
        steps: int = 10, norm: str = "linf", objective: Union[str, Objective] = "ce",
        random_start: Union[bool, str] = True, restarts: int = 1, beta: float = 2.0, kappa: float = 50.0,
        start_std: float = 0.001, routing: Routing = None, generator: Generators = None,
        keep: str = "best", return_info: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, AttackInfo]]:
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
    start = _start_kind(random_start)
    alpha = resolve_alpha(eps, steps, alpha)
    model = _attack_target(model)
    has_cas = bool(find_cas_modules(model))
    low_precision = _low_precision(model, x)
    # The centre of the ball. The iterate, the step and the projection are float32 even when x or the model is half
    # precision (a bf16 iterate could not move by alpha near 1); a half-precision x stays as it is and is promoted
    # exactly inside each float32 op, so no float32 copy of the clean batch is kept (a float32 x is used as is).
    x_nat = x.detach() if x.dtype in (torch.float16, torch.bfloat16) else x.detach().float()
    y = y.detach()
    routing = _resolve_routing(model, x.detach(), routing)
    # The gradient forward is the deployed forward (and scores the iterate for free) unless the crafting routing
    # differs.
    shared_scoring = routing is None or (isinstance(routing, str) and routing == "predicted")
    track_every = keep == "best" or return_info
    inp_kwargs = dict(y=y, beta=beta, kappa=kappa)

    def deployed_margin(x_in: torch.Tensor, logits: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if logits is None:
            with torch.no_grad(), _deployed_routing(model, has_cas):
                logits = model(x_in.to(x.dtype)).float()
        logits = logits.detach()
        return cw_margin(logits, y), logits.argmax(dim=1) != y

    with attack_context(model, routing, y), torch.enable_grad():
        if needs_clean:
            with torch.no_grad():
                clean_logits, clean_aux = _forward(model, x_nat.to(x.dtype), has_cas)
            inp_kwargs.update(clean_logits=clean_logits, clean_aux=clean_aux)
        every = None  # fed every iterate: the best iterate, and what the attack saw
        lasts = None  # fed the last iterate of each restart: keep="last" with restarts
        x_adv = None
        for r in range(restarts):
            x_adv = _random_start(x_nat, eps, norm, start, start_std, generator)
            if track_every and every is None:
                every = _BestIterate(x_adv)
            # Memory: besides the model's activations, a step holds the iterate, the best iterate (keep="best") and
            # the input gradient, which becomes the step and is added in place; the projection runs in place too.
            # That is what torchattacks' PGD holds (its clone of the clean batch, its iterate, its gradient), so the
            # peaks match; keep="last" holds one buffer fewer.
            for k in range(steps):
                x_adv.requires_grad_(True)
                logits, aux = _forward(model, x_adv.to(x.dtype), has_cas)
                outputs = [logits] + aux
                if track_every:
                    margin, fooled = deployed_margin(x_adv.detach(), logits if shared_scoring else None)
                    every.update(x_adv.detach(), margin, fooled, r * (steps + 1) + k, last=False)
                _, grads = _output_grads(objective_fn, outputs, inp_kwargs)
                direction = _input_grad_direction(outputs, grads, x_adv, low_precision)
                del logits, aux, outputs, grads  # the graph is gone before the step
                x_adv = x_adv.detach()  # a float32 buffer of this attack's own (nothing else references it)
                with torch.no_grad():
                    _step_(x_adv, direction, alpha, norm)
                    del direction
                    _project_(x_adv, x_nat, eps, norm)
            if track_every or restarts > 1:
                # The final iterate has had no forward yet: scoring it costs one no-grad forward per restart, which
                # is why keep="best" takes ~3% longer than a last-iterate PGD (10 steps; benchmarks/cost_ratios.py).
                margin, fooled = deployed_margin(x_adv, None)
                if track_every:
                    every.update(x_adv, margin, fooled, r * (steps + 1) + steps, last=True)
                if keep == "last":
                    if lasts is None:
                        lasts = _BestIterate(x_adv)
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


@contextlib.contextmanager
def _deployed_routing(model: nn.Module, has_cas: bool) -> Iterator[None]:
    """Inside an attack: score on the deployed model (predicted routing, no straight-through override)."""
    if not has_cas:
        yield
        return
    modules = routed_modules(model)
    if not modules:
        yield
        return
    overrides = [m.set_router(None) for m in modules]
    try:
        with route(model, labels=None):
            yield
    finally:
        for m, fn in zip(modules, overrides):
            m.set_router(fn)


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


def _is_cw_objective(objective: str) -> bool:
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
    if not _is_cw_objective(objective):
        raise ValueError(f"cw_inf objective must be one of {CW_OBJECTIVES} or 'cw_aux:<i>', got {objective!r}")
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", objective=objective, kappa=kappa,
               beta=beta, random_start=random_start, restarts=restarts, routing=routing, generator=generator,
               keep=keep, return_info=return_info)


@dataclass
class Attack:
    """A named, serialisable attack setting: ``Attack(...)(model, x, y)`` returns adversarial examples.

    ``kind`` is ``"pgd"``, ``"fgsm"`` (forces one step, one restart) or ``"cw"`` (forces L-inf and a CW margin
    objective: ``"ce"`` becomes ``"cw"``, ``"cas"`` becomes ``"cw_cas"``, ``"aux:<i>"`` becomes ``"cw_aux:<i>"``).
    ``eps`` and ``alpha`` are in pixel units; ``alpha=None`` resolves as in :func:`resolve_alpha`. ``routing`` is how
    CAS modules route while crafting (``None`` = as deployed, ``"straight-through"``, ``"clean-predicted"``,
    ``"clean-soft"``); ``keep`` is ``"best"`` (best iterate, the default) or ``"last"``. :meth:`to_dict` gives the
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
    routing: Optional[str] = None
    keep: str = "best"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "fgsm":
            self.steps, self.restarts = 1, 1
        if self.kind == "cw":
            self.norm = "linf"
            if not _is_cw_objective(self.objective):
                if isinstance(self.objective, str) and self.objective.startswith("aux:"):
                    self.objective = "cw_" + self.objective
                else:
                    self.objective = "cw_cas" if self.objective == "cas" else "cw"
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        get_objective(self.objective)
        if self.routing == "predicted":
            self.routing = None
        if self.routing is not None and self.routing not in ROUTINGS:
            raise ValueError(f"routing must be None or one of {ROUTINGS}, got {self.routing!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")
        self.random_start = _start_kind(self.random_start)
        # "8/255" as the README writes radii; a number is checked where the attack runs (pgd's entry), since the
        # evaluation plan builds its rows first and sets their norm after (threat_model.with_norm)
        self.eps = check_eps(self.eps, norm=self.norm) if isinstance(self.eps, str) else float(self.eps)
        self.alpha = resolve_alpha(self.eps, self.steps, self.alpha)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, routing: Routing = None,
                 generator: Generators = None, return_info: bool = False):
        """Craft adversarial examples; ``routing`` (a tensor or a name) overrides the spec's own routing."""
        return pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                   objective=self.objective, random_start=self.random_start, restarts=self.restarts, beta=self.beta,
                   kappa=self.kappa, start_std=self.start_std, routing=self.routing if routing is None else routing,
                   generator=generator, keep=self.keep, return_info=return_info)

    @property
    def sees_aux(self) -> bool:
        """Whether the objective or the routing reaches the auxiliary heads (on a model with CAS modules)."""
        return sees_aux(self.objective) or self.routing in ("straight-through", "clean-soft")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Attack":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Attack fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# The authors' settings (cas-reference.md; MART's from MART's own code). The "cas" objectives equal "ce"/"cw"/"kl" on a
# model without CAS modules, so the same presets serve both. The evaluation presets keep the best iterate; the
# training presets keep the last one, as the authors' training loops do.
PRESETS: Dict[str, Attack] = {
    "pgd20": Attack(name="pgd20", eps=0.031, alpha=0.003, steps=20, objective="cas"),
    "fgsm": Attack(name="fgsm", kind="fgsm", eps=8 / 255, alpha=8 / 255, objective="cas", random_start=True),
    "cw20": Attack(name="cw20", kind="cw", eps=0.031, alpha=0.003, steps=20, kappa=50.0, objective="cw_cas"),
    "pgd20-st": Attack(name="pgd20-st", eps=0.031, alpha=0.003, steps=20, objective="cas", routing="straight-through"),
    "at-train": Attack(name="at-train", eps=8 / 255, alpha=2 / 255, steps=10, objective="cas", keep="last"),
    "trades-train": Attack(name="trades-train", eps=0.031, alpha=0.007, steps=10, objective="cas_kl",
                           random_start="normal", keep="last"),
    "mart-train": Attack(name="mart-train", eps=0.031, alpha=0.007, steps=10, objective="cas", random_start="normal",
                         keep="last"),
}


def get_attack(name: str, **overrides) -> Attack:
    """A copy of preset ``name`` from :data:`PRESETS` with ``overrides`` applied (alpha is kept unless overridden)."""
    if name not in PRESETS:
        raise ValueError(f"unknown attack preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


__all__ = ["Attack", "AttackInfo", "KEEPS", "OBJECTIVES", "ObjectiveInput", "PRESETS", "ROUTINGS", "attack_context",
           "clean_routing", "cw_inf", "cw_margin", "fgsm", "get_attack", "get_objective", "kl_per_example",
           "objective_tag", "pgd", "register_objective", "resolve_alpha", "sees_aux"]
