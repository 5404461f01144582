"""An attack as data (:class:`Attack`: kind, budget, objective, routing) and the training presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import nn

from ..inputs import check_eps
from .constants import KEEPS, KINDS, NORMS, ROUTINGS, Routing
from .objectives import get_objective, sees_aux
from .pgd import is_cw_objective, pgd
from .steps import Generators, resolve_alpha, start_kind

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
            if not is_cw_objective(self.objective):
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
        self.random_start = start_kind(self.random_start)
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
