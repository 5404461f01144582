"""An attack as data (:class:`Attack`: kind, budget, objective, routing, the kind's options) and the training presets.

The spec is checked against its kind (:mod:`casify.attacks.kinds`) when it is made, and runs through it when called."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..core.inputs import check_eps
from .constants import KEEPS, Routing
from .kinds import get_attack_kind, resolve_options
from .objectives import get_objective
from .pgd import PGD  # noqa: F401  (registers the pgd / fgsm / cw kinds the presets use)
from .steps import Generators, resolve_alpha, start_kind

@dataclass
class Attack:
    """A named, serialisable attack setting: ``Attack(...)(model, x, y)`` returns adversarial examples.

    ``kind`` names a registered attack kind (:data:`casify.attacks.ATTACK_KINDS`; an unknown one is an error that
    lists them): ``"pgd"``, ``"fgsm"`` (forces one step, one restart), ``"cw"`` (forces L-inf and a CW margin
    objective: ``"ce"`` becomes ``"cw"``, ``"cas"`` becomes ``"cw_cas"``, ``"aux:<i>"`` becomes ``"cw_aux:<i>"``),
    ``"apgd"`` / ``"apgd-t"`` (AutoAttack's APGD on casify's objectives), ``"square"`` (``steps`` queries) and
    ``"autoattack"``. Each kind reads the fields it uses; ``options`` holds its own settings (checked against its
    ``OPTIONS``, defaults filled in). ``eps`` and ``alpha`` are in pixel units; ``alpha=None`` resolves as in
    :func:`resolve_alpha`. ``routing`` is how CAS modules route while crafting (``None`` = as deployed,
    ``"straight-through"``, ``"clean-predicted"``, ``"clean-soft"``; a kind may accept others); ``keep`` is ``"best"``
    (best iterate, the default) or ``"last"``. :meth:`to_dict` gives the resolved settings for reports.
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
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        kind = get_attack_kind(self.kind)
        kind.prepare(self)
        if self.norm not in kind.norms:
            raise ValueError(f"norm must be one of {kind.norms}, got {self.norm!r}")
        if kind.objectives is None:
            get_objective(self.objective)
        elif self.objective not in kind.objectives:
            raise ValueError(f"attack kind {self.kind!r}: objective must be one of {kind.objectives}, "
                             f"got {self.objective!r}")
        if self.routing == "predicted":
            self.routing = None
        if self.routing is not None and self.routing not in kind.routings:
            raise ValueError(f"routing must be None or one of {kind.routings}, got {self.routing!r}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {KEEPS}, got {self.keep!r}")
        self.random_start = start_kind(self.random_start)
        # "8/255" as the README writes radii; a number is checked where the attack runs (pgd's entry), since the
        # evaluation plan builds its rows first and sets their norm after (threat_model.with_norm)
        self.eps = check_eps(self.eps, norm=self.norm) if isinstance(self.eps, str) else float(self.eps)
        self.alpha = resolve_alpha(self.eps, self.steps, self.alpha)
        self.options = resolve_options(kind, self.options)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, routing: Routing = None,
                 generator: Generators = None, return_info: bool = False):
        """Craft adversarial examples with the spec's kind; ``routing`` (a tensor or a name) overrides the spec's own
        routing. ``return_info``: also return the kind's :class:`AttackInfo` (None for a kind that scores no
        iterates)."""
        out = get_attack_kind(self.kind).craft(self, model, x, y, routing=routing, generator=generator,
                                               return_info=return_info)
        if return_info and not isinstance(out, tuple):
            return out, None
        if not return_info and isinstance(out, tuple):
            return out[0]
        return out

    @property
    def sees_aux(self) -> bool:
        """Whether the attack reaches the auxiliary heads (on a model with CAS modules): for the PGD family, whether
        the objective or the routing does."""
        return get_attack_kind(self.kind).sees_aux(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["options"]:
            del d["options"]  # a kind without options: the dict reads as before options existed
        return d

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
