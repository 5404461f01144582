"""The few lines a recipe ends with: how robust the trained model is and where it was saved, readable in a terminal
or a job log (the whole summary stays in ``summary.json``)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .eval_summary import at_chance


def _pct(value) -> str:
    return "   n/a" if value is None else f"{100 * value:6.2f} %"


def format_run_table(summary: dict) -> str:
    """``summary``: what :func:`casify.recipe.run` returns (``method``, ``cas``, ``output_dir``, ``steps``,
    ``best_step``, ``selected`` and ``test``, an ``EvalReport.summary()``). Natural, worst case and each attack
    family, a flag when the natural accuracy is at chance or some logits were NaN / inf, then the checks and the
    folders."""
    test = summary.get("test") or {}
    accuracy = dict(test.get("accuracy") or {})
    out = Path(str(summary.get("output_dir", ".")))
    method = str(summary.get("method", "?")).upper() + ("+CAS" if summary.get("cas") else "")
    threat = "L-inf" if test.get("norm", "linf") == "linf" else "L2"
    lines: List[str] = [
        f"casify {method}: {summary.get('steps')} steps; model selected: {summary.get('selected')}"
        + (f" (step {summary['best_step']})" if summary.get("best_step") is not None else ""),
        f"test set: {test.get('n')} images, {threat} eps {test.get('eps_str')}, {test.get('suite')} suite"
        + (f" ({test['mode']})" if test.get("mode") else ""),
        f"  {'natural':<28}{_pct(accuracy.pop('natural', None))}",
        f"  {'worst case (every attack)':<28}{_pct(accuracy.pop('worst_case', None))}",
    ]
    upper = set(test.get("upper_bounds") or [])
    for name, value in accuracy.items():
        label = ("<= " if name in upper else "") + name
        lines.append(f"  {label:<28}{_pct(value)}")
    natural, classes = (test.get("accuracy") or {}).get("natural"), test.get("num_classes")
    if natural is not None and at_chance(natural, classes, test.get("n")):
        lines.append(f"  AT CHANCE: natural {100 * natural:.2f} % for {classes} classes (chance "
                     f"{100 / classes:.1f} %): the model has not learned the task; its robust numbers mean nothing")
    if test.get("nonfinite_logits"):
        lines.append("  NaN / inf logits (scored wrong): " + ", ".join(
            f"{name} on {count}" for name, count in test["nonfinite_logits"].items()))
    suspected = test.get("gradient_masking_suspected")
    lines.append("  gradient masking: " + ("not checked" if suspected is None else
                                           f"SUSPECTED (failed: {', '.join(test.get('failed_checks') or [])})"
                                           if suspected else "no check failed"))
    overfit = summary.get("overfitting")
    if isinstance(overfit, dict):  # the Trainer's catastrophic-overfitting guard fired (casify.train.overfit_guard)
        condition = f" ({overfit['condition']})" if isinstance(overfit.get("condition"), str) else ""
        lines.append(f"  CATASTROPHIC OVERFITTING{condition} at step {overfit.get('step')}: held-out PGD accuracy "
                     f"{_pct(overfit.get('val_pgd')).strip()}, FGSM {_pct(overfit.get('val_fgsm')).strip()}; "
                     f"{overfit.get('selection', '')}")
    lines += [f"model:   {out / str(summary.get('selected', 'best'))}",
              f"card, report and figures: {out / 'hub'}",
              f"summary: {out / 'summary.json'}"]
    return "\n".join(lines)


__all__ = ["format_run_table"]
