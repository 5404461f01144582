"""Whether a model's own evaluation says it should not be published: gradient masking flagged, or chance accuracy.

Why: a model card's robust accuracy is what others cite. A model whose evaluation suspected gradient masking
overstates it, and a model at chance "robust accuracy" is no model; both are pushed only with ``--force``.
"""
from __future__ import annotations

from typing import Optional

from .eval_summary import CHANCE_Z, at_chance  # noqa: F401  (CHANCE_Z: where it was defined before)


class PublishRefused(RuntimeError):
    """The model's own evaluation says it should not be published (pass ``force=True`` / ``--force``)."""


def publish_refusal(metrics: Optional[dict], num_classes: Optional[int]) -> Optional[str]:
    """Why the model should not be pushed, or None. ``metrics``: the config's ``metrics`` (an evaluation summary);
    a model without one is not judged."""
    if not isinstance(metrics, dict):
        return None
    if metrics.get("gradient_masking_suspected"):
        failed = ", ".join(metrics.get("failed_checks") or []) or "see eval_report.md"
        return (f"its evaluation flagged gradient masking (failed checks: {failed}), so its robust accuracy is likely "
                "overstated")
    natural = (metrics.get("accuracy") or {}).get("natural")
    if natural is None or not num_classes or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    n = metrics.get("n")
    if at_chance(natural, num_classes, n):
        return (f"its natural accuracy {100 * natural:.1f} % is at chance for {num_classes} classes "
                f"({100 * chance:.1f} %{f' on {n} examples' if n else ''})")
    return None
