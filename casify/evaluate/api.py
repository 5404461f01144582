"""``evaluate``: one call from a model and data to an :class:`~casify.evaluate.report.EvalReport`: load the model,
plan the rows (:mod:`.plan`), run them (:mod:`.runner`), count (:mod:`.tally`), check (:mod:`.checks`).
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..defenses import find_defense_modules
from ..data.data_fit import check_data_fits
from ..core.inputs import check_eps
from ..attacks.threat_model import check_norm, format_radius
from .checks import (LARGE_EPS_MAX_ACCURACY, MIN_TOLERANCE, ZERO_GRAD_MAX_FRACTION, CheckInputs,
                     check_finite_logits, nonfinite_counts, run_checks)
from .deployed import InputTied, describe_model, unwrap_parallel
from .plan import CASCADE_RULE, LARGE_EPS, AttackSpec, objective_for, plan_rows
from .examples import DATA_HASH, data_sha256, encode, family_flags
from .report import AttackResult, EvalReport
from .runner import run_plan
from .tally import tally


def evaluate(model: Union[nn.Module, str, os.PathLike], dataset, *,
             attacks: Union[str, Sequence[AttackSpec]] = "standard",
             eps: float = 8 / 255, batch_size: int = 128, max_examples: Optional[int] = None, seed: int = 0,
             device=None, progress: bool = True, accelerator=None, autoattack: bool = False,
             transfer_from: Union[None, nn.Module, str, os.PathLike] = None, square_queries: int = 0,
             eps_sweep: Optional[Sequence[float]] = None, checks: bool = True, per_attack: bool = False,
             norm: str = "linf", echo: bool = True) -> EvalReport:
    """Evaluate ``model``'s robustness in the ``norm`` ball of radius ``eps`` (pixels in [0, 1]; ``norm``: ``"linf"``
    or ``"l2"``, see :mod:`casify.attacks.threat_model`).

    Args:
        model: an ``nn.Module`` (moved to ``device``), or a folder / Hub id for :func:`casify.from_pretrained`.
        dataset: a Dataset of ``(image, label)``, a pair of tensors ``(x, y)``, or a name for
            :func:`casify.data.build_dataset` (its test split). The first ``max_examples`` items are used.
        attacks: ``"quick"``, ``"standard"`` or a list of :class:`casify.attacks.Attack`, suite names (``"fgsm"``,
            ``"pgd20"``, ``"cw20"``, ``"pgd100"``: on a CAS model their adaptive ``[cas]`` versions), preset names,
            and ``"adaptive"`` (the CAS-specific attacks: each head alone, fixed routings). On a CAS model a row is
            named by its objective (:func:`row_name`): an ``Attack(name="pgd", objective="ce")`` becomes the row
            ``pgd[final-logits]``.
        autoattack: also run AutoAttack (standard version) on the deployed logits; needs ``pyautoattack`` (a dependency).
        transfer_from: a surrogate model (or its folder): PGD-20 is crafted on it and scored on ``model``.
        square_queries: query budget of a Square attack (0: none).
        eps_sweep: radii of the robustness curve: at each one the same rows run again (no checks) and the curve
            keeps natural, the per-example worst case and each family (the point at ``eps`` itself is this
            evaluation's). ``report.eps_sweep`` holds each point's main PGD-20 row, for the eps_monotone check.
        checks: run the gradient-masking checks (adds uniform noise, PGD-20 at 128/255, a gradient probe and, for a
            CAS model, a check-only final-logit PGD-20, plus an adaptive one when the rows have none); with
            ``checks=False`` the report's ``gradient_masking_suspected`` is None ("not checked"), unless the model
            output NaN or inf logits: those examples are wrong, ``nonfinite_logits`` names the attacks and the
            ``finite_logits`` check fails (it costs nothing, so it always runs).
        per_attack: run every row on every example (the full table: each row's own accuracy and family). The
            default, False, is a cascade, as AutoAttack does: natural, the main FGSM and PGD-20 and the noise baseline
            run on every example, then the other rows in a fixed order (:data:`CASCADE_RULE`), each only on the
            examples still robust. Random draws are per example, so the per-example worst case equals the full run's
            (for rows seeded per example: not Square or AutoAttack, which draw per batch); a row that ran only on
            survivors has no accuracy of its own (None), its family is left out of the summary or, when some of its
            rows ran on every example, marked as an upper bound, and the checks that need it whole adapt (see
            :func:`_run_checks`).

    Every gradient attack keeps the best iterate per example (see :mod:`casify.attacks`) and draws each example's
    random starts from a seed of its own (the row's seed and the example's dataset index), so the per-example results
    do not depend on ``batch_size`` or on the number of processes (Square and AutoAttack draw per batch).
        echo: with ``checks``, a routed defense's routing echo (:func:`casify.evaluate.routing_echo` on up to 500
            examples, L-inf): whether the output only repeats an auxiliary head; in the report and the model card.
        accelerator: an ``accelerate.Accelerator``; one is made when launched with several processes. The data are
            sharded over processes and per-example results gathered with ``gather_for_metrics``.
    """
    start_time = time.perf_counter()
    model, source = _as_model(model)
    data, data_name, split = _as_dataset(dataset)
    if max_examples is not None:
        if int(max_examples) < 1:
            raise ValueError(f"max_examples must be at least 1 (None: every example), got {max_examples}")
        data = Subset(data, range(min(int(max_examples), len(data))))
    # the CLI's guards, here too: no examples, 0..255 / uint8 / NaN images, another class count or image size;
    # checked before the surrogate is loaded or the model moved
    fit = check_data_fits(model, data, "the data" if data_name == "tensors" else
                          f"the {data_name}{f' {split}' if split else ''} data")
    if transfer_from is not None:
        transfer_from, _ = _as_model(transfer_from)
    if accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator
        accelerator = Accelerator()
    if accelerator is not None:
        device = accelerator.device
    device = _default_device(model, device)
    model.to(device)
    if transfer_from is not None:
        transfer_from.to(device)

    norm = check_norm(norm)
    eps = check_eps(eps, norm=norm)  # "8/255" as the README writes radii; an L-inf eps=8 is an error suggesting /255
    eps_sweep = None if eps_sweep is None else [check_eps(e, norm=norm) for e in eps_sweep]
    defended = bool(find_defense_modules(model))
    target = InputTied(model)

    numel = int(torch.as_tensor(data[0][0]).numel()) if norm != "linf" and len(data) else 0
    plan = plan_rows(model, target, attacks, eps=eps, seed=seed, autoattack=autoattack,
                     transfer_from=transfer_from, square_queries=square_queries, checks=checks, norm=norm,
                     input_numel=numel)
    flags = run_plan(model, target, plan, data, batch_size=batch_size, device=device, per_attack=per_attack,
                     probe=checks, accelerator=accelerator, progress=progress, eps=eps)
    counts = tally(plan, flags)
    n = len(data)
    rows = counts.results[:len(plan.rows)]
    families = family_flags(counts.per_example, counts.families)
    here = curve_point(eps, norm, rows[0].accuracy, counts.worst_case["accuracy"], counts.families,
                       counts.per_example["worst_case"], "this evaluation")
    curve, sweep, sweep_broken = [here], [], {}
    for e in sorted({float(v) for v in (eps_sweep or [])}):
        if abs(e - eps) < 1e-12:  # the point at eps is this evaluation's: one number per eps, never two
            sweep += [sweep_result(rows, e, norm, "this evaluation")]
            continue
        sub = evaluate(model, data, attacks=attacks, eps=e, batch_size=batch_size, seed=seed, device=device,
                       progress=progress, accelerator=accelerator, autoattack=autoattack, transfer_from=transfer_from,
                       square_queries=square_queries, checks=False, per_attack=per_attack, norm=norm)
        curve.append(curve_point(e, norm, sub.natural_accuracy, sub.worst_case["accuracy"], sub.families,
                                 sub.per_example["worst_case"], "sweep evaluation"))
        sweep.append(sweep_result(sub.attacks, e, norm, "sweep evaluation", seconds=sub.elapsed_seconds))
        sweep_broken.update({f"{name}@{format_radius(e, norm)}": c for name, c in sub.nonfinite_logits.items()})
    curve.sort(key=lambda p: p["eps"])
    sweep = [r for r in sweep if r is not None]
    inputs = CheckInputs(counts.results + sweep, plan.all, len(plan.rows), flags.correct, flags.correct_last,
                         flags.correct_best, [flags.zero_grad], n, eps, defended, ran=flags.ran, norm=norm,
                         nonfinite=flags.nonfinite, nonfinite_elsewhere=sweep_broken)
    check_list = run_checks(inputs) if checks else []
    broken = {**nonfinite_counts(plan.all, flags.nonfinite), **sweep_broken}
    if not checks and broken:  # costs nothing, and a broken model must never read as "not checked"
        check_list = [check_finite_logits(inputs)]
    indices = list(data.indices) if isinstance(data, Subset) else list(range(n))
    return EvalReport(
        model=describe_model(model, source), dataset=data_name, split=split, n_examples=n, eps=eps,
        eps_str=format_radius(eps, norm), norm=norm, suite=plan.suite, seed=seed,
        seeds={job.name: job.seed for job in plan.all},
        batch_size=batch_size, device=str(device),
        world_size=accelerator.num_processes if accelerator is not None else 1,
        natural_accuracy=rows[0].accuracy, attacks=rows, worst_case=counts.worst_case,
        eps_sweep=sweep, checks=check_list,
        gradient_masking_suspected=any(c.passed is False for c in check_list) if checks or check_list else None,
        protocol=protocol(defended, per_attack, max_examples), versions=_versions(plan.versions),
        elapsed_seconds=round(time.perf_counter() - start_time, 3), families=counts.families,
        per_attack=bool(per_attack), cascade=counts.cascade, per_example=counts.per_example,
        per_example_families=families, robustness_curve=curve,
        data={"sha256": data_sha256(flags.digests), "hash": DATA_HASH, "n": n, "indices": indices},
        routing_echo=_routing_echo(model, data, eps, norm, seed) if checks and echo else None,
        nonfinite_logits=broken, num_classes=fit.num_classes)


def _routing_echo(model, data, eps: float, norm: str, seed: int) -> Optional[dict]:
    """The routing echo of a routed defense (CAS, CIFS) on up to 500 of the examples, or None (nothing routes, or an
    L2 evaluation: the echo's attack is L-inf)."""
    from ..defenses import routed_modules
    from .echo import routing_echo
    if norm != "linf" or not routed_modules(model):
        return None
    return routing_echo(model, data, eps=eps, max_examples=500, seed=seed).to_dict()


def curve_point(eps: float, norm: str, natural: float, worst: float, families: dict, worst_flags, source: str) -> dict:
    """One point of the robustness curve: natural, worst case and each family at ``eps``, and the per-example worst
    case (:func:`casify.evaluate.examples.encode`), so curves can be compared image by image."""
    return {"eps": eps, "eps_str": format_radius(eps, norm), "natural": natural, "worst_case": worst,
            "families": {name: f["accuracy"] for name, f in families.items()},
            "upper_bounds": [name for name, f in families.items() if f.get("upper_bound")],
            "worst_case_per_example": encode(worst_flags), "source": source}


def sweep_result(rows, eps: float, norm: str, source: str, seconds: float = 0.0) -> Optional[AttackResult]:
    """The main PGD-20 row of the evaluation at ``eps``, as the sweep entry ``pgd20@<eps>`` (None without one)."""
    main = next((r for r in rows if r.family == "pgd20" and r.kind == "white-box" and r.accuracy is not None), None)
    if main is None:
        return None
    return AttackResult(f"pgd20@{format_radius(eps, norm)}", "sweep", main.accuracy, main.n_correct, main.n,
                        round(seconds, 4), eps, {"row": main.name, "norm": norm}, f"{main.name} of the {source}",
                        in_worst_case=False, family="pgd20", objective=main.objective,
                        last_iterate_accuracy=main.last_iterate_accuracy)


def protocol(defended: bool, per_attack: bool, max_examples: Optional[int]) -> dict:
    """How the numbers were made, in words and constants, for the report."""
    return {
        "scoring": "eval mode, every CAS module routed by its own prediction, model(x_adv).argmax(1) == y; a NaN or "
                   "inf logit is never correct",
        "crafting": "eval mode; predicted routing unless a row says otherwise",
        "iterates": "best iterate per example (one that fools the deployed model if any step did; restarts: the "
                    "worst over restarts); the last-iterate accuracy is kept as evidence",
        "row_names": "on a CAS model, attack[objective(,routing)]; [final-logits] marks an attack that sees only "
                     "the final logits" if defended else "plain attack names (no CAS modules)",
        "alpha_rule": "2.5 * eps / steps unless a row says otherwise",
        "random_starts": "per example and row: seed (row seed * 1000003 + dataset index) mod 2**63, so results do "
                         "not depend on the batch size or the process count (Square and AutoAttack: per batch)",
        "tolerance": f"max({MIN_TOLERANCE}, 2 * sqrt(max(p(1-p), 1/n) / n))",
        "large_eps": LARGE_EPS, "large_eps_max_accuracy": LARGE_EPS_MAX_ACCURACY,
        "zero_grad_max_fraction": ZERO_GRAD_MAX_FRACTION, "max_examples": max_examples,
        "objective": objective_for(defended), "beta": 2.0,
        "mode": "per-attack: every row on every example" if per_attack else "cascade: " + CASCADE_RULE,
        "eps_sweep": "at each radius of the sweep the same rows run again (seeded alike, no checks); the curve keeps "
                     "natural, the per-example worst case and each family; pgd20@<eps> is that run's main PGD-20 row",
    }


def _as_model(model: Union[nn.Module, str, os.PathLike]) -> Tuple[nn.Module, Optional[str]]:
    """The module to evaluate and, for a folder or Hub id, where it was loaded from: a module is taken out of any
    (Distributed)DataParallel / DeepSpeed wrapper (:func:`~casify.evaluate.deployed.unwrap_parallel`); a folder or Hub id
    is loaded (:func:`casify.from_pretrained`, which returns the model itself, never a parallel wrapper)."""
    if isinstance(model, nn.Module):
        return unwrap_parallel(model), None
    from ..model.loading import from_pretrained
    return from_pretrained(model), os.fspath(model)


GENERIC_DATASETS = ("TensorImageDataset", "TensorDataset", "Subset", "NpzDataset")
"""Dataset classes whose name says nothing about the data: a report calls such data "tensors"."""


def _as_dataset(dataset) -> Tuple[Dataset, str, Optional[str]]:
    """The dataset, its name as reports show it (``cifar10``: never a path or a container class) and its split."""
    from ..data import build_dataset, dataset_name
    if isinstance(dataset, (str, os.PathLike)):
        dataset = build_dataset(dataset, "test")
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        return TensorDataset(dataset[0], dataset[1]), "tensors", None
    name, split = dataset_name(dataset)
    if name is None:
        name = type(dataset).__name__
        name = "tensors" if name in GENERIC_DATASETS else name
    return dataset, name, split


def _default_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _versions(extra: Optional[dict] = None) -> dict:
    from ..core.spec import versions
    v = versions()
    if extra:
        v.update(extra)
    return v


__all__ = ["evaluate", "protocol"]
