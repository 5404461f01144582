"""The statistics of Section 3 as pure functions of tensors: channel magnitude (Figure 1), activation frequency
(Figure 2) and the summaries that turn them into a few numbers (gaps, normalised entropy, Gini).

Inputs are (N, C) channel-wise activations or per-channel (C,) vectors; nothing here runs a model, so each statistic can
be checked by hand on constructed tensors.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch


def _check_acts(acts: torch.Tensor) -> torch.Tensor:
    acts = torch.as_tensor(acts).float()
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"expected channel-wise activations of shape (N, C) with N >= 1, got {tuple(acts.shape)}")
    return acts


def channel_magnitude(acts: torch.Tensor) -> torch.Tensor:
    """Mean absolute activation per channel over examples (the paper's Figure 1)."""
    return _check_acts(acts).abs().mean(dim=0)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def magnitude_gap(natural: torch.Tensor, adversarial: torch.Tensor) -> Dict[str, float]:
    """How much adversarial examples boost channel magnitudes: mean over channels of adv - nat, and mean adv / mean
    nat (> 1 means the signal-boosting effect of Section 3). Inputs are per-channel magnitudes."""
    nat, adv = torch.as_tensor(natural).float(), torch.as_tensor(adversarial).float()
    return {"mean_natural": float(nat.mean()), "mean_adversarial": float(adv.mean()),
            "mean_difference": float((adv - nat).mean()), "ratio": _ratio(float(adv.mean()), float(nat.mean()))}


def activation_frequency(acts: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Per channel, the fraction of examples that activate it (the paper's Figure 2).

    A channel is active in an example when its value exceeds ``threshold`` times the example's largest channel value
    (1 % by default, as in the paper). An example whose largest value is not positive activates nothing.
    """
    acts = _check_acts(acts)
    peak = acts.amax(dim=1, keepdim=True).clamp(min=0)
    return (acts > threshold * peak).float().mean(dim=0)


def normalized_entropy(freq: torch.Tensor) -> float:
    """Entropy of the frequencies normalised to sum 1, divided by log C: 1 for a uniform spread over channels, 0 when
    one channel takes everything. NaN when no channel is ever active; 1 for a single channel."""
    f = torch.as_tensor(freq).double().flatten()
    if f.numel() < 2:
        return 1.0
    total = f.sum()
    if total <= 0:
        return float("nan")
    p = f[f > 0] / total
    return float(-(p * p.log()).sum() / math.log(f.numel()))


def gini(freq: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (C - 1) / C when one channel takes everything.
    NaN when all are zero."""
    f = torch.as_tensor(freq).double().flatten().sort().values
    n, total = f.numel(), f.sum()
    if n == 0 or total <= 0:
        return float("nan")
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * f).sum() / (n * total))


def frequency_gap(natural: torch.Tensor, adversarial: torch.Tensor, rare_fraction: float = 0.5) -> Dict[str, float]:
    """How differently adversarial examples use the channels than natural ones.

    ``mean_abs_difference``: mean over channels of |adv - nat|. The rare channels are the ``rare_fraction`` of
    channels natural examples activate least (the right half of Figure 2, ties by channel index);
    ``rare_frequency_adversarial`` is the adversarial frequency there: the paper's observation is that adversarial
    examples activate these non-robust channels far more often than natural ones, and that CAS suppresses it.
    """
    nat, adv = torch.as_tensor(natural).float().flatten(), torch.as_tensor(adversarial).float().flatten()
    if nat.shape != adv.shape:
        raise ValueError(f"natural and adversarial frequencies differ in shape: {tuple(nat.shape)} vs "
                         f"{tuple(adv.shape)}")
    order = torch.sort(nat, descending=True, stable=True).indices
    k = max(1, int(nat.numel() * rare_fraction))
    rare, frequent = order[-k:], order[:-k]
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    return {"mean_abs_difference": float((adv - nat).abs().mean()), "rare_channels": int(k),
            "rare_frequency_natural": mean(nat[rare]), "rare_frequency_adversarial": mean(adv[rare]),
            "frequent_frequency_natural": mean(nat[frequent]), "frequent_frequency_adversarial": mean(adv[frequent])}


def frequency_summary(natural: torch.Tensor, adversarial: torch.Tensor, rare_fraction: float = 0.5) -> Dict[str, float]:
    """Uniformity (normalised entropy, Gini) of both frequency vectors and their gap, in one flat dict."""
    return {"entropy_natural": normalized_entropy(natural), "entropy_adversarial": normalized_entropy(adversarial),
            "gini_natural": gini(natural), "gini_adversarial": gini(adversarial),
            **frequency_gap(natural, adversarial, rare_fraction)}


def class_frequency_summary(natural_acts: torch.Tensor, adversarial_acts: torch.Tensor, labels: torch.Tensor,
                            threshold: float = 0.01, rare_fraction: float = 0.5) -> Dict[str, float]:
    """:func:`frequency_summary` per class (frequencies counted within each class, as in the paper), averaged over the
    classes present; ``classes`` says how many."""
    labels = torch.as_tensor(labels).flatten()
    rows = []
    for c in torch.unique(labels).tolist():
        keep = labels == c
        rows.append(frequency_summary(activation_frequency(natural_acts[keep], threshold),
                                      activation_frequency(adversarial_acts[keep], threshold), rare_fraction))
    if not rows:
        raise ValueError("no examples")
    out = {key: float(np.nanmean([r[key] for r in rows])) if not all(math.isnan(r[key]) for r in rows)
           else float("nan") for key in rows[0]}
    out["classes"] = len(rows)
    return out

