"""The statistics behind casify's verdicts (casify.evaluate.compare): hand-computable cases."""
import math

import pytest

from casify.evaluate.compare import paired, pooled, verdict, welch


def test_paired_counts_discordant_images_only():
    a = [True, True, False, False, True, True]
    b = [True, False, False, True, False, False]
    c = paired(a, b)
    assert (c.n, c.a_only, c.b_only) == (6, 3, 1)
    assert c.diff == pytest.approx(2 / 6)
    assert c.z == pytest.approx(2 / math.sqrt(4))
    assert c.p == pytest.approx(0.625)  # exact binomial: P(|X - 2| >= 1), X ~ Bin(4, 1/2)
    assert c.ci95[0] < c.diff < c.ci95[1]


def test_paired_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        paired([True], [True, False])


def test_verdicts_follow_the_rule():
    strong = [paired([True] * 30 + [False] * 70, [False] * 30 + [False] * 70)] * 3  # A wins 30 images per seed
    assert pooled(strong).z > 2 and verdict(strong) == "reproduced"
    reversed_ = [paired([False] * 100, [True] * 30 + [False] * 70)] * 3
    assert verdict(reversed_) == "opposite"
    tie = [paired([True, False] * 50, [False, True] * 50)] * 3  # as many wins as losses: diff 0, interval +-
    assert verdict(tie, claimed_effect=0.5) == "not reproduced"  # a 50-point gain is excluded by the interval
    assert verdict(tie, claimed_effect=0.01) == "inconclusive"
    assert verdict(tie, claim_is_no_gain=True) == "reproduced"
    assert verdict(strong, claim_is_no_gain=True) == "not reproduced"


def test_welch_matches_the_formula():
    w = welch([0.30, 0.32, 0.31], [0.20, 0.22, 0.21])
    assert w.diff == pytest.approx(0.10)
    se = math.sqrt(0.0001 / 3 + 0.0001 / 3)
    assert w.t == pytest.approx(0.10 / se) and w.df == pytest.approx(4.0)
    assert w.p < 0.001 and w.ci95[0] < 0.10 < w.ci95[1]
    assert welch([0.3], [0.2]).p is None  # one seed per side: no test


def test_seed_rule_judges_per_seed_differences():
    from casify.evaluate.compare import paired_counts, seed_comparison
    better = [paired_counts(40, 10, 846), paired_counts(35, 12, 846), paired_counts(38, 9, 846)]
    c = seed_comparison(better, [0, 1, 2])
    diffs = [30 / 846, 23 / 846, 29 / 846]
    assert c.mean_diff == pytest.approx(sum(diffs) / 3)
    assert c.t_ci95[0] > 0 and c.bootstrap_ci95[0] > 0 and c.verdict == "A better"
    worse = [paired_counts(b, a, n) for a, b, n in ((40, 10, 846), (35, 12, 846), (38, 9, 846))]
    assert seed_comparison(worse, [0, 1, 2]).verdict == "A worse"
    # one seed against the others: the t interval over seeds covers 0 although each seed's McNemar is significant
    mixed = [paired_counts(40, 10, 846), paired_counts(10, 40, 846), paired_counts(40, 10, 846)]
    m = seed_comparison(mixed, [0, 1, 2])
    assert m.t_ci95[0] < 0 < m.t_ci95[1] and m.verdict == "inconclusive"
    assert m.pooled_mcnemar["z"] > 2  # the per-image view alone would have called it
    with pytest.raises(ValueError, match="at least 3 seeds"):
        seed_comparison(better[:2], [0, 1])


def test_holm_adjustment_known_values_and_order():
    from casify.evaluate.compare import holm
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2]) == [0.2] and holm([]) == []
    assert holm([0.9, 0.9, 0.9]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1


def test_crossed_bootstrap_resamples_images_jointly_and_judges_the_family():
    import numpy as np
    from casify.evaluate.compare import crossed_seed_comparison, judge_family
    rng = np.random.default_rng(0)
    n = 400
    hard = rng.random(n)  # per-image difficulty, shared by every seed: what makes the design crossed
    a = np.array([rng.random(n) < 0.2 + 0.6 * hard for _ in range(4)])
    b_worse = np.array([rng.random(n) < 0.05 + 0.6 * hard for _ in range(4)])
    same = crossed_seed_comparison(a, a, [0, 1, 2, 3], resamples=2000)
    assert same.mean_diff == 0 and same.verdict_unadjusted == "inconclusive" and same.p == 1.0
    better = crossed_seed_comparison(a, b_worse, [0, 1, 2, 3], resamples=2000)
    assert better.mean_diff > 0.1 and better.verdict_unadjusted == "A better"
    assert better.bootstrap_ci95[0] > 0 and better.t_ci95[0] > 0 and better.image_se > 0
    worse = crossed_seed_comparison(b_worse, a, [0, 1, 2, 3], resamples=2000)
    assert worse.verdict_unadjusted == "A worse"
    # a borderline p that passes alone fails once adjusted within a larger family
    edge = crossed_seed_comparison(a, a, [0, 1, 2, 3], resamples=10)
    edge.p, edge.mean_diff = 0.03, 0.01
    family = judge_family({"better": better, "edge": edge, "same": same})
    assert family["better"].verdict == "A better" and family["edge"].p_holm == pytest.approx(0.06)
    assert family["edge"].verdict == "inconclusive" and family["same"].verdict == "inconclusive"
    with pytest.raises(ValueError, match="at least 3 seeds"):
        crossed_seed_comparison(a[:2], a[:2], [0, 1])
    with pytest.raises(ValueError, match="one shape"):
        crossed_seed_comparison(a, a[:, :10], [0, 1, 2, 3])
