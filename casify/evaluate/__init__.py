"""Robustness evaluation that a reader can trust: the model as deployed, adaptive attacks, and gradient-masking checks.

Every accuracy is measured on the model as it would be used: eval mode, every CAS module routed by its own prediction,
no labels anywhere near the forward, ``model(x_adv).argmax(1) == y`` (``shared/docs/cas-reference.md``: evaluating in
training mode with ``y`` leaks the label through the mask). How an attack *crafts* its examples may differ (a fixed or
straight-through routing, an auxiliary head, a surrogate model); how it is *scored* never does. Every iterative
attack keeps, per example, the best iterate (one that fools the deployed model if any step found one), and restarts
keep the worst over restarts (:mod:`casify.attacks`); the last-iterate accuracy is kept as evidence for a check.

Rows are named by objective on a model with CAS modules, so that a number is never reported under a plain attack
name unless the attack saw the auxiliary heads: ``pgd20[cas]`` (CE + beta * mean auxiliary CE), ``cw20[cas]`` (CW
margin of the final logits + beta * mean margin of the heads), ``pgd20[aux:0]`` / ``cw20[aux:0]`` (one head alone),
``pgd20[cas,straight-through]`` (argmax routing forward, softmax-mixture backward: BPDA through the class choice),
``pgd20[cas,clean-routing]`` / ``pgd20[cas,soft-routing]`` (routing fixed to the clean prediction / to the softmax
mixture of rows), and ``...[final-logits]`` for an attack that sees only the final logits (e.g.
``autoattack[final-logits]``). A plain model's rows keep the plain names (``fgsm``, ``pgd20``, ``cw20``, ``pgd100``).

Suites (all L-inf, eps in [0, 1] pixel units, alpha = 2.5 * eps / steps unless said otherwise):

- ``"quick"``: natural; FGSM as the authors ran it (uniform random start, then one eps step); PGD-20 (random start);
  CW-inf (20 steps, per-example margin, kappa 50); for a CAS model every one on the joint objective (``[cas]``), plus
  PGD-20 with the straight-through routing.
- ``"standard"``: quick + PGD-100, and for CAS models PGD-20 and CW-20 on each auxiliary head alone (flipping one
  module's argmax changes its mask) and PGD-20 with a fixed routing that bypasses the argmax: every module routed by
  the model's clean prediction, and by a soft mixture of weight rows (the softmax of the clean auxiliary logits,
  averaged over modules, detached); and AutoAttack's APGD and APGD-T run on casify's objectives
  (:mod:`casify.attacks.autopgd`): ``apgd-dlr[cas]`` (100 steps on the DLR of the final logits + beta * mean DLR of the
  heads) and ``apgd-t3[cas,target-routing]`` (100 steps per target on the targeted DLR of the final and auxiliary
  logits, for the 3 classes ranked highest after the true one, every module routed to the target while crafting);
  on a plain model ``apgd-dlr`` and ``apgd-t3`` on the final logits, as AutoAttack runs them.

Plain (non-CAS) models get the same attacks on the ``"ce"`` / ``"cw"`` objectives. The *worst case* is per example: an
example counts as robust only if it is classified correctly under every attack run at ``eps`` (natural, white-box,
adaptive, AutoAttack, transfer, Square and same-size uniform noise). :meth:`EvalReport.summary` gives, per attack
family (``fgsm``, ``pgd20``, ...), the per-example worst over that family's rows that see the auxiliary heads. The eps
sweep and the check-only attacks are reported apart.

The cascade (``per_attack=False``, the default; ``per_attack=True`` / ``casify eval --per-attack`` for the full
table): natural, the main FGSM and PGD-20 and the noise baseline run on every example; the other rows then run in the
order of :data:`CASCADE_RULE` (straight-through PGD, CW-20, PGD-100 and other rows with the deployed routing, each
head alone, fixed routings, AutoAttack, black-box), each only on the examples that every earlier row left correct, as
AutoAttack does. Every example's random draws come from its own seed, so an example is robust to all the rows in the
cascade exactly when it is in the full run, whatever the batch size (Square and AutoAttack draw per batch: their
verdict on an example may differ between the modes, as between batch sizes). Each row reports ``attacked`` /
``newly_fooled`` / ``robust_after``; a row that ran on the survivors only has no accuracy of its own (None), and the
summary leaves its family out or, when some of the family's rows ran on every example, marks it an upper bound
(:meth:`EvalReport.summary`). The checks adapt where a row they compare ran on survivors only (:func:`_run_checks`).

The gradient-masking checks are described in :mod:`casify.evaluate.checks`.

The package, one job per file (each imports only the ones above it):

- ``report.py``: :class:`AttackResult`, :class:`Check`, :class:`EvalReport` (pure data: summary, JSON, markdown);
- ``deployed.py``: the model as deployed (scoring, the clean-input probes, :func:`describe_model`);
- ``blackbox.py``: AutoAttack's own Square attack and AutoAttack's loader (``pyautoattack``);
- ``plan.py``: the suites, row names, the cascade's order, :class:`Job` and :func:`plan_rows`;
- ``runner.py``: running a plan over the data (every example, or the cascade), per-example seeds, gathering;
- ``tally.py``: per-example flags -> each row's result, the worst case, the cascade accounting, the families;
- ``checks.py``: the checks, one function each, and the tolerance;
- ``api.py``: :func:`evaluate`, which strings them together;
- ``compare.py``: model A vs model B: paired McNemar on the same images, Welch across seeds, the verdict rule;
- ``echo.py``: :func:`routing_echo`, whether a routed model's output only repeats an auxiliary head;
- ``examples.py``: per-example flags as a report keeps them, and the SHA-256 of the images they were measured on;
- ``figures.py``: the robustness curve, the per-attack chart and overlaid curves (PNG, written atomically);
- ``side_by_side.py``: :func:`compare_models` (``casify compare``): models on the same images, paired statistics;
- ``benchmark.py``: :func:`benchmark`, RobustBench's convention (and model-info JSON) with casify's adaptive number.

Threat models (L-inf, L2) are described in :mod:`casify.attacks.threat_model`; the corruptions in :mod:`casify.data.corruptions`.
"""
from ..core.eps import format_eps, parse_eps
from .api import evaluate, protocol
from .blackbox import AUTOATTACK_INSTALL, SQUARE_P_INIT, load_autoattack, square_attack
from .checks import (CHECKS, LARGE_EPS_MAX_ACCURACY, MIN_TOLERANCE, ZERO_GRAD_MAX_FRACTION, CheckInputs, run_checks,
                     tolerance)
from .compare import PairedComparison, WelchComparison, paired, verdict, welch
from .echo import RoutingEcho, routing_echo
from .deployed import InputTied, clean_routings, deployed_correct, describe_model, zero_input_gradient
from .plan import (CASCADE_RANKS, CASCADE_RULE, CHECK_ADAPTIVE, CHECK_FINAL_LOGITS, LARGE_EPS, SUITES, AttackSpec, Job,
                   Plan, plan_rows, row_name, suite_attacks)
from .benchmark import benchmark, benchmark_info, corruption_accuracy
from .report import AttackResult, Check, EvalReport, load_report
from .side_by_side import IncomparableReports, ModelComparison, compare_models

__all__ = ["IncomparableReports", "ModelComparison", "benchmark", "benchmark_info", "compare_models",
           "corruption_accuracy", "load_report", "RoutingEcho", "routing_echo", "AUTOATTACK_INSTALL", "AttackResult", "AttackSpec", "CASCADE_RANKS", "CASCADE_RULE", "CHECKS",
           "CHECK_ADAPTIVE", "CHECK_FINAL_LOGITS", "Check", "CheckInputs", "EvalReport", "InputTied", "Job",
           "LARGE_EPS", "LARGE_EPS_MAX_ACCURACY", "MIN_TOLERANCE", "Plan", "SQUARE_P_INIT", "SUITES",
           "ZERO_GRAD_MAX_FRACTION", "PairedComparison", "WelchComparison", "clean_routings", "deployed_correct", "describe_model", "evaluate", "format_eps",
           "load_autoattack", "paired", "parse_eps", "plan_rows", "protocol", "row_name", "run_checks", "square_attack",
           "suite_attacks", "tolerance", "verdict", "welch", "zero_input_gradient"]
