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
- ``finite_logits``: no attack (row, sweep or check-only) made the deployed model output a NaN or inf logit. Such an
  example is scored wrong (``argmax`` over NaN returns 0, which would credit a broken model with class 0); the check
  fails, so the masking flag rises, and it runs even with ``checks=False`` since it costs nothing.

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

from ..attacks.threat_model import format_radius
from .plan import CHECK_ADAPTIVE, CHECK_FINAL_LOGITS, LARGE_EPS_ROLE, Job
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
    norm: str = "linf"
    nonfinite: Optional[torch.Tensor] = None  # per example and job: NaN / inf logits on the deployed model
    nonfinite_elsewhere: Dict[str, int] = field(default_factory=dict)  # the eps sweep's: attack@eps -> examples
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
    """Accuracy falls with eps and reaches ~0 at a large eps. The points: natural (eps 0), PGD-20 at eps, the sweep's
    PGD-20 rows (the eps sweep's evaluations, :func:`casify.evaluate.evaluate`) and the large-eps PGD-20."""
    big = next(r for j, r in zip(e.jobs, e.results) if j.role == LARGE_EPS_ROLE)
    points = [(0.0, e.by_name["natural"][1].accuracy)]
    if "pgd20" in e.by_role:
        points.append((e.eps, e.by_role["pgd20"][1].accuracy))
    points += [(r.eps, r.accuracy) for r in e.results if r.kind == "sweep" and r.accuracy is not None] \
        + [(big.eps, big.accuracy)]
    points.sort(key=lambda p: p[0])

    def show(eps: float) -> str:
        return format_radius(eps, e.norm)

    rises = [(show(a[0]), show(b[0])) for a, b in zip(points, points[1:])
             if b[0] > a[0] and b[1] > a[1] + tolerance(a[1], e.n)]
    return Check("eps_monotone", not rises and big.accuracy < LARGE_EPS_MAX_ACCURACY,
                 f"accuracy must not rise with eps and must fall below {100 * LARGE_EPS_MAX_ACCURACY:g} % at "
                 f"eps {show(big.eps)}",
                 {"curve": [[show(r), round(a, 4)] for r, a in points], "rises": rises,
                  "accuracy_at_large_eps": big.accuracy})


def check_more_steps_do_not_help(e: CheckInputs) -> Check:
    """More steps must not help the model."""
    if "pgd100" in e.by_role and e.partial(e.by_role["pgd100"][0]):
        return Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 on every example (per_attack=True)",
                     {"skipped": "cascade: PGD-100 ran only on the examples every earlier row left correct"})
    elif "pgd20" in e.by_role and "pgd100" in e.by_role:
        a20, a100 = e.by_role["pgd20"][1].accuracy, e.by_role["pgd100"][1].accuracy
        tol = tolerance(a20, e.n)
        return Check("more_steps_do_not_help", a100 <= a20 + tol, "PGD-100 accuracy <= PGD-20 accuracy + tol",
                     {"pgd20": a20, "pgd100": a100, "rows": [e.by_role["pgd20"][1].name, e.by_role["pgd100"][1].name],
                      "tolerance": tol})
    else:
        return Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 (the standard suite)",
                     {"skipped": "pgd20 or pgd100 not run"})


def check_black_box_not_stronger(e: CheckInputs) -> Check:
    """Black-box attacks must not beat white-box ones."""
    white = [i for i in e.rows if e.jobs[i].kind in ("natural", "white-box", "adaptive", "autoattack")]
    black = [i for i in e.rows if e.jobs[i].kind == "black-box"]
    if black and len(white) > 1:
        white_flags = e.correct[:, white].all(dim=1)
        wb = float(white_flags.float().mean()) if e.n else 0.0
        tol = tolerance(wb, e.n)
        evidence = {"white_box_worst": wb, "tolerance": tol}
        ok = True
        for i in black:
            if e.partial(i):  # it attacked only what every earlier row left correct: what it fools there is the gap
                fooled = int((e.ran[:, i] & ~e.correct[:, i]).sum())
                evidence[f"{e.jobs[i].name}_attacked"] = int(e.ran[:, i].sum())
                evidence[f"{e.jobs[i].name}_fooled_survivors"] = fooled
                ok &= fooled / e.n <= tol
                continue
            acc = e.results[i].accuracy
            only_black = int((white_flags & ~e.correct[:, i]).sum())
            evidence[e.jobs[i].name] = acc
            evidence[f"{e.jobs[i].name}_fools_white_box_survivors"] = only_black
            ok &= acc >= wb - tol
        return Check("black_box_not_stronger", ok, "transfer / Square accuracy >= white-box worst case - tol "
                     "(cascade: a black-box row fools at most tol of the examples every earlier row left correct)",
                     evidence)
    else:
        return Check("black_box_not_stronger", None, "needs a black-box attack (transfer_from= or square_queries=)",
                     {"skipped": "no black-box attack run"})


def check_pgd_beats_noise(e: CheckInputs) -> Check:
    """PGD must beat uniform noise of the same size."""
    if "pgd20" in e.by_role:
        i_pgd, i_noise = e.by_role["pgd20"][0], e.by_name["noise"][0]
        acc_pgd, acc_noise = e.results[i_pgd].accuracy, e.results[i_noise].accuracy
        pgd_only = int((e.correct[:, i_noise] & ~e.correct[:, i_pgd]).sum())
        noise_only = int((e.correct[:, i_pgd] & ~e.correct[:, i_noise]).sum())
        nothing_left = acc_noise <= tolerance(acc_noise, e.n)
        significant = pgd_only - noise_only > 2.0 * math.sqrt(pgd_only + noise_only) and acc_pgd < acc_noise
        return Check("pgd_beats_noise", bool(nothing_left or significant),
                     "PGD-20 fools significantly more examples than uniform noise (paired, 2 sigma)",
                     {"pgd20": acc_pgd, "row": e.results[i_pgd].name, "noise": acc_noise,
                      "fooled_by_pgd_only": pgd_only, "fooled_by_noise_only": noise_only})
    else:
        return Check("pgd_beats_noise", None, "needs pgd20", {"skipped": "pgd20 not run"})


def check_nonzero_gradients(e: CheckInputs) -> Check:
    """The input gradient exists."""
    zero = torch.cat(e.zero_grads) if e.zero_grads else torch.zeros(0, dtype=torch.bool)
    frac = float(zero.float().mean()) if zero.numel() else 0.0
    return Check("nonzero_gradients", frac <= ZERO_GRAD_MAX_FRACTION,
                 f"at most {100 * ZERO_GRAD_MAX_FRACTION:g} % of clean examples with a zero or non-finite input "
                 "gradient of the CW margin", {"zero_gradient_fraction": frac, "n": int(zero.numel())})


def check_iterative_beats_single_step(e: CheckInputs) -> Check:
    """An iterative attack must not be weaker than a single step on the same objective."""
    whole_iterative = [role for role in ("pgd20", "pgd100") if role in e.by_role and not e.partial(e.by_role[role][0])]
    if "fgsm" in e.by_role and whole_iterative:
        a_fgsm = e.by_role["fgsm"][1].accuracy
        tol = tolerance(a_fgsm, e.n)
        evidence = {e.by_role["fgsm"][1].name: a_fgsm, "tolerance": tol}
        ok = True
        for role in ("pgd20", "pgd100"):
            if role in e.by_role and e.partial(e.by_role[role][0]):
                evidence[e.by_role[role][1].name] = "not compared: ran only on the cascade's survivors"
            elif role in e.by_role:
                evidence[e.by_role[role][1].name] = e.by_role[role][1].accuracy
                ok &= e.by_role[role][1].accuracy <= a_fgsm + tol
        return Check("iterative_beats_single_step", ok, "PGD-20 / PGD-100 accuracy <= FGSM accuracy + tol "
                     "(same objective)", evidence)
    else:
        return Check("iterative_beats_single_step", None, "needs fgsm and pgd20 or pgd100",
                     {"skipped": "fgsm or pgd20/pgd100 not run"})


def check_final_logits_vs_adaptive(e: CheckInputs) -> Check:
    """Final-logit vs adaptive objectives (CAS models)."""
    if e.cas and CHECK_FINAL_LOGITS in e.by_name:
        final = e.by_name[CHECK_FINAL_LOGITS][1].accuracy
        ref = e.by_role["pgd20"][1] if "pgd20" in e.by_role else e.by_name[CHECK_ADAPTIVE][1]
        adaptive = ref.accuracy
        tol = tolerance(min(final, adaptive), e.n)
        gap = final - adaptive
        passed = e.worst <= min(final, adaptive) + tol
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
         "final_minus_adaptive": gap, "worst_case": e.worst, "tolerance": tol, "verdict": verdict})
    else:
        return Check("final_logits_vs_adaptive", None, "needs a model with CAS modules",
                     {"skipped": "no CAS modules: the adaptive objectives are the final-logit ones"})


def check_best_vs_last_iterate(e: CheckInputs) -> Check:
    """The last iterate must not be far weaker than the best one, and no row may report a last iterate that is."""
    iterative = [i for i in e.rows if e.jobs[i].iterative and (e.results[i].last_iterate_accuracy is not None
                                                           or (e.partial(i) and bool(e.ran[:, i].any())))]
    if iterative and e.n:
        evidence, ok, gaps = {}, True, []
        for i in iterative:
            on = e.ran[:, i]  # every example, or in a cascade the examples the row attacked
            m = int(on.sum())
            last = int(e.correct_last[on, i].sum()) / m
            best = int(e.correct_best[on, i].sum()) / m
            acc = int(e.correct[on, i].sum()) / m
            tol = tolerance(best, m)
            keeps_last = e.jobs[i].settings.get("keep") == "last"
            evidence[e.jobs[i].name] = {"best": round(best, 4), "last": round(last, 4),
                                      "keep": e.jobs[i].settings.get("keep")}
            if e.partial(i):
                evidence[e.jobs[i].name]["attacked"] = m
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
    singles = [i for i in e.rows if e.jobs[i].in_worst_case and e.jobs[i].kind not in ("natural", "noise")]
    description = ("worst case >= strongest single attack - 2 tol (attacks that each miss many examples another finds "
                   "are unreliable one by one)")
    if len(singles) > 1 and e.n and not any(e.partial(i) for i in singles):
        strongest = min(singles, key=lambda i: e.results[i].accuracy)
        best_single = e.results[strongest].accuracy
        margin = 2.0 * tolerance(best_single, e.n)
        return Check("worst_case_near_single_attacks", e.worst >= best_single - margin, description,
                     {"worst_case": e.worst, "strongest_single": e.jobs[strongest].name,
                      "strongest_single_accuracy": best_single, "allowed_gap": margin})
    elif len(singles) > 1 and e.n:
        # a cascade: a row that ran on survivors only has accuracy in [its survivors, + the examples it skipped]
        low = {i: int(e.correct[:, i].sum()) / e.n for i in singles}
        high = {i: low[i] + (int((~e.ran[:, i]).sum()) / e.n if e.partial(i) else 0.0) for i in singles}
        hi_i, lo_i = min(singles, key=lambda i: high[i]), min(singles, key=lambda i: low[i])
        hi, lo = high[hi_i], low[lo_i]
        sure_pass = e.worst >= hi - 2.0 * tolerance(hi, e.n) and e.worst >= lo - 2.0 * tolerance(lo, e.n)
        sure_fail = e.worst < hi - 2.0 * tolerance(hi, e.n) and e.worst < lo - 2.0 * tolerance(lo, e.n)
        return Check("worst_case_near_single_attacks", True if sure_pass else (False if sure_fail else None),
                     description + " (cascade: decided from bounds on the strongest single attack, else "
                     "undetermined: run per_attack=True)",
                     {"worst_case": e.worst, "strongest_single_accuracy_bounds": [lo, hi],
                      "strongest_single_candidates": sorted({e.jobs[lo_i].name, e.jobs[hi_i].name}),
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


def nonfinite_counts(jobs: List[Job], nonfinite: Optional[torch.Tensor]) -> Dict[str, int]:
    """Job name -> the examples on which it made the model output NaN / inf logits, for the jobs with any."""
    if nonfinite is None:
        return {}
    counts = nonfinite.sum(dim=0).tolist()
    return {job.name: int(c) for job, c in zip(jobs, counts) if c}


def check_finite_logits(e: CheckInputs) -> Check:
    """The deployed model's logits stay finite under every attack: a NaN or inf output is a broken model, and an
    evaluation that scored it by argmax would credit it with class 0."""
    counts = {**nonfinite_counts(e.jobs, e.nonfinite), **e.nonfinite_elsewhere}
    examples = int(e.nonfinite.any(dim=1).sum()) if e.nonfinite is not None and e.nonfinite.numel() else 0
    return Check("finite_logits", not counts, "no attack makes the model output a NaN or inf logit (such examples "
                 "are scored wrong)", {"examples": examples, "by_attack": counts})


CHECKS: Tuple[Callable[[CheckInputs], Check], ...] = (
    check_eps_monotone, check_more_steps_do_not_help, check_black_box_not_stronger, check_pgd_beats_noise,
    check_nonzero_gradients, check_iterative_beats_single_step, check_final_logits_vs_adaptive,
    check_best_vs_last_iterate, check_worst_case_near_single_attacks, check_autoattack_flags, check_finite_logits)


def run_checks(inputs: CheckInputs) -> List[Check]:
    """Every check, in the order the report lists them."""
    return [check(inputs) for check in CHECKS]
