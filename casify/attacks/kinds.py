"""The registry of attack kinds: how an :class:`~casify.attacks.Attack` spec turns into adversarial examples.

An :class:`Attack` is data (a kind, a budget, an objective, a routing, the kind's own ``options``); its kind is looked
up here when the spec is made (an unknown kind is an error that names the known ones) and again when it runs, so
``Attack(kind=...)(model, x, y)`` and every evaluation row of that attack go through the same code. A new kind is one
file: a subclass of :class:`AttackKind` decorated with :func:`register_attack_kind` (see ``docs/architecture.md``).

Built in: ``pgd`` / ``fgsm`` / ``cw`` (``pgd.py``; CW is PGD on a margin objective), ``apgd`` / ``apgd-t``
(``apgd.py``, AutoAttack's APGD on casify's objectives), ``square`` (``square.py``), ``autoattack``
(``autoattack.py``) and the single-step training attacks ``fgsm_rs`` (``fgsm_rs.py``) and ``n_fgsm``
(``n_fgsm.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

from ..defenses.base import Option, check_options
from ..core.eps import format_radius
from .constants import NORMS, ROUTINGS

Spec = Any  # an Attack (casify.attacks.spec imports this module, so it is not imported here)

# The evaluation's cascade, in its order (casify.evaluate.plan ranks rows by it): a kind names its group here, so a new
# kind says where it runs without an edit to the evaluation.
CASCADE_GROUPS = ("every example", "straight-through", "apgd", "cw20", "deployed routing", "one head", "fixed routing",
                  "autoattack", "black-box")
# What kind of row an attack makes in a report (white-box: gradients of the final logits; adaptive: the defense's own
# heads or routing; autoattack; black-box: outputs only).
ROW_KINDS = ("white-box", "adaptive", "autoattack", "black-box")


class AttackKind:
    """One way of crafting adversarial examples from an :class:`Attack` spec.

    Class attributes (what the spec is checked against, and how an evaluation row runs the kind):

    - ``OPTIONS``: the kind's own settings (``Attack.options``), each a :class:`~casify.defenses.Option` (default,
      check);
    - ``objectives``: the objective names it accepts (None: any objective of :data:`casify.attacks.OBJECTIVES`);
    - ``routings``: the crafting routings it accepts besides None (the deployed routing); ``norms``: the balls;
    - ``per_example_seed``: True if it draws its randomness from one generator per example (then an example's result
      does not depend on its batch); False if it takes one generator for the batch;
    - ``stays_in_ball``: False for a kind whose examples may leave the eps-ball by design (N-FGSM's noise of 2 eps,
      a training attack): the evaluation refuses it, since its accuracy would be measured outside the threat model;
    - ``cascade``: where its rows run in the evaluation's cascade, one of :data:`CASCADE_GROUPS` (None: ranked as the
      PGD rows are, by routing and objective);
    - ``row_kind``: what kind of row an :class:`Attack` of this kind makes in a custom attack list, one of
      :data:`ROW_KINDS` (the report groups and checks rows by it).
    """
    name: str = ""
    OPTIONS: Dict[str, Option] = {}
    objectives: Optional[Tuple[str, ...]] = None
    routings: Tuple[str, ...] = ROUTINGS
    norms: Tuple[str, ...] = NORMS
    per_example_seed: bool = True
    stays_in_ball: bool = True
    cascade: Optional[str] = None
    row_kind: str = "white-box"

    def prepare(self, attack: Spec) -> None:
        """Adjust the spec before it is checked (e.g. FGSM forces one step); runs once, in ``Attack.__post_init__``."""

    def craft(self, attack: Spec, model, x, y, *, routing=None, generator=None, return_info: bool = False):
        """The adversarial examples for ``(x, y)`` within ``attack.eps`` of ``x`` in ``attack.norm`` and in [0, 1]:
        ``x_adv``, or ``(x_adv, AttackInfo or None)`` when ``return_info`` (None: the kind scores no iterates).
        ``routing``, when given, overrides ``attack.routing``."""
        raise NotImplementedError(f"attack kind {self.name!r} does not implement craft")

    def iterative(self, attack: Spec) -> bool:
        """Whether its :class:`~casify.attacks.AttackInfo` tells the last iterate from the best one (the evaluation's
        last-iterate evidence for the gradient-masking checks)."""
        return False

    def sees_aux(self, attack: Spec) -> bool:
        """Whether the attack reaches the defense's auxiliary heads (how the evaluation names and groups its row)."""
        return False

    def row_objective(self, attack: Spec, defended: bool) -> str:
        """What the report row names as its objective."""
        return attack.objective

    def describe(self, attack: Spec, defended: bool) -> str:
        """The report row's notes (``defended``: the model has defense modules)."""
        return f"{self.name}, eps {format_radius(attack.eps, attack.norm)}, {attack.steps} steps"

    def settings(self, attack: Spec, defended: bool) -> dict:
        """The report row's settings."""
        settings = attack.to_dict()
        settings["eps_str"] = format_radius(attack.eps, attack.norm)
        return settings


ATTACK_KINDS: Dict[str, AttackKind] = {}


def register_attack_kind(name: str):
    """Class decorator: ``@register_attack_kind("square") class Square(AttackKind): ...`` makes ``Attack(kind=name)``
    run it. Registering a name twice is an error (pop it from :data:`ATTACK_KINDS` first to replace one)."""

    def decorate(cls: Type[AttackKind]) -> Type[AttackKind]:
        if not (isinstance(cls, type) and issubclass(cls, AttackKind)):
            raise TypeError(f"register_attack_kind({name!r}) decorates a subclass of AttackKind, got {cls!r}")
        if name in ATTACK_KINDS:
            raise ValueError(f"attack kind {name!r} is already registered ({type(ATTACK_KINDS[name]).__name__})")
        if cls.cascade is not None and cls.cascade not in CASCADE_GROUPS:
            raise ValueError(f"attack kind {name!r}: cascade {cls.cascade!r} is not a cascade group; use one of "
                             f"{list(CASCADE_GROUPS)}, or None to rank it as the PGD rows are")
        if cls.row_kind not in ROW_KINDS:
            raise ValueError(f"attack kind {name!r}: row_kind {cls.row_kind!r} is not a row kind; use one of "
                             f"{list(ROW_KINDS)}")
        cls.name = name
        ATTACK_KINDS[name] = cls()
        return cls

    return decorate


def get_attack_kind(name: str) -> AttackKind:
    if not isinstance(name, str) or name not in ATTACK_KINDS:
        raise ValueError(f"unknown attack kind {name!r}; known kinds: {sorted(ATTACK_KINDS)} (a new kind is a "
                         "subclass of casify.attacks.AttackKind registered with @register_attack_kind)")
    return ATTACK_KINDS[name]


def resolve_options(kind: AttackKind, options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``options`` over the kind's defaults, each checked (:func:`casify.defenses.base.check_options`)."""
    return check_options(f"attack kind {kind.name!r}", kind.OPTIONS, options, where="options")


__all__ = ["ATTACK_KINDS", "CASCADE_GROUPS", "ROW_KINDS", "AttackKind", "get_attack_kind", "register_attack_kind", "resolve_options"]
