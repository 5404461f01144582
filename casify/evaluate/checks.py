"""The gradient-masking checks: one function per check, each reading the evaluation's per-example flags
(:class:`CheckInputs`) and returning a :class:`~casify.evaluate.report.Check` (pass / fail / skipped, with its
evidence). Any failure sets the report's ``gradient_masking_suspected``.

- ``eps_monotone``: accuracy must not rise with eps (beyond noise) and PGD-20 at eps = 128/255 must leave fewer than
  10 % of examples correct (at that radius the constant grey image lies in every ball).
- ``more_steps_do_not_help``: PGD-100 accuracy <= PGD-20 accuracy + tolerance.
- ``black_box_not_stronger``: transfer / Square accuracy >= white-box worst case - tolerance.
- ``pgd_beats_noise``: PGD-20 must fool significantly more examples than uniform noise of the same size (paired
  one-sided McNemar test at 2 sigma), unless noise already leaves nothing to fool.
- ``nonzero_gradients``: at most 10 % of clean examples may have an all-zero (or non-finite) input gradient of the
  CW margin (the margin's gradient does not saturate the way a confident cross-entropy does).
- ``iterative_beats_single_step``: PGD-20 and PGD-100 accuracy <= FGSM accuracy + tolerance (same objective).
- ``final_logits_vs_adaptive`` (CAS models): the reported worst case must not lie above a check-only PGD-20 on the
  final logits alone (CE) or an adaptive PGD-20 (the ``pgd20[cas]`` row, or a check-only one when the report has
  none) by more than tolerance; it fails for an evaluation with final-logit attacks only. The gap between the two
  references is the evidence of how far final-logit-only numbers (a naive PGD, AutoAttack) overstate the model.
- ``best_vs_last_iterate``: for every iterative gradient row, last-iterate accuracy <= best-iterate accuracy + twice
  the tolerance (a larger gap says the answer depends on when the attack stops: the erratic loss surface that routing
  by argmax produces), and a row that keeps the last iterate (``Attack(keep="last")``) must not report more than the
  best iterate it passed through + tolerance.
- ``worst_case_near_single_attacks``: the worst case is no more than twice the tolerance below the strongest single
  attack: attacks that each miss many examples another one finds are unreliable one by one.
- ``autoattack_flags``: AutoAttack's own reliability flags (its ``warnings``), passed through: any flag fails.

Tolerance: two binomial standard errors of the reference accuracy, ``2 * sqrt(max(p (1 - p), 1 / n) / n)``, and at
least one percentage point.

In a cascade (a row whose result has ``accuracy`` None ran only on the examples every earlier row left correct) the
rows the checks compare whole run on every example (natural, FGSM, PGD-20, noise, the check-only attacks), and the
others adapt: ``more_steps_do_not_help`` is skipped (PGD-100 ran only on examples PGD-20 left correct);
``iterative_beats_single_step`` compares the rows that ran on every example; ``black_box_not_stronger`` asks that a
black-box row fool at most tol of the examples it attacked (all left correct by every earlier row), which implies the
per-attack condition; ``best_vs_last_iterate`` compares the iterates on the examples the row attacked;
``worst_case_near_single_attacks`` bounds each such row's accuracy (at least its survivors, at most that plus the
examples it did not attack) and passes or fails only when the bounds decide it (else skipped: "undetermined").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..eps import format_eps
from .plan import CHECK_ADAPTIVE, CHECK_FINAL_LOGITS, LARGE_EPS, Job
from .report import AttackResult, Check

LARGE_EPS_MAX_ACCURACY = 0.10
ZERO_GRAD_MAX_FRACTION = 0.10
MIN_TOLERANCE = 0.01


def tolerance(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy ``p`` on ``n`` examples, at least one point (see module doc)."""
    if n <= 0:
        return 1.0
    return max(MIN_TOLERANCE, 2.0 * math.sqrt(max(p * (1.0 - p), 1.0 / n) / n))


@dataclass
class CheckInputs:
    """What the checks read. ``jobs[:n_rows]`` are the report's rows (the rest are the eps sweep and the check-only
    attacks), ``results`` their results in the same order; per example (rows) and job (columns): ``correct``,
    ``ran`` (False where a cascade skipped the example), and for the iterative gradient rows ``correct_last`` /
    ``correct_best`` (the last and the best iterate, as the attack scored them); ``zero_grads``: per clean example,
    whether its input gradient was zero or non-finite."""
    results: List[AttackResult]
    jobs: List[Job]
    n_rows: int
    correct: torch.Tensor
    correct_last: torch.Tensor
    correct_best: torch.Tensor
    zero_grads: List[torch.Tensor]
    n: int
    eps: float
    cas: bool
    ran: Optional[torch.Tensor] = None
    by_name: Dict[str, Tuple[int, AttackResult]] = field(init=False)
    by_role: Dict[str, Tuple[int, AttackResult]] = field(init=False)

    def __post_init__(self):
        if self.ran is None:
            self.ran = torch.ones_like(self.correct)
        self.by_name = {r.name: (i, r) for i, r in enumerate(self.results)}
        self.by_role = {j.role: (i, self.results[i]) for i, j in enumerate(self.jobs[:self.n_rows]) if j.role}

    @property
    def rows(self) -> range:
        return range(self.n_rows)

    @property
    def worst(self) -> float:
        """The per-example worst case over the rows that enter it."""
        cols = [i for i in self.rows if self.jobs[i].in_worst_case]
        return int(self.correct[:, cols].all(dim=1).sum()) / self.n if self.n else 0.0

    def partial(self, i: int) -> bool:
        """Did row ``i`` run only on a cascade's survivors (so it has no accuracy of its own)?"""
        return self.results[i].accuracy is None


def check_eps_monotone(e: CheckInputs) -> Check:
    """Accuracy falls with eps and reaches ~0 at a large eps."""
    results = e.results
    n = e.n
    eps = e.eps
    by_name = e.by_name
    by_role = e.by_role
    points = [(0.0, by_name["natural"][1].accuracy)]
    if "pgd20" in by_role:
        points.append((eps, by_role["pgd20"][1].accuracy))
    points += [(r.eps, r.accuracy) for r in results if r.kind == "sweep" or r.name == f"pgd20@{format_eps(LARGE_EPS)}"]
    points.sort(key=lambda p: p[0])
    rises = [(format_eps(a[0]), format_eps(b[0])) for a, b in zip(points, points[1:])
             if b[0] > a[0] and b[1] > a[1] + tolerance(a[1], n)]
    large = by_name[f"pgd20@{format_eps(LARGE_EPS)}"][1].accuracy
    return Check("eps_monotone", not rises and large < LARGE_EPS_MAX_ACCURACY,
                 f"accuracy must not rise with eps and must fall below {100 * LARGE_EPS_MAX_ACCURACY:g} % at "
                 f"eps {format_eps(LARGE_EPS)}",
                 {"curve": [[format_eps(r), round(a, 4)] for r, a in points], "rises": rises,
                  "accuracy_at_large_eps": large})


def check_more_steps_do_not_help(e: CheckInputs) -> Check:
    """More steps must not help the model."""
    n = e.n
    partial = e.partial
    by_role = e.by_role
    if "pgd100" in by_role and partial(by_role["pgd100"][0]):
        return Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 on every example (per_attack=True)",
                     {"skipped": "cascade: PGD-100 ran only on the examples every earlier row left correct"})
    elif "pgd20" in by_role and "pgd100" in by_role:
        a20, a100 = by_role["pgd20"][1].accuracy, by_role["pgd100"][1].accuracy
        tol = tolerance(a20, n)
        return Check("more_steps_do_not_help", a100 <= a20 + tol, "PGD-100 accuracy <= PGD-20 accuracy + tol",
                     {"pgd20": a20, "pgd100": a100, "rows": [by_role["pgd20"][1].name, by_role["pgd100"][1].name],
                      "tolerance": tol})
    else:
        return Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 (the standard suite)",
                     {"skipped": "pgd20 or pgd100 not run"})


def check_black_box_not_stronger(e: CheckInputs) -> Check:
    """Black-box attacks must not beat white-box ones."""
    results = e.results
    jobs = e.jobs
    n = e.n
    correct = e.correct
    ran = e.ran
    partial = e.partial
    rows = e.rows
    white = [i for i in rows if jobs[i].kind in ("natural", "white-box", "adaptive", "autoattack")]
    black = [i for i in rows if jobs[i].kind == "black-box"]
    if black and len(white) > 1:
        white_flags = correct[:, white].all(dim=1)
        wb = float(white_flags.float().mean()) if n else 0.0
        tol = tolerance(wb, n)
        evidence = {"white_box_worst": wb, "tolerance": tol}
        ok = True
        for i in black:
            if partial(i):  # it attacked only what every earlier row left correct: what it fools there is the gap
                fooled = int((ran[:, i] & ~correct[:, i]).sum())
                evidence[f"{jobs[i].name}_attacked"] = int(ran[:, i].sum())
                evidence[f"{jobs[i].name}_fooled_survivors"] = fooled
                ok &= fooled / n <= tol
                continue
            acc = results[i].accuracy
            only_black = int((white_flags & ~correct[:, i]).sum())
            evidence[jobs[i].name] = acc
            evidence[f"{jobs[i].name}_fools_white_box_survivors"] = only_black
            ok &= acc >= wb - tol
        return Check("black_box_not_stronger", ok, "transfer / Square accuracy >= white-box worst case - tol "
                     "(cascade: a black-box row fools at most tol of the examples every earlier row left correct)",
                     evidence)
    else:
        return Check("black_box_not_stronger", None, "needs a black-box attack (transfer_from= or square_queries=)",
                     {"skipped": "no black-box attack run"})


def check_pgd_beats_noise(e: CheckInputs) -> Check:
    """PGD must beat uniform noise of the same size."""
    results = e.results
    n = e.n
    correct = e.correct
    by_name = e.by_name
    by_role = e.by_role
    if "pgd20" in by_role:
        i_pgd, i_noise = by_role["pgd20"][0], by_name["noise"][0]
        acc_pgd, acc_noise = results[i_pgd].accuracy, results[i_noise].accuracy
        pgd_only = int((correct[:, i_noise] & ~correct[:, i_pgd]).sum())
        noise_only = int((correct[:, i_pgd] & ~correct[:, i_noise]).sum())
        nothing_left = acc_noise <= tolerance(acc_noise, n)
        significant = pgd_only - noise_only > 2.0 * math.sqrt(pgd_only + noise_only) and acc_pgd < acc_noise
        return Check("pgd_beats_noise", bool(nothing_left or significant),
                     "PGD-20 fools significantly more examples than uniform noise (paired, 2 sigma)",
                     {"pgd20": acc_pgd, "row": results[i_pgd].name, "noise": acc_noise,
                      "fooled_by_pgd_only": pgd_only, "fooled_by_noise_only": noise_only})
    else:
        return Check("pgd_beats_noise", None, "needs pgd20", {"skipped": "pgd20 not run"})


def check_nonzero_gradients(e: CheckInputs) -> Check:
    """The input gradient exists."""
    zero_grads = e.zero_grads
    zero = torch.cat(zero_grads) if zero_grads else torch.zeros(0, dtype=torch.bool)
    frac = float(zero.float().mean()) if zero.numel() else 0.0
    return Check("nonzero_gradients", frac <= ZERO_GRAD_MAX_FRACTION,
                 f"at most {100 * ZERO_GRAD_MAX_FRACTION:g} % of clean examples with a zero or non-finite input "
                 "gradient of the CW margin", {"zero_gradient_fraction": frac, "n": int(zero.numel())})


def check_iterative_beats_single_step(e: CheckInputs) -> Check:
    """An iterative attack must not be weaker than a single step on the same objective."""
    n = e.n
    partial = e.partial
    by_role = e.by_role
    whole_iterative = [role for role in ("pgd20", "pgd100") if role in by_role and not partial(by_role[role][0])]
    if "fgsm" in by_role and whole_iterative:
        a_fgsm = by_role["fgsm"][1].accuracy
        tol = tolerance(a_fgsm, n)
        evidence = {by_role["fgsm"][1].name: a_fgsm, "tolerance": tol}
        ok = True
        for role in ("pgd20", "pgd100"):
            if role in by_role and partial(by_role[role][0]):
                evidence[by_role[role][1].name] = "not compared: ran only on the cascade's survivors"
            elif role in by_role:
                evidence[by_role[role][1].name] = by_role[role][1].accuracy
                ok &= by_role[role][1].accuracy <= a_fgsm + tol
        return Check("iterative_beats_single_step", ok, "PGD-20 / PGD-100 accuracy <= FGSM accuracy + tol "
                     "(same objective)", evidence)
    else:
        return Check("iterative_beats_single_step", None, "needs fgsm and pgd20 or pgd100",
                     {"skipped": "fgsm or pgd20/pgd100 not run"})


def check_final_logits_vs_adaptive(e: CheckInputs) -> Check:
    """Final-logit vs adaptive objectives (CAS models)."""
    n = e.n
    cas = e.cas
    by_name = e.by_name
    by_role = e.by_role
    worst = e.worst
    if cas and CHECK_FINAL_LOGITS in by_name:
        final = by_name[CHECK_FINAL_LOGITS][1].accuracy
        ref = by_role["pgd20"][1] if "pgd20" in by_role else by_name[CHECK_ADAPTIVE][1]
        adaptive = ref.accuracy
        tol = tolerance(min(final, adaptive), n)
        gap = final - adaptive
        passed = worst <= min(final, adaptive) + tol
        if not passed:
            verdict = ("the reported attacks miss what the adaptive objective finds: final-logit attacks overstate "
                       "this model" if adaptive <= final else "the reported attacks miss what a final-logit PGD finds")
        elif gap > tol:
            verdict = (f"final-logit gradients are masked (final-logit PGD-20 {100 * gap:.1f} points weaker than the "
                       "adaptive one): a final-logit-only number would overstate this model; the reported worst case "
                       "covers it")
        else:
            verdict = "consistent"
        return Check(
        "final_logits_vs_adaptive", bool(passed),
        "the reported worst case is no higher than a final-logit PGD-20 or an adaptive PGD-20 (check-only "
        "references where not rows) + tol; their gap says how much final-logit-only attacks overstate the model",
        {"final_logits_pgd20": final, "adaptive_pgd20": adaptive, "adaptive_row": ref.name,
         "final_minus_adaptive": gap, "worst_case": worst, "tolerance": tol, "verdict": verdict})
    else:
        return Check("final_logits_vs_adaptive", None, "needs a model with CAS modules",
                     {"skipped": "no CAS modules: the adaptive objectives are the final-logit ones"})


def check_best_vs_last_iterate(e: CheckInputs) -> Check:
    """The last iterate must not be far weaker than the best one, and no row may report a last iterate that is."""
    results = e.results
    jobs = e.jobs
    n = e.n
    correct = e.correct
    ran = e.ran
    partial = e.partial
    rows = e.rows
    correct_last = e.correct_last
    correct_best = e.correct_best
    iterative = [i for i in rows if jobs[i].iterative and (results[i].last_iterate_accuracy is not None
                                                           or (partial(i) and bool(ran[:, i].any())))]
    if iterative and n:
        evidence, ok, gaps = {}, True, []
        for i in iterative:
            on = ran[:, i]  # every example, or in a cascade the examples the row attacked
            m = int(on.sum())
            last = int(correct_last[on, i].sum()) / m
            best = int(correct_best[on, i].sum()) / m
            acc = int(correct[on, i].sum()) / m
            tol = tolerance(best, m)
            keeps_last = jobs[i].settings.get("keep") == "last"
            evidence[jobs[i].name] = {"best": round(best, 4), "last": round(last, 4),
                                      "keep": jobs[i].settings.get("keep")}
            if partial(i):
                evidence[jobs[i].name]["attacked"] = m
            gaps.append(last - best)
            ok &= last - best <= 2.0 * tol and not (keeps_last and acc - best > tol)
        evidence["largest_gap"] = max(gaps)
        return Check("best_vs_last_iterate", ok, "per iterative gradient row: last-iterate accuracy <= "
                     "best-iterate accuracy + 2 tol (a larger gap: the answer depends on when the attack stops), "
                     "and a row that keeps the last iterate reports <= best-iterate accuracy + tol", evidence)
    else:
        return Check("best_vs_last_iterate", None, "needs an iterative gradient attack",
                     {"skipped": "no iterative gradient attack run"})


def check_worst_case_near_single_attacks(e: CheckInputs) -> Check:
    """The worst case must not lie far below every single attack."""
    results = e.results
    jobs = e.jobs
    n = e.n
    correct = e.correct
    ran = e.ran
    partial = e.partial
    rows = e.rows
    worst = e.worst
    singles = [i for i in rows if jobs[i].in_worst_case and jobs[i].kind not in ("natural", "noise")]
    description = ("worst case >= strongest single attack - 2 tol (attacks that each miss many examples another finds "
                   "are unreliable one by one)")
    if len(singles) > 1 and n and not any(partial(i) for i in singles):
        strongest = min(singles, key=lambda i: results[i].accuracy)
        best_single = results[strongest].accuracy
        margin = 2.0 * tolerance(best_single, n)
        return Check("worst_case_near_single_attacks", worst >= best_single - margin, description,
                     {"worst_case": worst, "strongest_single": jobs[strongest].name,
                      "strongest_single_accuracy": best_single, "allowed_gap": margin})
    elif len(singles) > 1 and n:
        # a cascade: a row that ran on survivors only has accuracy in [its survivors, + the examples it skipped]
        low = {i: int(correct[:, i].sum()) / n for i in singles}
        high = {i: low[i] + (int((~ran[:, i]).sum()) / n if partial(i) else 0.0) for i in singles}
        hi_i, lo_i = min(singles, key=lambda i: high[i]), min(singles, key=lambda i: low[i])
        hi, lo = high[hi_i], low[lo_i]
        sure_pass = worst >= hi - 2.0 * tolerance(hi, n) and worst >= lo - 2.0 * tolerance(lo, n)
        sure_fail = worst < hi - 2.0 * tolerance(hi, n) and worst < lo - 2.0 * tolerance(lo, n)
        return Check("worst_case_near_single_attacks", True if sure_pass else (False if sure_fail else None),
                     description + " (cascade: decided from bounds on the strongest single attack, else "
                     "undetermined: run per_attack=True)",
                     {"worst_case": worst, "strongest_single_accuracy_bounds": [lo, hi],
                      "strongest_single_candidates": sorted({jobs[lo_i].name, jobs[hi_i].name}),
                      **({} if sure_pass or sure_fail else
                         {"skipped": "undetermined in a cascade: run per_attack=True"})})
    else:
        return Check("worst_case_near_single_attacks", None, "needs two attacks or more",
                     {"skipped": "fewer than two attacks"})


def check_autoattack_flags(e: CheckInputs) -> Check:
    """AutoAttack's own doubts, passed through: any flag it raised (zero gradients, Square lowering the accuracy
    its gradient attacks left, randomness, ...) fails the check with the flag's text as evidence."""
    rows = [j for j in e.jobs[:e.n_rows] if j.kind == "autoattack"]
    if not rows:
        return Check("autoattack_flags", None, "needs AutoAttack (autoattack=True)", {"skipped": "AutoAttack not run"})
    flags = {j.name: list(j.flags) for j in rows}
    return Check("autoattack_flags", not any(flags.values()), "AutoAttack raised none of its own reliability flags",
                 {"flags": flags})


CHECKS: Tuple[Callable[[CheckInputs], Check], ...] = (
    check_eps_monotone, check_more_steps_do_not_help, check_black_box_not_stronger, check_pgd_beats_noise,
    check_nonzero_gradients, check_iterative_beats_single_step, check_final_logits_vs_adaptive,
    check_best_vs_last_iterate, check_worst_case_near_single_attacks, check_autoattack_flags)


def run_checks(inputs: CheckInputs) -> List[Check]:
    """Every check, in the order the report lists them."""
    return [check(inputs) for check in CHECKS]
