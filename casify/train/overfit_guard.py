"""The catastrophic-overfitting guard: single-step adversarial training (FGSM, FGSM-RS, N-FGSM) can collapse within an
epoch, robust accuracy against multi-step attacks falling towards zero while accuracy against the single-step attack
it trains on soars (Wong et al. 2020, section 5; de Jorge et al. 2022). Nothing in the training loss shows it.

On the held-out batches the Trainer already validates on, each validation measures accuracy under PGD (``val_pgd``)
and under one FGSM step of eps from the clean input (``val_fgsm``, no random start, the step the authors of GradAlign
monitor). A validation after the first shows a **collapse** when either holds:

- **fell**: PGD accuracy is more than :data:`PGD_DROP` (20 points) below its best at an earlier validation of the run
  (the threshold of Wong et al.'s early stop, locuslab/fast_adversarial's train_fgsm.py) and FGSM accuracy is more
  than :data:`FGSM_GAP` (20 points) above PGD accuracy: the single-step attack no longer finds what PGD finds. A run
  that simply diverges loses both and is not called catastrophic overfitting;
- **masked**: FGSM accuracy is more than :data:`MASKING_GAP` (40 points) above PGD accuracy, whatever came before.
  A run whose eps is beyond what the model can resist may learn to defeat the single step without PGD accuracy ever
  rising (a small MLP on the embedded digits at eps 0.4, FGSM training: PGD accuracy stays at 0-5 % while FGSM
  accuracy climbs to 70-80 %, ``tests/test_overfit_guard.py``); there is no peak to fall from, but the model is in the
  state the collapse leads to. Multi-step AT can show the same gap (the Lite0 pilots of studies/lite0_cifar10, PGD-3
  with batch statistics in the update: 29-39 points), and the guard flags it alike, as gradient masking.

The first validation is never a collapse: the run keeps a checkpoint to fall back on.

The first collapse is warned about once and recorded (:func:`collapse_record`) in the run's state (``TrainState
.overfitting``, in ``summary.json`` and every saved model's training record, hence the model card). By default
(``train.overfit_guard: true``) the checkpoint selected before the collapse stays the selected one: a later validation
whose PGD accuracy climbs back above it cannot replace it, since PGD on a few hundred held-out images is a weak check of
a model that has learned to mask single-step gradients. ``overfit_guard: false`` keeps selecting by PGD accuracy (the
collapse is still detected, warned about and recorded)."""
from __future__ import annotations

from typing import List, Optional

from .. import attacks

PGD_DROP = 0.20
FGSM_GAP = 0.20
MASKING_GAP = 0.40


CONDITIONS = {"fell": "PGD accuracy fell from its best", "masked": "FGSM accuracy far above PGD accuracy"}
RULE = (f"PGD accuracy more than {PGD_DROP:.0%} below its best so far and FGSM accuracy more than {FGSM_GAP:.0%} "
        f"above it (fell), or FGSM accuracy more than {MASKING_GAP:.0%} above PGD accuracy (masked)")


def fgsm_check_attack(eps: float, objective: str, beta: float) -> attacks.Attack:
    """The guard's single-step attack: one step of eps from the clean input, the last (only) iterate."""
    return attacks.Attack(name="val-fgsm", kind="fgsm", eps=eps, alpha=eps, random_start="none", objective=objective,
                          beta=beta, keep="last")


def collapse_record(history: List[dict], current: dict) -> Optional[dict]:
    """The collapse that validation ``current`` shows against the earlier validations in ``history`` (each with
    ``step``, ``val_pgd`` and ``val_fgsm``), or None. The record names both validations and the thresholds."""
    if current.get("val_fgsm") is None or current.get("val_pgd") is None:
        return None
    earlier = [h for h in history if h.get("val_pgd") is not None]
    if not earlier:
        return None
    best = max(earlier, key=lambda h: h["val_pgd"])  # the first of equal bests: the earliest such checkpoint
    drop = best["val_pgd"] - current["val_pgd"]
    gap = current["val_fgsm"] - current["val_pgd"]
    if drop > PGD_DROP and gap > FGSM_GAP:
        trigger = "fell"
    elif gap > MASKING_GAP:
        trigger = "masked"
    else:
        return None
    return {"step": current["step"], "epoch": current.get("epoch"), "val_pgd": current["val_pgd"],
            "val_fgsm": current["val_fgsm"], "val_natural": current.get("val_natural"),
            "best_pgd": best["val_pgd"], "best_pgd_step": best["step"], "pgd_drop": drop, "fgsm_minus_pgd": gap,
            # the fallback's own gap: above MASKING_GAP, the checkpoint kept was already masked (first validation)
            "best_fgsm_minus_pgd": None if best.get("val_fgsm") is None else best["val_fgsm"] - best["val_pgd"],
            "trigger": trigger, "condition": CONDITIONS[trigger], "rule": RULE}


def describe(record: dict) -> str:
    """One line for the warning, the run table and the model card."""
    condition = f" ({record['condition']})" if isinstance(record.get("condition"), str) else ""
    return (f"catastrophic overfitting{condition} at step {record['step']}: held-out PGD accuracy "
            f"{record['val_pgd']:.1%} (best {record['best_pgd']:.1%} at step {record['best_pgd_step']}) while FGSM "
            f"accuracy is {record['val_fgsm']:.1%}; {record.get('selection', '')}").rstrip("; ")


__all__ = ["CONDITIONS", "FGSM_GAP", "MASKING_GAP", "PGD_DROP", "RULE", "collapse_record", "describe",
           "fgsm_check_attack"]
