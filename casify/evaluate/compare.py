"""Is model A more robust than model B? Paired tests on the same images, Welch's test across seeds, and the verdict
rule casify's studies use ("reproduced" only when a statistical test says so).

Two evaluations of the same images are paired: what matters is the images one model gets right and the other does
not (McNemar). Across training seeds the per-seed differences are compared with Welch's t-test (unequal variances).
scipy does the distributions (an exact binomial McNemar and Welch's t); what is written here is only the bookkeeping.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

Z95 = 1.959964


@dataclass
class PairedComparison:
    """Model A vs model B on the same ``n`` images: ``a_only`` / ``b_only``, the images only A / only B gets right;
    ``diff`` = accuracy(A) - accuracy(B) with its paired 95 % interval ``ci95`` (Wald, on the per-image
    differences); ``z`` = (a_only - b_only) / sqrt(a_only + b_only), McNemar's statistic; ``p`` its exact two-sided
    p-value (binomial on the discordant pairs)."""
    n: int
    a_only: int
    b_only: int
    diff: float
    ci95: List[float]
    z: float
    p: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_counts(a_only: int, b_only: int, n: int) -> PairedComparison:
    from scipy.stats import binomtest
    d = (a_only - b_only) / n if n else 0.0
    var = max(((a_only + b_only) / n - d * d) / n, 0.0) if n else 0.0
    half = Z95 * math.sqrt(var)
    discordant = a_only + b_only
    z = (a_only - b_only) / math.sqrt(discordant) if discordant else 0.0
    p = binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return PairedComparison(n, a_only, b_only, d, [d - half, d + half], z, float(p))


def paired(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> PairedComparison:
    """McNemar on per-image correct flags of A and B (the same images in the same order)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired flags must cover the same images: {len(a_correct)} vs {len(b_correct)}")
    a_only = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    b_only = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    return paired_counts(a_only, b_only, len(a_correct))


def pooled(comparisons: Sequence[PairedComparison]) -> PairedComparison:
    """One McNemar over several seeds' pairs (discordant pairs summed). The same images recur across seeds, so its
    interval is somewhat narrow; the per-seed comparisons and Welch's test are the check on it."""
    return paired_counts(sum(c.a_only for c in comparisons), sum(c.b_only for c in comparisons),
                         sum(c.n for c in comparisons))


@dataclass
class WelchComparison:
    """Per-seed accuracies of A and B: the difference of means, Welch's t, its two-sided p and 95 % interval (None
    with fewer than two seeds per side or no spread)."""
    mean_a: float
    mean_b: float
    diff: float
    t: Optional[float]
    df: Optional[float]
    p: Optional[float]
    ci95: Optional[List[float]]

    def to_dict(self) -> dict:
        return asdict(self)


def welch(a: Sequence[float], b: Sequence[float]) -> WelchComparison:
    from scipy import stats
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return WelchComparison(ma, mb, ma - mb, None, None, None, None)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return WelchComparison(ma, mb, ma - mb, None, None, None, None)
    result = stats.ttest_ind(list(a), list(b), equal_var=False)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    return WelchComparison(ma, mb, ma - mb, float(result.statistic), float(df), float(result.pvalue),
                           [ma - mb - half, ma - mb + half])


VERDICT_RULE = (
    "A vs B (A is the arm the claim favours): 'reproduced' when A's accuracy minus B's is > 0 in every seed AND the "
    "pooled paired McNemar test gives z > 2; 'opposite' when it is < 0 in every seed AND z < -2 (the effect is "
    "significant and reversed); otherwise 'not reproduced' when the pooled paired 95 % interval lies entirely below "
    "the paper's claimed effect (the claimed gain is excluded), else 'inconclusive'. Welch's test across seeds is "
    "reported next to it. A claim of 'no gain' is reproduced when A does not significantly beat B (z <= 2).")


def verdict(per_seed: Sequence[PairedComparison], claimed_effect: Optional[float] = None,
            claim_is_no_gain: bool = False) -> str:
    """The rule in :data:`VERDICT_RULE`, on the per-seed paired comparisons (accuracy units, e.g. 0.024)."""
    if not per_seed:
        raise ValueError("no comparisons to judge")
    pool = pooled(per_seed)
    if claim_is_no_gain:
        return "not reproduced" if (pool.z > 2 and all(c.diff > 0 for c in per_seed)) else "reproduced"
    if all(c.diff > 0 for c in per_seed) and pool.z > 2:
        return "reproduced"
    if all(c.diff < 0 for c in per_seed) and pool.z < -2:
        return "opposite"
    if claimed_effect is not None and pool.ci95[1] < claimed_effect:
        return "not reproduced"
    return "inconclusive"


SEED_RULE = (
    "A vs B, trained with the same seeds (A is the arm the hypothesis favours): the per-seed difference d_s = "
    "accuracy(A, seed s) - accuracy(B, seed s) on the same test images is the unit of evidence. Primary interval: "
    "Student's t 95 % interval of the mean of d_s over the seeds (training variance); secondary: a two-level "
    "bootstrap (seeds resampled, then images resampled within each seed from its paired counts; 95 % percentile "
    "interval). 'A better' when both intervals lie entirely above 0; 'A worse' when both lie entirely below 0; "
    "otherwise 'inconclusive', stated with the t interval. At least 3 seeds; pooled McNemar is reported as the "
    "per-image view only.")


@dataclass
class SeedComparison:
    """A vs B over seeds (:data:`SEED_RULE`): per-seed paired comparisons, the mean difference with its t interval
    and two-level bootstrap interval, and the verdict."""
    seeds: List[int]
    per_seed: List[dict]
    mean_diff: float
    t_ci95: Optional[List[float]]
    bootstrap_ci95: List[float]
    pooled_mcnemar: dict
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def seed_comparison(per_seed: Sequence[PairedComparison], seeds: Sequence[int], *, resamples: int = 20000,
                    rng_seed: int = 0) -> SeedComparison:
    """The rule in :data:`SEED_RULE` on one paired comparison per seed (each from :func:`paired` or
    :func:`paired_counts`, so committed counts can be re-scored without their per-image flags)."""
    import numpy as np
    from scipy import stats
    if len(per_seed) != len(seeds):
        raise ValueError(f"one comparison per seed: {len(per_seed)} comparisons for {len(seeds)} seeds")
    if len(per_seed) < 3:
        raise ValueError(f"the seed rule needs at least 3 seeds, got {len(per_seed)}")
    diffs = np.array([c.diff for c in per_seed])
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs)))
    t_ci = [mean - half, mean + half]
    rng = np.random.default_rng(rng_seed)
    k = len(per_seed)
    pick = rng.integers(0, k, size=(resamples, k))
    draws = np.empty((k, resamples, k))  # draws[seed, r, slot]: an independent image resample for every slot
    for j, c in enumerate(per_seed):  # images resampled = multinomial over (A only, B only, agree) on its n images
        probs = [c.a_only / c.n, c.b_only / c.n]
        counts = rng.multinomial(c.n, probs + [max(0.0, 1.0 - sum(probs))], size=(resamples, k))
        draws[j] = (counts[..., 0] - counts[..., 1]) / c.n
    boot = draws[pick, np.arange(resamples)[:, None], np.arange(k)[None, :]].mean(axis=1)
    b_ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    if t_ci[0] > 0 and b_ci[0] > 0:
        word = "A better"
    elif t_ci[1] < 0 and b_ci[1] < 0:
        word = "A worse"
    else:
        word = "inconclusive"
    return SeedComparison(list(seeds), [dict(c.to_dict(), seed=s) for c, s in zip(per_seed, seeds)], mean, t_ci, b_ci,
                          pooled(per_seed).to_dict(), word)


CROSSED_SEED_RULE = (
    "A vs B, trained with the same seeds and scored on the same test images (A is the arm the hypothesis favours), "
    "both arms run at one commit: the per-seed difference d_s = accuracy(A, s) - accuracy(B, s) is the unit of "
    "evidence. Intervals: Student's t 95 % interval of the mean of d_s over the seeds, and a crossed bootstrap "
    "(seeds and images resampled jointly: one draw of image indices serves every seed, because the same images recur "
    "in every seed; 95 % percentile interval). The comparison's p-value is the larger of the t test's and the "
    "bootstrap's (two-sided); p-values are Holm-adjusted over the family of comparisons a study judges together. "
    "'A better' / 'A worse' when the Holm-adjusted p < 0.05 (then both intervals exclude 0) with that sign; otherwise "
    "'inconclusive', stated with the intervals. At least 3 seeds; arms whose commits differ are reported, never "
    "judged.")


@dataclass
class CrossedComparison:
    """A vs B over seeds by :data:`CROSSED_SEED_RULE`: the mean per-seed difference, its t and crossed-bootstrap
    intervals and p-values, the seed and image standard errors (which source of noise dominates), and the verdict
    before (``verdict_unadjusted``) and after the family's Holm adjustment (``verdict``, set by :func:`judge_family`)."""
    seeds: List[int]
    per_seed_diff: List[float]
    mean_diff: float
    t_ci95: List[float]
    bootstrap_ci95: List[float]
    p_t: float
    p_bootstrap: float
    p: float
    seed_se: float
    image_se: float
    verdict_unadjusted: str
    p_holm: Optional[float] = None
    verdict: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _word(p: float, mean: float) -> str:
    if p < 0.05:
        return "A better" if mean > 0 else "A worse"
    return "inconclusive"


def crossed_seed_comparison(a_flags, b_flags, seeds: Sequence[int], *, resamples: int = 20000,
                            rng_seed: int = 0) -> CrossedComparison:
    """The rule in :data:`CROSSED_SEED_RULE` on per-image correct flags, ``(seeds, images)`` for each arm, the same
    images in the same order in every row. Why crossed: resampling images independently per seed treats the
    seeds' shared test images as fresh ones and understates the image-level noise."""
    import numpy as np
    from scipy import stats
    a, b = np.asarray(a_flags, dtype=float), np.asarray(b_flags, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"flags must be (seeds, images) arrays of one shape, got {a.shape} and {b.shape}")
    k, n = a.shape
    if k != len(seeds):
        raise ValueError(f"one row of flags per seed: {k} rows for {len(seeds)} seeds")
    if k < 3:
        raise ValueError(f"the seed rule needs at least 3 seeds, got {k}")
    if n == 0:
        raise ValueError("no test images to compare on")
    d = a - b
    per_seed = d.mean(axis=1)
    mean = float(per_seed.mean())
    seed_se = float(per_seed.std(ddof=1) / math.sqrt(k))
    if seed_se > 0:
        half = float(stats.t.ppf(0.975, k - 1) * seed_se)
        p_t = float(2 * stats.t.sf(abs(mean) / seed_se, k - 1))
    else:  # every seed differs by the same amount: the t test says nothing about its sign beyond that
        half, p_t = 0.0, (0.0 if mean != 0 else 1.0)
    rng = np.random.default_rng(rng_seed)
    boot = np.empty(resamples)
    image_means = np.empty(resamples)
    chunk = 2000
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=r) / n  # one image draw shared by every seed
        per = weights @ d.T  # (r, seeds): each seed's difference on the drawn images
        pick = rng.integers(0, k, size=(r, k))
        boot[start:start + r] = per[np.arange(r)[:, None], pick].mean(axis=1)
        image_means[start:start + r] = per.mean(axis=1)  # seeds held fixed: the image-level noise alone
    b_ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    p_boot = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    p = max(p_t, p_boot)
    return CrossedComparison(list(seeds), [float(x) for x in per_seed], mean, [mean - half, mean + half], b_ci, p_t,
                             p_boot, p, seed_se, float(image_means.std(ddof=1)), _word(p, mean))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given): the family-wise error stays at
    the level without assuming the comparisons are independent."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def judge_family(comparisons: "dict[str, CrossedComparison]",
                 family_size: Optional[int] = None) -> "dict[str, CrossedComparison]":
    """Holm-adjust the family's p-values and set each comparison's ``p_holm`` and ``verdict`` (in place; returned).
    ``family_size``: the family as the rule wrote it; members that could not be judged (too few seeds, mixed code)
    count with p = 1, so leaving one out never makes the correction milder than the rule."""
    names = list(comparisons)
    if family_size is not None and family_size < len(names):
        raise ValueError(f"family_size {family_size} is smaller than the {len(names)} comparisons judged")
    pvalues = [comparisons[n].p for n in names] + [1.0] * ((family_size or len(names)) - len(names))
    for name, p in zip(names, holm(pvalues)):
        comparisons[name].p_holm = p
        comparisons[name].verdict = _word(p, comparisons[name].mean_diff)
    return comparisons


__all__ = ["CROSSED_SEED_RULE", "CrossedComparison", "SEED_RULE", "SeedComparison", "crossed_seed_comparison",
           "holm", "judge_family", "seed_comparison", "PairedComparison", "VERDICT_RULE", "WelchComparison", "paired",
           "paired_counts", "pooled", "verdict", "welch"]
