"""AT, TRADES and MART, each with or without the CAS term (paper Table 7, as the authors' code computes them).

A loss is called as ``loss(model, x_nat, x_adv, y)`` and returns ``(loss, metrics)``. It runs the forwards itself, in
whatever mode the caller put the model in (``model.train()`` for the update) and, when the model has CAS modules, under
``casify.route(model, labels=y)``: the weight update routes by the true label. TRADES and MART use two separate
forwards (clean and adversarial), as their authors' code does. Logits are cast to float32 before every loss. A model
whose training forward returns a tuple or namedtuple (GoogLeNet, Inception v3 with ``aux_logits=True``) is scored on its
final logits: every output goes through :func:`main_logits`.

The adversarial examples come from :mod:`casify.attacks`; ``loss.attack_objective`` names the objective the method's
training attack maximises and ``loss.training_attack()`` gives the authors' full attack setting.

Defaults: ``defaults="paper"`` takes lambda from each method's own paper (TRADES 6, MART 6); ``defaults="authors"`` from
the CAS authors' code (TRADES 4, MART 5). beta = 2 in both. ``loss.config()`` returns the resolved settings for run
records.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from . import attacks
from .attacks.constants import SINGLE_STEP_ATTACKS
from .defenses import aux_logits
from .defenses import find_defense_modules
from .core.routing import TRAIN_ROUTINGS, train_route

DEFAULTS: Dict[str, Dict[str, Dict[str, float]]] = {
    "paper": {"standard": {}, "at": {}, "trades": {"lambda_": 6.0}, "mart": {"lambda_": 6.0}},
    "authors": {"standard": {}, "at": {}, "trades": {"lambda_": 4.0}, "mart": {"lambda_": 5.0}},
}
Metrics = Dict[str, torch.Tensor]


def main_logits(output: Any) -> torch.Tensor:
    """The classifier's logits from whatever a forward returned.

    Some models return more than logits in training mode: torchvision's GoogLeNet and Inception v3 with
    ``aux_logits=True`` return a namedtuple (``GoogLeNetOutputs`` / ``InceptionOutputs``) whose ``logits`` field is the
    final head, Hugging Face models a ``ModelOutput`` with ``.logits``. The losses train that final head (the model's
    own auxiliary heads are not part of AT / TRADES / MART); a plain tuple gives its first element.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}; casify's losses "
                        "take a tensor, a tuple whose first element is the logits, or an object with .logits")
    return logits


def _forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             routing: str = "label") -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Final and auxiliary logits (float32) of one forward; CAS modules route as ``routing`` says
    (:data:`casify.core.routing.TRAIN_ROUTINGS`: by ``y`` in the paper)."""
    if not find_defense_modules(model):
        return main_logits(model(x)).float(), []
    with train_route(model, y, routing):
        logits = main_logits(model(x)).float()
        return logits, [a.float() for a in aux_logits(model)]


def _mean(terms: List[torch.Tensor], model: nn.Module) -> torch.Tensor:
    """The mean of the heads' terms; 0 (on the model's device) for a defense without auxiliary heads."""
    if not terms:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return torch.stack(terms).mean()


def joint_aux_term(model: nn.Module, aux: List[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                   y: Optional[torch.Tensor] = None, final_logits: Optional[torch.Tensor] = None,
                   others: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """The defense part of every joint loss, written once: the mean over every auxiliary head of ``weight x
    loss_fn(head, target)`` (or ``loss_fn(other_head, head)`` for a two-forward term such as TRADES' KL, ``others``
    being the other forward's heads), each defense module giving its heads' targets and weights
    (:meth:`casify.defenses.DefenseModule.aux_targets`, ``aux_weights``). The caller multiplies by beta. For CAS
    (targets = the labels, weights 1) it is the paper's ``mean_s loss(aux_s)``, bit for bit."""
    targets: List[Optional[torch.Tensor]] = []
    weights: List[float] = []
    for module in find_defense_modules(model):
        n = len(module.head_names)
        targets += module.aux_targets(y, final_logits) if y is not None else [None] * n
        weights += list(module.aux_weights)
    if len(targets) != len(aux):
        raise RuntimeError(f"the model's defense modules declare {len(targets)} heads but the forward gave {len(aux)}")
    terms = []
    for i, (head, target, weight) in enumerate(zip(aux, targets, weights)):
        term = loss_fn(others[i], head) if others is not None else loss_fn(head, target)
        terms.append(term if weight == 1.0 else weight * term)
    return _mean(terms, model)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return attacks.predicted_correctly(logits, y).float().mean().detach()


def trades_kl(nat_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term ``KL(p(x) || p(x'))``, summed over classes, averaged over the batch; no detach."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(nat_logits, dim=1), reduction="batchmean")


def mart_bce(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's boosted CE: CE plus ``-log(1 - p_k(x'))`` for the most likely wrong class k (MART's constants)."""
    probs = F.softmax(adv_logits, dim=1)
    top2 = probs.argsort(dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    return F.cross_entropy(adv_logits, y) + F.nll_loss(torch.log(1.0001 - probs + 1e-12), wrong)


def mart_kl(nat_logits: torch.Tensor, adv_logits: torch.Tensor, true_probs: torch.Tensor) -> torch.Tensor:
    """MART's robust term: per-example ``KL(p(x) || p(x'))`` weighted by ``1 - p_y(x)``, averaged over the batch."""
    nat_probs = F.softmax(nat_logits, dim=1)
    adv_probs = F.softmax(adv_logits, dim=1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    return (kl * (1.0000001 - true_probs)).mean()


def _true_probs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)


@dataclass
class AdversarialLoss(abc.ABC):
    """Shared plumbing: the CAS switch, the defaults preset, the training attack and the config record.

    Args:
        cas: add the CAS terms (beta times the mean over CAS modules of the method's loss on each auxiliary head).
            Requires a model with CAS modules.
        beta: weight of the CAS terms (2 in the paper and the code).
        defaults: ``"paper"`` (each method's own paper) or ``"authors"`` (the CAS authors' code) for settings left
            as ``None``.
        train_routing: how CAS modules route in the update forward: ``"label"`` (the paper: the true label, which
            leaks the label into the mask), ``"predicted"`` (each module's own argmax) or ``"soft"`` (each module's
            softmax mixture of rows); see :data:`casify.core.routing.TRAIN_ROUTINGS`. Test-time routing is unchanged.
        training_objective: the objective the training attack maximises (a :data:`casify.attacks.OBJECTIVES` name);
            None: the method's own (the joint one when the defense's heads are trained). FSR's authors attack the
            final logits' cross-entropy in training (their ``train.py``): ``"ce"``.
    """
    cas: bool = False
    beta: float = 2.0
    defaults: str = "paper"
    train_routing: str = "label"
    training_objective: Optional[str] = None

    method: ClassVar[str] = ""
    attack_preset: ClassVar[str] = ""

    def __post_init__(self):
        if self.defaults not in DEFAULTS:
            raise ValueError(f"defaults must be one of {sorted(DEFAULTS)}, got {self.defaults!r}")
        if self.train_routing not in TRAIN_ROUTINGS:
            raise ValueError(f"train_routing must be one of {sorted(TRAIN_ROUTINGS)}, got {self.train_routing!r}")
        if self.training_objective is not None and self.training_objective not in attacks.OBJECTIVES:
            raise ValueError(f"training_objective must be one of {sorted(attacks.OBJECTIVES)} (or null: the method's "
                             f"own), got {self.training_objective!r}")
        for key, value in DEFAULTS[self.defaults].get(self.method, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def __call__(self, model: nn.Module, x_nat: Optional[torch.Tensor], x_adv: torch.Tensor,
                 y: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
        defended = bool(find_defense_modules(model))
        if self.cas and not defended:
            raise ValueError(f"{type(self).__name__}(cas=True) needs a model with CAS modules; wrap it with "
                             "casify.wrap(model, layers=...) or use cas=False")
        return self.compute(model, x_nat, x_adv, y)

    @abc.abstractmethod
    def compute(self, model: nn.Module, x_nat: Optional[torch.Tensor], x_adv: torch.Tensor,
                y: torch.Tensor) -> Tuple[torch.Tensor, Metrics]:
        """The method's loss and metrics; the forwards happen here (the CAS check is done by ``__call__``)."""

    @property
    def attack_objective(self) -> str:
        """The :mod:`casify.attacks` objective that this method's training attack maximises."""
        return "cas" if self.cas else "ce"

    def training_attack(self, attack: str = "pgd", **overrides) -> attacks.Attack:
        """The training attack for this method, objective and beta matched to this loss: ``"pgd"``, the authors'
        multi-step attack (see :data:`casify.attacks.PRESETS`), or a single-step one
        (:data:`casify.attacks.constants.SINGLE_STEP_ATTACKS`: ``"fgsm"`` without a random start, ``"fgsm_rs"``,
        ``"n_fgsm"``) with its paper's start and step (``alpha=None``) on this method's objective. A single-step attack
        with ``steps`` above 1 is refused."""
        objective = self.training_objective or self.attack_objective
        overrides = {"objective": objective, "beta": self.beta, **overrides}
        if attack == "pgd":
            return attacks.get_attack(self.attack_preset, **overrides)
        if attack not in SINGLE_STEP_ATTACKS:
            raise ValueError(f"unknown training attack {attack!r}; choose from {('pgd',) + SINGLE_STEP_ATTACKS}")
        steps = overrides.pop("steps", 1)
        if steps != 1:
            raise ValueError(f"{attack} is a single-step attack; got steps={steps} (use attack='pgd' for several)")
        overrides.setdefault("alpha", None)  # None: the kind's own step (eps, or 1.25 eps for fgsm_rs)
        start = "none" if attack == "fgsm" else "uniform"
        return attacks.Attack(**{"name": f"{self.method}-train-{attack}", "kind": attack, "steps": 1,
                                 "random_start": start, "keep": "last", **overrides})

    def config(self) -> dict:
        """The resolved settings, for run configs and reports."""
        settings = dataclasses.asdict(self)
        if settings["training_objective"] is None:  # unused: records read as they did before the setting existed
            del settings["training_objective"]
        return {"method": self.method, **settings, "attack_objective": self.training_objective or self.attack_objective}


@dataclass
class ATLoss(AdversarialLoss):
    """Madry et al.'s AT: ``CE(f(x'), y)``; with CAS ``+ beta * mean_s CE(aux_s(x'), y)``. ``x_nat`` is unused."""
    method: ClassVar[str] = "at"
    attack_preset: ClassVar[str] = "at-train"

    def compute(self, model, x_nat, x_adv, y):
        return self._cross_entropy(model, x_adv, y, "adv")

    def _cross_entropy(self, model, x, y, tag):
        """CE of the final logits on ``x`` (+ beta * mean auxiliary CE with CAS), with metrics tagged ``tag``."""
        logits, aux = _forward(model, x, y, self.train_routing)
        ce = F.cross_entropy(logits, y)
        metrics = {f"ce_{tag}": ce.detach(), f"acc_{tag}": _accuracy(logits, y)}
        loss = ce
        if self.cas:
            aux_ce = joint_aux_term(model, aux, F.cross_entropy, y, logits)
            loss = loss + self.beta * aux_ce
            metrics[f"aux_ce_{tag}"] = aux_ce.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


@dataclass
class StandardLoss(ATLoss):
    """Natural training, no attack: ``CE(f(x), y)``; with CAS ``+ beta * mean_s CE(aux_s(x), y)`` (the paper's
    Appendix E). It trains the "standard" models of the paper's analysis and pretrains the demo's classifier."""
    method: ClassVar[str] = "standard"
    attack_preset: ClassVar[str] = ""

    def compute(self, model, x_nat, x_adv, y):
        return self._cross_entropy(model, x_nat, y, "nat")

    def training_attack(self, attack: str = "pgd", **overrides):
        return None


@dataclass
class TRADESLoss(AdversarialLoss):
    """TRADES: ``CE(f(x), y) + lambda * KL(p(x) || p(x'))``.

    With CAS, ``beta * mean_s CE(aux_s(x), y)`` joins the natural part and ``beta * mean_s KL(aux_s(x) || aux_s(x'))``
    the robust part (both inside the lambda factor), as in Table 7. ``lambda_=None`` resolves from ``defaults``:
    6 (TRADES' paper) or 4 (the CAS authors' code).
    """
    lambda_: Optional[float] = None
    method: ClassVar[str] = "trades"
    attack_preset: ClassVar[str] = "trades-train"

    @property
    def attack_objective(self) -> str:
        return "cas_kl" if self.cas else "kl"

    def compute(self, model, x_nat, x_adv, y):
        if x_nat is None:
            raise ValueError("TRADES needs the clean inputs x_nat")
        nat_logits, nat_aux = _forward(model, x_nat, y, self.train_routing)
        adv_logits, adv_aux = _forward(model, x_adv, y, self.train_routing)
        natural = F.cross_entropy(nat_logits, y)
        robust = trades_kl(nat_logits, adv_logits)
        metrics = {"ce_nat": natural.detach(), "kl": robust.detach(), "acc_nat": _accuracy(nat_logits, y),
                   "acc_adv": _accuracy(adv_logits, y)}
        if self.cas:
            aux_ce = joint_aux_term(model, nat_aux, F.cross_entropy, y, nat_logits)
            aux_kl = joint_aux_term(model, adv_aux, trades_kl, others=nat_aux)
            natural = natural + self.beta * aux_ce
            robust = robust + self.beta * aux_kl
            metrics.update(aux_ce_nat=aux_ce.detach(), aux_kl=aux_kl.detach())
        loss = natural + self.lambda_ * robust
        metrics["loss"] = loss.detach()
        return loss, metrics


@dataclass
class MARTLoss(AdversarialLoss):
    """MART: ``BCE(f(x'), y) + lambda * mean[KL(p(x) || p(x')) * (1 - p_y(x))]``.

    With CAS, ``beta * mean_s`` of the same two terms on each auxiliary head is added. ``aux_kl_weight`` chooses the
    ``p_y(x)`` in the auxiliary heads' KL weights: ``"main"`` (default, the authors' code) takes the final head's,
    ``"aux"`` takes each auxiliary head's own (Table 7 of the paper). ``lambda_=None`` resolves from ``defaults``:
    6 (MART's paper) or 5 (the CAS authors' code).
    """
    lambda_: Optional[float] = None
    aux_kl_weight: str = "main"
    method: ClassVar[str] = "mart"
    attack_preset: ClassVar[str] = "mart-train"

    def __post_init__(self):
        super().__post_init__()
        if self.aux_kl_weight not in ("main", "aux"):
            raise ValueError(f"aux_kl_weight must be 'main' or 'aux', got {self.aux_kl_weight!r}")

    def compute(self, model, x_nat, x_adv, y):
        if x_nat is None:
            raise ValueError("MART needs the clean inputs x_nat")
        nat_logits, nat_aux = _forward(model, x_nat, y, self.train_routing)
        adv_logits, adv_aux = _forward(model, x_adv, y, self.train_routing)
        main_true = _true_probs(nat_logits, y)
        bce = mart_bce(adv_logits, y)
        kl = mart_kl(nat_logits, adv_logits, main_true)
        loss = bce + self.lambda_ * kl
        metrics = {"bce_adv": bce.detach(), "kl_weighted": kl.detach(), "acc_nat": _accuracy(nat_logits, y),
                   "acc_adv": _accuracy(adv_logits, y)}
        if self.cas:
            aux_bce = joint_aux_term(model, adv_aux, mart_bce, y, adv_logits)
            true_probs = {id(n): main_true if self.aux_kl_weight == "main" else _true_probs(n, y) for n in nat_aux}
            aux_kl = joint_aux_term(model, adv_aux, lambda n, a: mart_kl(n, a, true_probs[id(n)]), others=nat_aux)
            loss = loss + self.beta * (aux_bce + self.lambda_ * aux_kl)
            metrics.update(aux_bce_adv=aux_bce.detach(), aux_kl_weighted=aux_kl.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics


LOSSES: Dict[str, Type[AdversarialLoss]] = {"standard": StandardLoss, "at": ATLoss, "trades": TRADESLoss,
                                            "mart": MARTLoss}


def get_loss(name: str, cas: bool = False, **kwargs) -> AdversarialLoss:
    """``get_loss("standard" | "at" | "trades" | "mart", cas=..., beta=..., lambda_=..., defaults="paper" | "authors", ...)``."""
    key = name.lower()
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[key](cas=cas, **kwargs)


__all__ = ["ATLoss", "AdversarialLoss", "StandardLoss", "DEFAULTS", "LOSSES", "MARTLoss", "TRADESLoss", "get_loss", "main_logits",
           "mart_bce", "mart_kl", "trades_kl"]
