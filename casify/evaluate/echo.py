"""Routing echo: does a routed defense's final prediction just repeat one auxiliary head?

A CAS model trained with true-label routing learns to read the label off the mask, so at test time its output follows
the routed class (``shared/docs/family.md``). Two measurements show it on any routed model:

- **head agreement**: per module, how often the final argmax equals that module's auxiliary argmax, on clean inputs
  and on adversarial ones (PGD on the joint objective that sees every head);
- **forced routing**: route every module (and each module alone, the others by their own prediction) to a random
  wrong class per example, and count how often the model then outputs that class. An echo model follows the route
  (near 100 %); a model whose later layers do not read the mask stays near chance (1 / classes) or keeps its label.

The null of forced routing is **not** 1 / classes: a model that ignores its masks outputs the drawn wrong class as
often as its own prediction happens to be that class, about (1 - accuracy) / (classes - 1) (5.5-7.5 % for the
study's models, not 10 %). :attr:`RoutingEcho.forced_null` measures that rate on the same draws (the model's own,
unforced prediction equals the forced class), so an echo is read against it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..attacks import pgd
from ..defenses import RoutedDefense
from ..core.routing import route


@dataclass
class RoutingEcho:
    """What :func:`routing_echo` measured; fractions in [0, 1] over ``n`` examples, ``modules`` in graph order."""
    n: int
    modules: List[str]
    head_agreement_clean: List[float]
    head_agreement_adversarial: List[float]
    forced_all: float
    forced_each: Dict[str, float] = field(default_factory=dict)
    chance: float = 0.0
    adversarial: str = ""
    forced_null: float = 0.0  # the unforced prediction equals the drawn class: the rate of a mask-ignoring model

    @property
    def echoes(self) -> bool:
        """The model follows a forced route far above chance (more than half of the examples)."""
        return self.forced_all > 0.5

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "echoes": self.echoes}


def _named_modules(model: nn.Module) -> List[tuple]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedDefense)]


def _wrong_classes(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    shift = torch.randint(1, num_classes, y.shape, generator=generator)
    return (y.cpu() + shift) % num_classes


@torch.no_grad()
def _agreement(model: nn.Module, x: torch.Tensor, modules: List[RoutedDefense]) -> tuple:
    with route(model, labels=None):
        final = model(x).argmax(dim=1)
        heads = [m.aux_outputs()[0].argmax(dim=1) for m in modules]
    return final, [(h == final) for h in heads]


@torch.no_grad()
def _forced(model: nn.Module, x: torch.Tensor, forced: torch.Tensor,
            modules: List[RoutedDefense]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Per example, whether the output is the ``forced`` class: with every module routed to it, and with each of
    ``modules`` alone routed to it (the others by their own prediction)."""
    with route(model, labels=forced):
        every = model(x).argmax(dim=1) == forced
    alone = []
    for module in modules:
        previous = module.set_router(lambda a: forced.to(a.device))
        try:
            with route(model, labels=None):
                alone.append(model(x).argmax(dim=1) == forced)
        finally:
            module.set_router(previous)
    return every, alone


def routing_echo(model: nn.Module, dataset: Dataset, *, eps: float = 8 / 255, steps: int = 20, beta: float = 2.0,
                 max_examples: int = 500, batch_size: int = 128, seed: int = 0) -> RoutingEcho:
    """Head agreement (clean and PGD-``steps`` on the ``"cas"`` objective at ``eps``, pixels) and forced-routing rates
    of a routed model on the first ``max_examples`` of ``dataset``; the wrong classes are drawn from ``seed``."""
    named = _named_modules(model)
    if not named:
        raise ValueError("routing_echo needs a model with routed defense modules (CAS, CIFS: "
                         "casify.wrap(model, layers=[...], defense='cas')); this model routes by nothing")
    if len(dataset) == 0 or max_examples < 1:
        raise ValueError(f"routing_echo needs at least one example; got {len(dataset)} (max_examples={max_examples})")
    modules = [m for _, m in named]
    was_training = model.training
    model.eval()
    num_classes = modules[0].num_classes
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    n = min(len(dataset), max_examples)
    subset = torch.utils.data.Subset(dataset, range(n))
    agree_clean = torch.zeros(len(named))
    agree_adv = torch.zeros(len(named))
    forced_all = forced_null = 0
    forced_each = torch.zeros(len(named))
    try:
        for x, y in DataLoader(subset, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            own, clean = _agreement(model, x, modules)
            agree_clean += torch.stack([c.float().sum().cpu() for c in clean])
            x_adv = pgd(model, x, y, eps=eps, steps=steps, objective="cas", beta=beta,
                        generator=torch.Generator(device=device).manual_seed(seed))
            _, adv = _agreement(model, x_adv, modules)
            agree_adv += torch.stack([c.float().sum().cpu() for c in adv])
            forced = _wrong_classes(y, num_classes, generator).to(device)
            every, alone = _forced(model, x, forced, modules)
            forced_all += int(every.sum())
            forced_null += int((own == forced).sum())
            for i, hits in enumerate(alone):
                forced_each[i] += float(hits.sum())
    finally:
        model.train(was_training)
    names = [name for name, _ in named]
    return RoutingEcho(n=n, modules=names, head_agreement_clean=(agree_clean / n).tolist(),
                       head_agreement_adversarial=(agree_adv / n).tolist(), forced_all=forced_all / n,
                       forced_each={k: float(v) / n for k, v in zip(names, forced_each)}, chance=1 / num_classes,
                       forced_null=forced_null / n,
                       adversarial=f"PGD-{steps} on the joint objective (final + {beta} x mean over heads), eps "
                                   f"{eps * 255:.3g}/255")
