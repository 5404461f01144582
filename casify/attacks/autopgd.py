"""AutoAttack's APGD and APGD-T on objectives that see the auxiliary heads and the routing.

AutoAttack's own APGD (``pyautoattack``) computes its losses on the final logits, which on a CAS model is the
weak, masked objective. Its APGD classes also accept a model *adapter* (``is_tf_model=True``, the interface it
uses for TensorFlow models): an object whose ``get_logits_loss_grad_*`` methods return the logits, the per-example
loss and its input gradient. :class:`ObjectiveAdapter` is such an adapter for a casify model, so APGD's step-size
schedule, momentum and checkpoints (not re-implemented here) run on casify's objectives:

- untargeted (``apgd``): the joint CE (``"cas"``: CE + beta * mean auxiliary CE) or the joint DLR (``"dlr_cas"``:
  DLR of the final logits + beta * mean DLR of the heads; DLR is Croce & Hein's scale-invariant margin), crafted with
  the deployed routing or the straight-through one;
- routing-consistent targeted (``apgd_targeted``): for each of the ``n_targets`` classes the clean model ranks
  highest after the true one, every CAS module is routed to the target ``t`` while crafting (the mask of row ``t``)
  and the final and auxiliary logits are all pushed towards ``t`` (targeted DLR). An example that ends up predicted
  as ``t`` is routed to ``t`` by the deployed model too, so what was crafted is what is scored.

The logits an adapter returns are always the deployed model's (eval mode, each module routed by its own
prediction): APGD keeps, per example, the first iterate those logits misclassify, so the returned example is a
best iterate on the model as deployed. Random starts come from casify's per-example generators (APGD is given
``x_init``), so an example's result does not depend on its batch; APGD's own seeding of torch's global generator runs
inside ``torch.random.fork_rng``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..defenses import attack_aux_logits, find_defense_modules, routed_modules
# the submodules, not the package: the package registers the APGD kinds (apgd.py), which import this module
from .context import attack_context
from .objectives import class_mask, cw_margin, predicted_correctly
from .pgd import AttackInfo
from .steps import Generators, draw_noise
from .threat_model import autoattack_norm, ball_noise, check_norm

APGD_INSTALL = "pip install pyautoattack"
LOSSES = ("cas", "dlr_cas", "ce")


def load_apgd():
    """AutoAttack's ``APGDAttack`` and ``APGDAttack_targeted`` (PyPI ``pyautoattack`` or the authors' package)."""
    try:
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        return APGDAttack, APGDAttack_targeted
    except ImportError:
        pass
    try:
        from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        return APGDAttack, APGDAttack_targeted
    except ImportError:
        raise ImportError(f"APGD rows run AutoAttack's APGD, whose package is not installed: {APGD_INSTALL}") from None


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference-of-logits ratio (ICML 2020), per example, larger = closer to misclassified:
    ``-(z_y - max_{j!=y} z_j) / (z_(1) - z_(3))`` with ``z_(k)`` the k-th largest logit. Needs 3 classes or more."""
    top = logits.sort(dim=1, descending=True).values
    return cw_margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (APGD-T's loss), per example, larger = closer to predicting ``target``:
    ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)``. Needs 4 classes or more."""
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return (z_t - z_y) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _joint(term: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, aux: List[torch.Tensor],
           beta: float) -> torch.Tensor:
    loss = term(logits)
    if aux:
        loss = loss + beta * torch.stack([term(a) for a in aux]).mean(dim=0)
    return loss


class ObjectiveAdapter:
    """A casify model as AutoAttack's APGD sees a non-PyTorch model: ``predict`` gives the deployed logits;
    ``get_logits_loss_grad_xent`` / ``_dlr`` / ``_target`` give (deployed logits, per-example loss, input gradient)
    of the objective ``loss`` crafted under ``routing`` (None: deployed; ``"straight-through"``; or
    ``"target"``: every module routed to APGD-T's current target)."""

    def __init__(self, model: nn.Module, loss: str = "cas", routing: Optional[str] = None, beta: float = 2.0):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if routing not in (None, "straight-through", "target"):
            raise ValueError(f"routing must be None, 'straight-through' or 'target', got {routing!r}")
        self.model, self.loss, self.routing, self.beta = model, loss, routing, beta
        self.defended = bool(find_defense_modules(model))
        if routing == "target" and self.defended and not routed_modules(model):
            routing = self.routing = None  # nothing routes (FSR): targeted APGD on the joint objective
        if routing is not None and not self.defended:
            raise ValueError(f"routing {routing!r} needs a model with CAS modules")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with attack_context(self.model):
            return self.model(x).float()

    def _outputs(self, x: torch.Tensor):
        logits = self.model(x).float()
        return logits, ([a.float() for a in attack_aux_logits(self.model)] if self.defended and self.loss != "ce" else [])

    def _loss_grad(self, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None):
        routing = target if self.routing == "target" else self.routing
        with attack_context(self.model, routing), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            logits, aux = self._outputs(x_in)
            if target is not None:
                loss = _joint(lambda z: dlr_targeted(z, y, target), logits, aux, self.beta)
            elif self.loss == "dlr_cas":
                loss = _joint(lambda z: dlr(z, y), logits, aux, self.beta)
            else:  # "cas" (joint CE) or "ce" (final logits)
                loss = _joint(lambda z: F.cross_entropy(z, y, reduction="none"), logits, aux, self.beta)
            grad = torch.autograd.grad(loss.sum(), x_in, allow_unused=True)[0]
        if grad is None:
            grad = torch.zeros_like(x_in)
        # APGD tracks success on these logits: always the deployed ones (free when the crafting forward is deployed)
        deployed = logits.detach() if routing is None else self.predict(x)
        return deployed, loss.detach(), grad.detach()

    def get_logits_loss_grad_xent(self, x, y):
        return self._loss_grad(x, y)

    def get_logits_loss_grad_dlr(self, x, y):
        return self._loss_grad(x, y)

    def get_logits_loss_grad_target(self, x, y, y_target):
        return self._loss_grad(x, y, y_target.to(y.device).long())


def _need_classes(logits: torch.Tensor, k: int, what: str) -> None:
    if logits.shape[1] < k:
        raise ValueError(f"{what} needs {k} classes or more (its DLR loss ranks the logits), the model has "
                         f"{logits.shape[1]}; evaluate with attacks=[...] without the APGD rows")


def _start(x: torch.Tensor, eps: float, generator: Generators, norm: str = "linf") -> torch.Tensor:
    """Uniform in the ``norm`` ball and [0, 1], from per-example generators (as casify's PGD draws its starts)."""
    if norm == "linf":
        noise = draw_noise("rand", x.shape, generator, x.device) * 2 - 1
        return (x + eps * noise).clamp(0.0, 1.0)
    return ball_noise(x, eps, norm, generator)


def _run(attack, x: torch.Tensor, y: torch.Tensor, eps: float, generator: Generators, restarts: int,
         norm: str = "linf"):
    """APGD's single runs from casify's starts; per example the first fooling iterate of any restart, else the
    highest-loss point of the last one. Returns (x_adv, fooled)."""
    adapter = attack.model
    attack.init_hyperparam(x)
    best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        x_init = _start(x[todo], eps, [generator[i] for i in todo.tolist()] if isinstance(generator, list)
                        else generator, norm)
        x_best, _, _, x_best_adv = attack.attack_single_run(x[todo], y[todo], x_init=x_init)
        now = ~predicted_correctly(adapter.predict(x_best_adv), y[todo])  # NaN / inf logits: fooled
        best[todo] = torch.where(now.view(-1, *([1] * (x.dim() - 1))), x_best_adv, x_best)
        fooled[todo] = now
    return best, fooled


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, steps: int = 100,
         loss: str = "cas", routing: Optional[str] = None, restarts: int = 1, beta: float = 2.0,
         generator: Generators = None, return_info: bool = False, norm: str = "linf"
         ) -> Union[torch.Tensor, "tuple[torch.Tensor, AttackInfo]"]:
    """AutoAttack's APGD (``norm``: ``"linf"`` or ``"l2"``; ``steps`` iterations, ``restarts`` restarts on the
    examples not yet fooled) on ``loss`` (``"cas"``, ``"dlr_cas"``, or ``"ce"`` on the final logits), crafted under
    ``routing``."""
    norm = check_norm(norm)
    apgd_class, _ = load_apgd()
    adapter = ObjectiveAdapter(model, loss=loss, routing=routing, beta=beta)
    x = x.detach().float().contiguous()
    if loss == "dlr_cas":
        _need_classes(adapter.predict(x[:1]), 3, "APGD on the DLR")
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        attack = apgd_class(adapter, n_iter=int(steps), norm=autoattack_norm(norm), n_restarts=1, eps=float(eps),
                            loss="dlr" if loss == "dlr_cas" else "ce", seed=0, device=x.device, is_tf_model=True)
        x_adv, fooled = _run(attack, x, y.long(), eps, generator, restarts, norm)
    return _finish(adapter, x_adv, y, fooled, return_info)


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, steps: int = 100,
                  n_targets: int = 3, routing: Optional[str] = "target", beta: float = 2.0,
                  generator: Generators = None, return_info: bool = False, norm: str = "linf"):
    """AutoAttack's APGD-T (in the ``norm`` ball) on the targeted DLR of the final and auxiliary logits, for each of
    the ``n_targets`` classes the clean deployed model ranks highest after the true one, on the examples no earlier
    target fooled.
    ``routing="target"`` (default) routes every CAS module to the target while crafting (routing-consistent);
    None crafts with the deployed routing."""
    _, apgd_t_class = load_apgd()
    norm = check_norm(norm)
    adapter = ObjectiveAdapter(model, loss="cas", routing=routing if find_defense_modules(model) else None, beta=beta)
    x, y = x.detach().float().contiguous(), y.long()
    clean = adapter.predict(x)
    _need_classes(clean, 4, "APGD-T")
    n_targets = max(1, min(int(n_targets), clean.shape[1] - 1))
    ranked = clean.masked_fill(class_mask(y, clean.shape[1]), float("-inf")).argsort(dim=1, descending=True)
    best, fooled = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        attack = apgd_t_class(adapter, n_iter=int(steps), norm=autoattack_norm(norm), n_restarts=1, eps=float(eps),
                              seed=0,
                              device=x.device, is_tf_model=True, n_target_classes=n_targets)
        for k in range(n_targets):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            attack.y_target = ranked[todo, k]
            gens = [generator[i] for i in todo.tolist()] if isinstance(generator, list) else generator
            x_adv, now = _run(attack, x[todo], y[todo], eps, gens, restarts=1, norm=norm)
            best[todo] = torch.where(now.view(-1, *([1] * (x.dim() - 1))), x_adv, best[todo])
            fooled[todo] = now
    return _finish(adapter, best, y, fooled, return_info)


def _finish(adapter: ObjectiveAdapter, x_adv: torch.Tensor, y: torch.Tensor, fooled: torch.Tensor,
            return_info: bool):
    x_adv = x_adv.detach()
    if not return_info:
        return x_adv
    logits = adapter.predict(x_adv)
    margin = cw_margin(logits, y)
    info = AttackInfo(fooled=~predicted_correctly(logits, y), margin=margin, fooled_last=fooled.clone(), fooled_any=fooled.clone(),
                      first_fooled=torch.where(fooled, torch.zeros_like(y), torch.full_like(y, -1)))
    return x_adv, info


__all__ = ["APGD_INSTALL", "LOSSES", "ObjectiveAdapter", "apgd", "apgd_targeted", "dlr", "dlr_targeted", "load_apgd"]
