"""The pieces of one gradient step: loss gradients at the outputs, the input direction, steps, projections and random
starts (L-inf and L2)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..core.host_sync import host_reads_free
from ..core.inputs import read_radius
from .constants import STARTS
from .objectives import Objective, ObjectiveInput

def output_grads(objective_fn: Objective, outputs: List[torch.Tensor], inp_kwargs: dict
                  ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """The objective's value and its *partial* gradients w.r.t. each output (final logits, then auxiliary logits).

    The objective runs on detached copies of the outputs, so its gradient w.r.t. one output does not include paths
    through another: sending these back from all outputs at once (:func:`input_grad_direction`) then counts every
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


def input_grad_direction(outputs: List[torch.Tensor], grads: List[Optional[torch.Tensor]], x_adv: torch.Tensor,
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
        good = todo & rows_finite_nonzero(grad)
        if direction is None:
            direction = owned_float32(grad)
            del grad
            select_rows_(direction, ~good, 0.0)
        else:  # the retry: only the rows that were all zero, copied in
            select_rows_(direction, good, grad)
        todo &= ~good
        if i == len(boosts) - 1 or not bool(todo.any()):  # a retry costs a backward: worth one sync to skip
            break
    if direction is None:
        return torch.zeros_like(x_adv, dtype=torch.float32)
    return direction


def select_rows_(dst: torch.Tensor, take: torch.Tensor, src: Union[torch.Tensor, float]) -> None:
    """``dst[i] = src[i]`` (or ``src`` itself, a number) for every row ``i`` where ``take[i]``, in place.

    On a GPU this is always one masked pass: asking first whether all or no rows are taken would make the host wait
    for the device at every attack step (casify.core.host_sync; tests/test_host_syncs.py). Where the answer costs nothing
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


def rows_finite_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Per row: every entry finite and some entry non-zero (one reduction pass, no full-size temporary)."""
    low, high = t.flatten(1).aminmax(dim=1)  # a NaN anywhere in a row makes both NaN
    return torch.isfinite(low) & torch.isfinite(high) & ((low != 0) | (high != 0))


def owned_float32(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` itself when it is a dense float32 buffer (autograd's output, which nothing else references; it may be
    a view of autograd's own temporary, as behind a flatten), else a float32 copy: an expanded gradient (behind a sum
    or a broadcast) must not be written in place, and a half-precision one is widened."""
    dense = grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
    if grad.dtype == torch.float32 and dense:
        return grad
    return grad.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def rows_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back into the eps-ball around ``x`` and into [0, 1] (clipping to [0, 1] only shrinks the perturbation)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / (rows_norm(delta) + 1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def project_(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """:func:`project` in place on ``x_adv`` (a float32 buffer the attack owns; ``x`` may be half precision: it is
    promoted exactly). The same float32 operations in the same order as out of place, so bit-identical results."""
    delta = x_adv.sub_(x)
    if norm == "linf":
        delta.clamp_(-eps, eps)
    else:
        delta.mul_((eps / (rows_norm(delta) + 1e-12)).clamp(max=1.0))
    return delta.add_(x).clamp_(0.0, 1.0)


def step_(x_adv: torch.Tensor, direction: torch.Tensor, alpha: float, norm: str) -> None:
    """``x_adv += alpha * sign(direction)`` (linf) or ``alpha * direction / ||direction||`` (l2), in place; the
    direction buffer is overwritten with the step."""
    if norm == "linf":
        step = direction.sign_().mul_(alpha)
    else:
        length = rows_norm(direction) + 1e-12  # of the direction, before it is scaled
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


def random_start_point(x: torch.Tensor, eps: float, norm: str, start: str, start_std: float,
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
        direction.div_(rows_norm(direction) + 1e-12)
        radius = eps * u.pow(1.0 / x[0].numel())
        noise = direction.mul_(radius.view(-1, *([1] * (x.dim() - 1))))
    return project_(noise.add_(x), x, eps, norm)  # noise + x == x + noise: float addition commutes


def start_kind(random_start: Union[bool, str]) -> str:
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
