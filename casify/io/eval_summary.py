"""The headline numbers of an evaluation, as the model card and recipe summaries read them (:class:`EvalSummary`).

:meth:`casify.evaluate.report.EvalReport.summary_record` makes one; ``EvalReport.summary()`` is its
:meth:`~EvalSummary.to_dict`. The dict also travels as data (the ``evaluation`` given to the model card, the
``metrics`` of a saved ``config.json``), so :meth:`EvalSummary.from_dict` checks every field it reads and names the
one that is wrong. Pure data, in the foundation layer: the model card reads it without importing the evaluation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

MODES = ("per-attack", "cascade")
CASCADE_COUNTS = ("attacked", "newly_fooled", "robust_after")


@dataclass
class EvalSummary:
    """What :meth:`EvalReport.summary` describes (see there): ``accuracy`` (natural, per family, ``worst_case``) and
    ``rows`` (per worst-case row) are fractions in [0, 1]; ``families`` names each family's rows; ``upper_bounds``
    the families whose value is an upper bound (a cascade); ``gradient_masking_suspected`` is True / False / None
    (not checked), ``failed_checks`` the failed checks (None when not checked).

    Every field has a default so that a hand-written ``evaluation`` (``{"eps": ..., "accuracy": {...}}``) reads too;
    :meth:`to_dict` always writes every field, in the order ``EvalReport.summary()`` always has."""
    eps: Optional[float] = None
    eps_str: Optional[str] = None
    norm: str = "linf"
    n: Optional[int] = None
    suite: Optional[str] = None
    mode: Optional[str] = None
    accuracy: Dict[str, float] = field(default_factory=dict)
    rows: Dict[str, float] = field(default_factory=dict)
    families: Dict[str, List[str]] = field(default_factory=dict)
    upper_bounds: List[str] = field(default_factory=list)
    cascade: List[dict] = field(default_factory=list)
    gradient_masking_suspected: Optional[bool] = None
    failed_checks: Optional[List[str]] = None
    routing_echo_forced: Optional[float] = None  # a routed defense: how often a forced wrong route is followed
    # attack -> examples on which the model's logits held a NaN or inf (counted wrong); empty when none did
    nonfinite_logits: Dict[str, int] = field(default_factory=dict)
    num_classes: Optional[int] = None  # the model's class count: chance accuracy is 1 / num_classes

    @property
    def at_chance(self) -> Optional[bool]:
        """Is the natural accuracy no better than guessing (:func:`at_chance`)? None when it cannot be told."""
        natural = self.accuracy.get("natural")
        return None if natural is None else at_chance(natural, self.num_classes, self.n)

    def to_dict(self) -> dict:
        """The dict ``EvalReport.summary()`` returns (fresh containers: editing it leaves the record alone)."""
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "evaluation") -> "EvalSummary":
        """Read a summary dict, checking the type of every field it holds; unknown keys are ignored (a newer casify
        may write more). ``source`` names the dict in errors (``"metrics"`` for a ``config.json``'s field).

        Raises ValueError naming the field (``evaluation.accuracy.pgd20``) for a wrong type, a value outside its range
        or a summary without ``accuracy``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a dict (an EvalReport.summary()), got {type(data).__name__}")
        if "accuracy" not in data:
            raise ValueError(f"{source}.accuracy is missing: an evaluation summary ({source} = EvalReport.summary()) "
                             f"maps each attack to its accuracy; got the keys {sorted(map(str, data))[:10]}")
        check = _Checker(source)
        eps = data.get("eps")
        if eps is not None:
            eps = check.fraction(eps, "eps")
        mode = check.optional_string(data.get("mode"), "mode")
        if mode is not None and mode not in MODES:
            check.fail("mode", mode, f"one of {list(MODES)} or null")
        suspected = data.get("gradient_masking_suspected")
        if suspected is not None and not isinstance(suspected, bool):
            check.fail("gradient_masking_suspected", suspected, "true, false or null (the checks did not run)")
        failed = data.get("failed_checks")
        return cls(
            eps=eps,
            eps_str=check.optional_string(data.get("eps_str"), "eps_str"),
            norm="linf" if data.get("norm") is None else check.string(data["norm"], "norm"),
            n=check.optional_count(data.get("n"), "n"),
            suite=check.optional_string(data.get("suite"), "suite"),
            mode=mode,
            accuracy=check.accuracies(data["accuracy"], "accuracy"),
            rows=check.accuracies(data.get("rows") or {}, "rows"),
            families={name: check.names(rows, f"families.{name}")
                      for name, rows in check.mapping(data.get("families") or {}, "families").items()},
            upper_bounds=check.names(data.get("upper_bounds") or [], "upper_bounds"),
            cascade=[check.cascade_entry(entry, f"cascade[{i}]")
                     for i, entry in enumerate(check.sequence(data.get("cascade") or [], "cascade"))],
            gradient_masking_suspected=suspected,
            failed_checks=None if failed is None else check.names(failed, "failed_checks"),
            routing_echo_forced=(None if data.get("routing_echo_forced") is None
                                 else check.fraction(data["routing_echo_forced"], "routing_echo_forced")),
            nonfinite_logits={name: check.count(count, f"nonfinite_logits.{name}") for name, count
                              in check.mapping(data.get("nonfinite_logits") or {}, "nonfinite_logits").items()},
            num_classes=check.optional_count(data.get("num_classes"), "num_classes"),
        )


CHANCE_Z = 3.0
"""Natural accuracy counts as chance unless it is this many binomial standard errors above 1 / classes."""


def at_chance(natural: float, num_classes: Optional[int], n: Optional[int]) -> Optional[bool]:
    """Is a natural accuracy no better than guessing among ``num_classes``: within ``CHANCE_Z`` binomial standard
    errors of ``1 / num_classes`` on ``n`` examples (half of chance when ``n`` is unknown), or below it? None when the
    class count is unknown. Why a test and not ``natural <= 1 / classes``: a model at chance reads a little above it
    on a few hundred images half the time."""
    if not num_classes or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    margin = CHANCE_Z * math.sqrt(chance * (1 - chance) / n) if n else 0.5 * chance
    return natural <= chance + margin


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, name: str, value, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{self.source}.{name} = {shown} ({type(value).__name__}) is not valid: expected {expected}")

    def string(self, value, name: str) -> str:
        if not isinstance(value, str):
            self.fail(name, value, "a string")
        return value

    def optional_string(self, value, name: str) -> Optional[str]:
        return None if value is None else self.string(value, name)

    def count(self, value, name: str) -> int:
        if value is None:
            self.fail(name, value, "a count of examples (an integer >= 0)")
        return self.optional_count(value, name)

    def optional_count(self, value, name: str) -> Optional[int]:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            self.fail(name, value, "a count of examples (an integer >= 0) or null")
        return value

    def fraction(self, value, name: str) -> float:
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            self.fail(name, value, "a number in [0, 1] (a fraction, not a percentage)")
        return float(value)

    def mapping(self, value, name: str) -> dict:
        if not isinstance(value, dict):
            self.fail(name, value, "a dict")
        for key in value:
            if not isinstance(key, str):
                self.fail(f"{name} key", key, "a string (an attack or family name)")
        return value

    def sequence(self, value, name: str) -> list:
        if not isinstance(value, list):
            self.fail(name, value, "a list")
        return value

    def accuracies(self, value, name: str) -> Dict[str, float]:
        return {key: self.fraction(v, f"{name}.{key}") for key, v in self.mapping(value, name).items()}

    def names(self, value, name: str) -> List[str]:
        return [self.string(v, f"{name}[{i}]") for i, v in enumerate(self.sequence(value, name))]

    def cascade_entry(self, value, name: str) -> dict:
        entry = dict(self.mapping(value, name))
        if "row" in entry:
            self.string(entry["row"], f"{name}.row")
        for key in CASCADE_COUNTS:
            if key in entry:
                self.optional_count(entry[key], f"{name}.{key}")
        return entry
