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
  averaged over modules, detached).

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

Gradient-masking checks (each returns pass / fail / skipped with its evidence; any failure sets
``gradient_masking_suspected``; with ``checks=False`` it is ``None``, "not checked"):

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

Tolerance: two binomial standard errors of the reference accuracy, ``2 * sqrt(max(p (1 - p), 1 / n) / n)``, and at
least one percentage point.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .attacks import PRESETS, Attack, draw_noise, attack_context, clean_routing, cw_margin, objective_tag
from .cas import CASModule, find_cas_modules
from .eps import format_eps, parse_eps  # noqa: F401  (re-exported: casify.evaluate.parse_eps)

SUITES = ("quick", "standard")
LARGE_EPS = 128 / 255
LARGE_EPS_MAX_ACCURACY = 0.10
ZERO_GRAD_MAX_FRACTION = 0.10
MIN_TOLERANCE = 0.01
SQUARE_P_INIT = 0.8
AUTOATTACK_INSTALL = "pip install casify-robust[autoattack]"
CHECK_FINAL_LOGITS = "check:pgd20[final-logits]"
CHECK_ADAPTIVE = "check:pgd20[cas]"

AttackSpec = Union[str, Attack]


# -- eps as text -----------------------------------------------------------------------------------------------------
def tolerance(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy ``p`` on ``n`` examples, at least one point (see module doc)."""
    if n <= 0:
        return 1.0
    return max(MIN_TOLERANCE, 2.0 * math.sqrt(max(p * (1.0 - p), 1.0 / n) / n))


# -- the report ------------------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """Accuracy of the deployed model under one attack. ``kind``: natural, white-box, adaptive, autoattack,
    black-box, noise, sweep or check. Only results with ``in_worst_case`` enter the per-example worst case.
    ``family``: the attack without its objective tag (``pgd20`` for ``pgd20[cas]``), or the full name for a row
    that sees only the final logits of a CAS model; ``objective``: the objective it maximised;
    ``last_iterate_accuracy``: for iterative gradient attacks, the accuracy the last iterate would have given.

    The cascade accounting (rows that enter the worst case, in the order they ran; see :func:`evaluate`):
    ``attacked``, the examples the row was run on (``n`` when it ran on every example); ``newly_fooled``, the
    examples it fooled that every earlier row had left correct; ``robust_after``, the examples correct under it and
    every earlier row. A row that ran only on the cascade's survivors (``per_attack=False``) has no accuracy of its
    own: ``accuracy``, ``n_correct`` and ``last_iterate_accuracy`` are None."""
    name: str
    kind: str
    accuracy: Optional[float]
    n_correct: Optional[int]
    n: int
    seconds: float
    eps: float
    settings: dict = field(default_factory=dict)
    notes: str = ""
    in_worst_case: bool = True
    family: str = ""
    objective: str = ""
    last_iterate_accuracy: Optional[float] = None
    attacked: Optional[int] = None
    newly_fooled: Optional[int] = None
    robust_after: Optional[int] = None


@dataclass
class Check:
    """One gradient-masking check: ``passed`` is True, False (masking suspected) or None (skipped, and why)."""
    name: str
    passed: Optional[bool]
    description: str
    evidence: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    """Everything an evaluation measured and how. ``per_example`` (name -> correct flags, in dataset order) stays
    out of the JSON unless asked for: it is for callers that combine attacks themselves.
    ``gradient_masking_suspected`` is True / False, or None when the checks did not run ("not checked").
    ``families``: per attack family, the per-example worst over its rows (see :meth:`summary`).
    ``per_attack``: False for a cascade (rows after the first ran only on the examples still robust); ``cascade``:
    the worst-case rows in the order they ran, each with ``attacked`` / ``newly_fooled`` / ``robust_after``."""
    model: dict
    dataset: str
    n_examples: int
    eps: float
    eps_str: str
    norm: str
    suite: str
    seed: int
    seeds: Dict[str, int]
    batch_size: int
    device: str
    world_size: int
    natural_accuracy: float
    attacks: List[AttackResult]
    worst_case: dict
    eps_sweep: List[AttackResult]
    checks: List[Check]
    gradient_masking_suspected: Optional[bool]
    protocol: dict
    versions: dict
    elapsed_seconds: float
    families: Dict[str, dict] = field(default_factory=dict)
    per_attack: bool = True
    cascade: List[dict] = field(default_factory=list)
    per_example: Dict[str, List[Optional[bool]]] = field(default_factory=dict, repr=False)

    def accuracy(self, name: str) -> Optional[float]:
        """Accuracy under the attack (or sweep point) called ``name``; ``"worst_case"`` for the worst case. None for a
        row that ran only on the cascade's survivors (``per_attack=False``): it has no accuracy of its own."""
        if name == "worst_case":
            return self.worst_case["accuracy"]
        for result in self.attacks + self.eps_sweep:
            if result.name == name:
                return result.accuracy
        raise KeyError(f"no attack {name!r} in this report; it has {[r.name for r in self.attacks + self.eps_sweep]}")

    def summary(self) -> dict:
        """The headline numbers in the shape the model card and recipe summaries use.

        ``accuracy``: natural, then per attack family (``fgsm``, ``pgd20``, ``cw20``, ``pgd100``, ``transfer-pgd20``,
        ``square<q>``, ...) the per-example worst over every row of that family that enters the worst case (for a
        CAS model: every objective and routing that sees the auxiliary heads; a row that sees only the final logits
        keeps its own name, e.g. ``autoattack[final-logits]``), and ``worst_case``. For a plain model the families
        are the rows. ``rows``: every row that enters the worst case by its own name (``pgd20[cas]``, ...);
        ``families``: which rows each family combines. ``gradient_masking_suspected``: True / False / None (the checks
        did not run); ``failed_checks``: the names of the failed checks (None when not checked).

        ``mode``: ``"per-attack"`` or ``"cascade"``. In a cascade only the rows that ran on every example have an
        accuracy (natural, the main FGSM and PGD-20, noise): ``rows`` holds those, a family combines only those (a
        family with none is left out) and ``upper_bounds`` names the families that have further rows, which ran only
        on the cascade's survivors, so that their value is an upper bound on the full family's (``pgd20`` on a CAS
        model: ``pgd20[cas]`` alone). ``worst_case`` is exact in both modes. ``cascade``: per worst-case row, in the
        order they ran, ``attacked`` / ``newly_fooled`` / ``robust_after`` (counts of examples).
        """
        accuracy = {name: f["accuracy"] for name, f in self.families.items()}
        if not accuracy:  # a report built by hand: the rows themselves
            accuracy = {r.name: r.accuracy for r in self.attacks
                        if r.in_worst_case and r.kind != "noise" and r.accuracy is not None}
        accuracy["worst_case"] = self.worst_case["accuracy"]
        rows = {r.name: r.accuracy for r in self.attacks
                if r.in_worst_case and r.kind != "noise" and r.accuracy is not None}
        failed = None if self.gradient_masking_suspected is None else [c.name for c in self.checks if c.passed is False]
        return {"eps": self.eps, "eps_str": self.eps_str, "norm": self.norm, "n": self.n_examples,
                "suite": self.suite, "mode": "per-attack" if self.per_attack else "cascade",
                "accuracy": accuracy, "rows": rows,
                "families": {name: list(f["rows"]) for name, f in self.families.items()},
                "upper_bounds": [name for name, f in self.families.items() if f.get("upper_bound")],
                "cascade": [dict(c) for c in self.cascade],
                "gradient_masking_suspected": self.gradient_masking_suspected, "failed_checks": failed}

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; the report has {[c.name for c in self.checks]}")

    def to_dict(self, per_example: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not per_example:
            d.pop("per_example")
        return d

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, per_example: bool = False) -> str:
        text = json.dumps(self.to_dict(per_example), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self) -> str:
        model = self.model.get("class", "model")
        if self.model.get("cas_layers"):
            model += f" with CAS at {', '.join(self.model['cas_layers'])}"
        lines = [
            "# Robustness evaluation", "",
            f"- model: {model}" + (f" ({self.model['source']})" if self.model.get("source") else ""),
            f"- data: {self.dataset}, {self.n_examples} examples",
            f"- threat model: L-{self.norm[1:]}, eps = {self.eps_str} ({self.eps:.5f}) in [0, 1] pixel units",
            f"- scored on the deployed model: {self.protocol['scoring']}",
            f"- iterates: {self.protocol.get('iterates', 'last iterate')}",
            f"- suite: {self.suite}; seed {self.seed}; {self.elapsed_seconds:.1f} s on {self.device}"
            + (f" x {self.world_size} processes" if self.world_size > 1 else ""),
        ]
        wc = self.worst_case
        if self.per_attack:
            lines += ["", "| attack | accuracy % | notes |", "|---|---|---|"]
            for r in self.attacks:
                note = r.notes
                if r.last_iterate_accuracy is not None:
                    note += f"; last iterate {100 * r.last_iterate_accuracy:.2f} %"
                note += "" if r.in_worst_case else " (not in the worst case)"
                lines.append(f"| {r.name} | {100 * r.accuracy:.2f} | {note} |")
            lines.append(f"| **worst case** | **{100 * wc['accuracy']:.2f}** | correct under every one of the "
                         f"{len(wc['attacks'])} rows above that enter it |")
        else:
            lines += ["- mode: cascade: the rows run in this order; a row marked \"survivors\" ran only on the "
                      "examples every earlier row left correct, so it has no accuracy of its own (per_attack=True / "
                      "--per-attack for every row on every example)", "",
                      "| attack | accuracy % | attacked | newly fooled | robust after % | notes |",
                      "|---|---|---|---|---|---|"]
            by_name = {r.name: r for r in self.attacks}
            for c in self.cascade:
                r = by_name[c["row"]]
                note = r.notes
                if r.last_iterate_accuracy is not None:
                    note += f"; last iterate {100 * r.last_iterate_accuracy:.2f} %"
                acc = "survivors" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
                after = 100 * c["robust_after"] / max(self.n_examples, 1)
                lines.append(f"| {r.name} | {acc} | {c['attacked']} | {c['newly_fooled']} | {after:.2f} | {note} |")
            lines.append(f"| **worst case** | | | | **{100 * wc['accuracy']:.2f}** | correct under every one of the "
                         f"{len(wc['attacks'])} rows above |")
        if any(len(f["rows"]) > 1 or f.get("upper_bound") for f in self.families.values()):
            lines += ["", "## By attack family (per-example worst over the family's rows)", "",
                      "| family | accuracy % | rows |", "|---|---|---|"]
            lines += [f"| {name} | {'<= ' if f.get('upper_bound') else ''}{100 * f['accuracy']:.2f} | "
                      f"{', '.join(f['rows'])}"
                      + (f" (upper bound: {', '.join(f['survivors_only'])} ran on survivors only)"
                         if f.get("upper_bound") else "") + " |"
                      for name, f in self.families.items()]
        if self.eps_sweep:
            lines += ["", "## eps sweep (PGD-20)", "", "| eps | accuracy % |", "|---|---|"]
            lines += [f"| {format_eps(r.eps)} | {100 * r.accuracy:.2f} |" for r in self.eps_sweep]
        lines += ["", "## Gradient-masking checks", ""]
        if self.gradient_masking_suspected is None:
            lines.append("Gradient masking suspected: **not checked** (checks=False).")
        else:
            verdict = "YES" if self.gradient_masking_suspected else "no"
            lines += [f"Gradient masking suspected: **{verdict}**", "",
                      "| check | result | evidence |", "|---|---|---|"]
            for c in self.checks:
                result = {True: "pass", False: "**FAIL**", None: "skipped"}[c.passed]
                evidence = "; ".join(f"{k}: {_short(v)}" for k, v in c.evidence.items())
                lines.append(f"| {c.name} | {result} | {evidence} |")
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()), ""]
        return "\n".join(lines)

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``eval_report.json`` and ``eval_report.md`` into ``directory`` (created if needed)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.to_json(out / "eval_report.json")
        (out / "eval_report.md").write_text(self.to_markdown())
        return out


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


# -- the model -------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class _InputTied(nn.Module):
    """Adds an exact zero that depends on the input, so a model that detaches its input gives the attacks a zero
    input gradient (which the checks then flag) instead of an autograd error. The logits are unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out + (0.0 * x.flatten(1).sum(dim=1, keepdim=True)).to(out.dtype)


def describe_model(model: nn.Module, source: Optional[str] = None) -> dict:
    """Class, size and CAS placement of ``model``, for the report."""
    model = _unwrap(model)
    cas = find_cas_modules(model)
    d = {"class": type(model).__name__, "parameters": int(sum(p.numel() for p in model.parameters())),
         "cas_modules": len(cas)}
    config = getattr(model, "casify_config", None)
    if isinstance(config, dict):
        d["cas_layers"] = list(config.get("cas", {}).get("layers", []))
        d["num_classes"] = config.get("cas", {}).get("num_classes")
        d["base_model"] = config.get("base_model")
        if config.get("training"):
            d["training"] = config["training"]
    elif cas:
        d["cas_layers"] = [name for name, m in model.named_modules() if isinstance(m, CASModule)]
    if source is not None:
        d["source"] = str(source)
    return d


@torch.no_grad()
def deployed_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model(x).argmax(1) == y`` in eval mode with every CAS module routed by its own prediction."""
    with attack_context(model):
        return model(x).argmax(dim=1) == y


def clean_routings(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Routings for the fixed-routing attacks, from one clean deployed forward (detached):

    ``"predicted"``: the model's own predicted class (N,); ``"soft"``: the mean over CAS modules of the softmax of
    each module's auxiliary logits (N, num_classes), a mixture of weight rows. ``casify.route`` takes one routing
    for all modules, hence the mean. (The attacks compute these themselves for ``routing="clean-predicted"`` /
    ``"clean-soft"``: :func:`casify.attacks.clean_routing`.)
    """
    return {"predicted": clean_routing(model, x, "clean-predicted"), "soft": clean_routing(model, x, "clean-soft")}


def zero_input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: is the input gradient of the CW margin all zero or non-finite (deployed model)?"""
    with attack_context(model), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        margin = cw_margin(model(x_in).float(), y).sum()
        if not margin.requires_grad:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        (grad,) = torch.autograd.grad(margin, x_in, allow_unused=True)
    if grad is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    flat = grad.detach().float().flatten(1)
    return ~(torch.isfinite(flat).all(dim=1) & (flat != 0).any(dim=1))


# -- black-box attacks -----------------------------------------------------------------------------------------------
def _p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Square's schedule for the fraction of pixels a window covers, rescaled from 10,000 queries to the budget."""
    it = int(it / max(n_queries, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _random_signs(shape, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator, device=generator.device).float() * 2 - 1).to(device)


@torch.no_grad()
def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, n_queries: int = 1000,
                  p_init: float = SQUARE_P_INIT, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Square attack, L-inf (Andriushchenko et al., ECCV 2020): random search over square patches at the corners of
    the eps-box, keeping a change when it lowers the margin ``z_y - max_{j!=y} z_j`` of the deployed model.

    Uses only the model's outputs, so it is blind to gradient masking. Starts from vertical stripes of +-eps; each
    query redraws the signs of one s x s window (s from Square's p schedule) per still-correct example. Returns the
    examples with the lowest margin found, within the eps-ball and [0, 1].
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n, c, h, w = x.shape
    x = x.detach().float()
    with attack_context(model):
        def margin(x_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return -cw_margin(model(x_in).float(), labels)

        x_best = (x + eps * _random_signs((n, c, 1, w), generator, x.device)).clamp(0.0, 1.0)
        loss = margin(x_best, y)
        for i in range(max(n_queries - 1, 0)):
            active = (loss > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            x_a, best_a = x[active], x_best[active]
            p = _p_selection(p_init, i, n_queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), max(min(h, w) - 1, 1))
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
            delta = best_a - x_a
            window = delta[:, :, top:top + s, left:left + s].clone()
            for _ in range(10):  # redraw until the window actually changes (a wasted query otherwise)
                new = eps * _random_signs((len(active), c, 1, 1), generator, x.device)
                same = ((x_a[:, :, top:top + s, left:left + s] + new).clamp(0, 1)
                        - best_a[:, :, top:top + s, left:left + s]).abs().flatten(1).amax(dim=1) < 1e-7
                window = torch.where(same.view(-1, 1, 1, 1), window, new.expand_as(window))
                if not bool(same.any()):
                    break
            delta[:, :, top:top + s, left:left + s] = window
            x_new = (x_a + delta).clamp(0.0, 1.0)
            new_loss = margin(x_new, y[active])
            better = new_loss < loss[active]
            x_best[active[better]] = x_new[better]
            loss[active[better]] = new_loss[better]
    return x_best


def _load_autoattack():
    """AutoAttack's class and the import name it came from: PyPI's ``pyautoattack`` (imported as ``pyautoattack``)
    or the authors' GitHub package (imported as ``autoattack``)."""
    try:
        from pyautoattack import AutoAttack
        return AutoAttack, "pyautoattack"
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack
        return AutoAttack, "autoattack"
    except ImportError:
        raise ImportError("autoattack=True needs the optional AutoAttack package, which is not installed: "
                          f"{AUTOATTACK_INSTALL}") from None


def _autoattack_version(flavour: str) -> str:
    from importlib import metadata
    for dist in (flavour, "pyautoattack", "autoattack"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


# -- planning the attacks --------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One row of the evaluation: how to craft ``x_adv`` for a batch (``craft`` returns ``x_adv`` or
    ``(x_adv, AttackInfo)``), and where its accuracy goes. ``role``: fgsm / pgd20 / pgd100 / cw20 for the suite's
    main rows (the checks compare them), else None."""
    name: str
    kind: str
    eps: float
    settings: dict
    notes: str
    craft: Callable[[torch.Tensor, torch.Tensor, dict, torch.Generator], torch.Tensor]
    in_worst_case: bool = True
    seed: int = 0
    seconds: float = 0.0
    family: str = ""
    objective: str = ""
    role: Optional[str] = None
    iterative: bool = False
    per_example_seed: bool = False
    rank: int = 3


# The cascade's order (per_attack=False): rows with a lower rank run first (ties: in the plan's order). Rank 0 runs on
# every example: natural, the main FGSM and PGD-20 and the noise baseline (the gradient-masking checks and the
# summary need them whole; FGSM costs one step). Then, each on the examples still robust: straight-through PGD on the
# adaptive objective, CW on it, other rows with the deployed routing (PGD-100, custom attacks), each auxiliary head
# alone, the fixed routings, AutoAttack, and the black-box attacks (transfer, Square).
CASCADE_RANKS = {"every example": 0, "straight-through": 1, "cw20": 2, "deployed routing": 3, "one head": 4,
                 "fixed routing": 5, "autoattack": 6, "black-box": 7}
CASCADE_RULE = ("rows run in this order, each after the first group only on the examples that every earlier row left "
                "correct: (0) on every example: natural, the main FGSM and PGD-20, uniform noise; then (1) straight-"
                "through PGD, (2) CW-20 on the joint objective, (3) other rows with the deployed routing (PGD-100, "
                "custom attacks), (4) each auxiliary head alone, (5) fixed routings, (6) AutoAttack, (7) black-box "
                "attacks; ties in the suite's order")


def _cascade_rank(attack: Attack, role: Optional[str]) -> int:
    if role in ("fgsm", "pgd20"):
        return CASCADE_RANKS["every example"]
    if isinstance(attack.routing, str) and attack.routing == "straight-through":
        return CASCADE_RANKS["straight-through"]
    if role == "cw20":
        return CASCADE_RANKS["cw20"]
    if attack.routing is not None and not (isinstance(attack.routing, str) and attack.routing == "predicted"):
        return CASCADE_RANKS["fixed routing"]
    if isinstance(attack.objective, str) and attack.objective.startswith(("aux:", "cw_aux:")):
        return CASCADE_RANKS["one head"]
    return CASCADE_RANKS["deployed routing"]


def _objective(cas: bool) -> str:
    return "cas" if cas else "ce"


ROUTING_TAGS = {"straight-through": "straight-through", "clean-predicted": "clean-routing",
                "clean-soft": "soft-routing"}


def row_name(base: str, attack: Attack, cas: bool) -> str:
    """How a row is named: ``base`` on a plain model (or when ``base`` already carries a tag), else
    ``base[<objective tag>(,<routing>)]``, e.g. ``pgd20[cas]``, ``pgd20[aux:0]``, ``pgd20[cas,straight-through]``,
    ``pgd20[final-logits]`` (see :func:`casify.attacks.objective_tag`)."""
    if not cas or "[" in base:
        return base
    tag = objective_tag(attack.objective)
    routing = ROUTING_TAGS.get(attack.routing)
    return f"{base}[{tag}{',' + routing if routing else ''}]"


def _family(base: str, name: str, attack: Optional[Attack], cas: bool) -> str:
    """The family a row is aggregated under in the summary: its base name, unless it is a gradient attack on a CAS
    model that sees only the final logits (then its own, tagged, name)."""
    if not cas or attack is None or attack.sees_aux:
        return base.split("[")[0]
    return name


def suite_attacks(suite: str, eps: float = 8 / 255, cas: bool = True, num_modules: int = 1) -> Dict[str, Attack]:
    """The gradient attacks of a suite at radius ``eps``, by row name (the CAS-specific ones included for CAS models:
    ``num_modules`` auxiliary heads). Each :class:`Attack` carries its objective and crafting routing."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES} or a list of attacks, got {suite!r}")
    obj = _objective(cas)
    rows = [("fgsm", Attack(name="fgsm", kind="fgsm", eps=eps, alpha=eps, objective=obj, random_start=True)),
            ("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective=obj))]
    if cas:
        rows.append(("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective=obj, routing="straight-through")))
    rows.append(("cw20", Attack(name="cw20", kind="cw", eps=eps, steps=20, kappa=50.0, objective=obj)))
    if suite == "standard":
        rows.append(("pgd100", Attack(name="pgd100", eps=eps, steps=100, objective=obj)))
        if cas:
            rows += [(base, a) for base, a in _adaptive_rows(num_modules, eps)]
    out = {}
    for base, attack in rows:
        name = row_name(base, attack, cas)
        out[name] = dataclasses.replace(attack, name=name)
    return out


def _adaptive_rows(num_modules: int, eps: float) -> List[Tuple[str, Attack]]:
    """The CAS-specific rows of the standard suite (also what ``"adaptive"`` adds to a custom list): each head alone
    (PGD on its CE, CW on its margin) and PGD-20 with the routing fixed to the clean prediction / soft mixture."""
    rows = [("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective=f"aux:{i}")) for i in range(num_modules)]
    rows += [("cw20", Attack(name="cw20", kind="cw", eps=eps, steps=20, kappa=50.0, objective=f"cw_aux:{i}"))
             for i in range(num_modules)]
    rows += [("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective="cas", routing=r))
             for r in ("clean-predicted", "clean-soft")]
    return rows


def _is_main_row(attack: Attack, cas: bool) -> bool:
    return attack.routing is None and attack.objective in (("cas", "cw_cas") if cas else ("ce", "cw"))


def _describe_attack(a: Attack) -> str:
    if a.kind == "fgsm":
        text = f"1 step of {format_eps(a.alpha)}" + (" after a random start" if a.random_start != "none" else "")
    else:
        text = f"{a.steps} steps of {format_eps(a.alpha)}" + (f", {a.restarts} restarts" if a.restarts > 1 else "")
        text += f", {a.random_start} start" if a.random_start != "none" else ", no random start"
    if a.objective.startswith("cw"):
        text += f", CW margin (kappa {a.kappa:g})" + {"cw": " of the final logits",
                                                      "cw_cas": f" + {a.beta:g} * mean auxiliary margin"}.get(
            a.objective, f" of auxiliary head {a.objective.split(':')[-1]}")
    else:
        text += f", objective {a.objective}"
    if a.routing == "clean-predicted":
        text += "; crafted with every module routed by the clean predicted class"
    elif a.routing == "clean-soft":
        text += "; crafted with a soft routing: softmax of the clean aux logits (mean over modules)"
    elif a.routing == "straight-through":
        text += "; straight-through routing (argmax forward, softmax-mixture backward)"
    text += "; best iterate" if a.keep == "best" else "; last iterate"
    return text


def _resolve_attack(spec: AttackSpec, eps: float, cas: bool, num_modules: int = 1) -> Tuple[str, Attack]:
    """A list entry as ``(base name, Attack)`` at the evaluation's eps: an Attack (its eps must not exceed it), a
    suite name, or an :data:`casify.attacks.PRESETS` name (eps set to ``eps``, alpha scaled with it)."""
    if isinstance(spec, Attack):
        if spec.eps > eps + 1e-9:
            raise ValueError(f"attack {spec.name!r} has eps {spec.eps:.5f} > the evaluation's eps {eps:.5f}: the worst "
                             "case would mix threat models; evaluate it with eps= its own radius")
        return spec.name, spec
    standard = {name.split("[")[0]: a for name, a in suite_attacks("standard", eps, cas, num_modules).items()
                if _is_main_row(a, cas)}
    if spec in standard:
        return spec, standard[spec]
    if spec in PRESETS:
        preset = PRESETS[spec]
        return spec, dataclasses.replace(preset, eps=eps, alpha=preset.alpha * eps / preset.eps)
    raise ValueError(f"unknown attack {spec!r}; choose an Attack, one of {sorted(standard)}, 'adaptive', "
                     f"or a preset from {sorted(PRESETS)}")


def _gradient_job(name: str, kind: str, attack: Attack, target: nn.Module, in_worst_case: bool = True,
                  notes: Optional[str] = None, family: str = "", role: Optional[str] = None) -> _Job:
    attack = dataclasses.replace(attack, name=name)

    def craft(x, y, batch, generator):
        return attack(target, x, y, generator=generator, return_info=True)

    settings = attack.to_dict()
    settings["routing"] = attack.routing or "predicted (by each module, as deployed)"
    settings["eps_str"] = format_eps(attack.eps)
    return _Job(name, kind, attack.eps, settings, notes or _describe_attack(attack), craft, in_worst_case,
                family=family or name, objective=attack.objective, role=role, iterative=attack.steps > 1,
                per_example_seed=True, rank=_cascade_rank(attack, role))


def _noise_job(eps: float) -> _Job:
    def craft(x, y, batch, generator):
        noise = draw_noise("rand", x.shape, generator, x.device) * 2 - 1
        return (x + eps * noise).clamp(0.0, 1.0)

    return _Job("noise", "noise", eps, {"distribution": "uniform in the L-inf ball", "eps_str": format_eps(eps)},
                "uniform random noise of the same size (baseline for the checks)", craft, family="noise",
                per_example_seed=True, rank=CASCADE_RANKS["every example"])


def _example_seed(job_seed: int, index: int) -> int:
    """The seed of one example's random draws in one row: a function of the row's seed and the example's position in
    the dataset only, so results do not depend on the batch size, the batch's other examples or the process count."""
    return (job_seed * 1_000_003 + index) % (2 ** 63)


class _Indexed(Dataset):
    """``(image, label, index)``: the evaluation seeds each example's random starts by its index. ``indices``: only
    these examples of ``data`` (a cascade's survivors), still labelled by their index in ``data``."""

    def __init__(self, data: Dataset, indices: Optional[List[int]] = None):
        self.data = data
        self.indices = indices

    def __len__(self) -> int:
        return len(self.data) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        i = i if self.indices is None else self.indices[i]
        x, y = self.data[i]
        return x, y, i


# -- running ---------------------------------------------------------------------------------------------------------
def _as_dataset(dataset) -> Tuple[Dataset, str]:
    if isinstance(dataset, (str, os.PathLike)):
        from .data import build_dataset
        return build_dataset(dataset, "test"), f"{os.fspath(dataset)} (test)"
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        return TensorDataset(dataset[0], dataset[1]), "tensors"
    return dataset, type(dataset).__name__


def _default_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _versions(extra: Optional[dict] = None) -> dict:
    from .spec import versions
    v = versions()
    if extra:
        v.update(extra)
    return v


def evaluate(model: Union[nn.Module, str, os.PathLike], dataset, *,
             attacks: Union[str, Sequence[AttackSpec]] = "standard",
             eps: float = 8 / 255, batch_size: int = 128, max_examples: Optional[int] = None, seed: int = 0,
             device=None, progress: bool = True, accelerator=None, autoattack: bool = False,
             transfer_from: Union[None, nn.Module, str, os.PathLike] = None, square_queries: int = 0,
             eps_sweep: Optional[Sequence[float]] = None, checks: bool = True, per_attack: bool = False) -> EvalReport:
    """Evaluate ``model``'s robustness in the L-inf ball of radius ``eps`` (pixels in [0, 1]).

    Args:
        model: an ``nn.Module`` (moved to ``device``), or a folder / Hub id for :func:`casify.from_pretrained`.
        dataset: a Dataset of ``(image, label)``, a pair of tensors ``(x, y)``, or a name for
            :func:`casify.data.build_dataset` (its test split). The first ``max_examples`` items are used.
        attacks: ``"quick"``, ``"standard"`` or a list of :class:`casify.attacks.Attack`, suite names (``"fgsm"``,
            ``"pgd20"``, ``"cw20"``, ``"pgd100"``: on a CAS model their adaptive ``[cas]`` versions), preset names,
            and ``"adaptive"`` (the CAS-specific attacks: each head alone, fixed routings). On a CAS model a row is
            named by its objective (:func:`row_name`): an ``Attack(name="pgd", objective="ce")`` becomes the row
            ``pgd[final-logits]``.
        autoattack: also run AutoAttack (standard version) on the deployed logits; needs ``casify-robust[autoattack]``.
        transfer_from: a surrogate model (or its folder): PGD-20 is crafted on it and scored on ``model``.
        square_queries: query budget of a Square attack (0: none).
        eps_sweep: radii for a PGD-20 sweep, reported apart from the worst case.
        checks: run the gradient-masking checks (adds uniform noise, PGD-20 at 128/255, a gradient probe and, for a
            CAS model, a check-only final-logit PGD-20, plus an adaptive one when the rows have none); with
            ``checks=False`` the report's ``gradient_masking_suspected`` is None ("not checked").
        per_attack: run every row on every example (the full table: each row's own accuracy and family). The
            default, False, is a cascade, as AutoAttack does: natural, the main FGSM and PGD-20 and the noise baseline
            run on every example, then the other rows strongest first (:data:`CASCADE_RULE`), each only on the
            examples still robust. Random draws are per example, so the per-example worst case equals the full run's
            (for rows seeded per example: not Square or AutoAttack, which draw per batch); a row that ran only on
            survivors has no accuracy of its own (None), its family is left out of the summary or, when some of its
            rows ran on every example, marked as an upper bound, and the checks that need it whole adapt (see
            :func:`_run_checks`).

    Every gradient attack keeps the best iterate per example (see :mod:`casify.attacks`) and draws each example's
    random starts from a seed of its own (the row's seed and the example's dataset index), so the per-example results
    do not depend on ``batch_size`` or on the number of processes (Square and AutoAttack draw per batch).
        accelerator: an ``accelerate.Accelerator``; one is made when launched with several processes. The data are
            sharded over processes and per-example results gathered with ``gather_for_metrics``.
    """
    start_time = time.perf_counter()
    source = None
    if isinstance(model, (str, os.PathLike)):
        from .hub import from_pretrained
        source = os.fspath(model)
        model = from_pretrained(model)
    if isinstance(transfer_from, (str, os.PathLike)):
        from .hub import from_pretrained
        transfer_from = from_pretrained(transfer_from)
    if accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator
        accelerator = Accelerator()
    if accelerator is not None:
        device = accelerator.device
    model = _unwrap(model)
    device = _default_device(model, device)
    model.to(device)
    if transfer_from is not None:
        transfer_from = _unwrap(transfer_from).to(device)

    data, data_name = _as_dataset(dataset)
    if max_examples is not None:
        data = Subset(data, range(min(int(max_examples), len(data))))
    eps = float(eps)
    cas_modules = find_cas_modules(model)
    has_cas = bool(cas_modules)
    target = _InputTied(model)

    # -- plan --
    jobs: List[_Job] = [_Job("natural", "natural", 0.0, {}, "clean inputs", lambda x, y, b, g: x, family="natural",
                             rank=CASCADE_RANKS["every example"])]
    n_modules = len(cas_modules)

    def add_gradient_row(base: str, attack: Attack, kind: Optional[str] = None) -> None:
        name = row_name(base, attack, has_cas)
        main = _is_main_row(attack, has_cas)
        role = base if main and base in ("fgsm", "pgd20", "pgd100", "cw20") else None
        kind = kind or ("white-box" if main or not has_cas else "adaptive")
        jobs.append(_gradient_job(name, kind, attack, target, family=_family(base, name, attack, has_cas), role=role))

    if isinstance(attacks, str):
        suite = attacks
        for name, attack in suite_attacks(attacks, eps, has_cas, n_modules).items():
            add_gradient_row(name.split("[")[0], attack)
    else:
        suite = "custom"
        adaptive = False
        for spec in attacks:
            if isinstance(spec, str) and spec == "adaptive":
                adaptive = True
                continue
            base, attack = _resolve_attack(spec, eps, has_cas, n_modules)
            add_gradient_row(base, attack, kind="white-box" if isinstance(spec, Attack) else None)
        if adaptive and has_cas:
            for base, attack in _adaptive_rows(n_modules, eps):
                add_gradient_row(base, attack)
    extra_versions = {}
    if autoattack:
        aa_class, aa_flavour = _load_autoattack()
        extra_versions[aa_flavour] = _autoattack_version(aa_flavour)
        jobs.append(_autoattack_job(aa_class, aa_flavour, model, target, eps, seed, device, has_cas))
        jobs[-1].rank = CASCADE_RANKS["autoattack"]
    if transfer_from is not None:
        surrogate_obj = _objective(bool(find_cas_modules(transfer_from)))
        attack = Attack(name="transfer-pgd20", eps=eps, steps=20, objective=surrogate_obj)
        jobs.append(_gradient_job("transfer-pgd20", "black-box", attack, _InputTied(transfer_from),
                                  notes=f"PGD-20 crafted on the surrogate {type(transfer_from).__name__} "
                                        f"(objective {surrogate_obj}, best iterate on the surrogate), scored on the "
                                        "model"))
        jobs[-1].iterative = False  # its iterates are scored on the surrogate: no last-iterate evidence
        jobs[-1].rank = CASCADE_RANKS["black-box"]
    if square_queries > 0:
        jobs.append(_Job(f"square{square_queries}", "black-box", eps,
                         {"n_queries": int(square_queries), "p_init": SQUARE_P_INIT, "loss": "margin",
                          "eps_str": format_eps(eps)},
                         f"Square attack, {square_queries} queries, margin loss, p_init {SQUARE_P_INIT}",
                         lambda x, y, b, g: square_attack(model, x, y, eps=eps, n_queries=square_queries,
                                                          generator=g), family=f"square{square_queries}",
                         rank=CASCADE_RANKS["black-box"]))
    if checks:
        jobs.append(_noise_job(eps))
    sweep_jobs = []
    for e in sorted(float(v) for v in (eps_sweep or [])):
        attack = Attack(name=f"pgd20@{format_eps(e)}", eps=e, steps=20, objective=_objective(has_cas))
        sweep_jobs.append(_gradient_job(attack.name, "sweep", attack, target, in_worst_case=False))
    check_jobs = []
    if checks:
        attack = Attack(name=f"pgd20@{format_eps(LARGE_EPS)}", eps=LARGE_EPS, steps=20, objective=_objective(has_cas))
        check_jobs.append(_gradient_job(attack.name, "check", attack, target, in_worst_case=False,
                                        notes="large-eps PGD-20 for the eps_monotone check"))
        if has_cas:
            # Check-only references for final_logits_vs_adaptive: never rows of the report.
            check_jobs.append(_gradient_job(
                CHECK_FINAL_LOGITS, "check", Attack(eps=eps, steps=20, objective="ce"), target, in_worst_case=False,
                notes="check only: PGD-20 on the final logits alone (CE), predicted routing"))
            if not any(j.role == "pgd20" for j in jobs):
                check_jobs.append(_gradient_job(
                    CHECK_ADAPTIVE, "check", Attack(eps=eps, steps=20, objective="cas"), target, in_worst_case=False,
                    notes="check only: adaptive PGD-20 (CE + beta * mean auxiliary CE), as the report has none"))
    all_jobs = jobs + sweep_jobs + check_jobs
    names = [job.name for job in all_jobs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"attack names must be unique in one evaluation; repeated: {duplicates}")
    rank = accelerator.process_index if accelerator is not None else 0
    for i, job in enumerate(all_jobs):
        job.seed = seed + 1009 * i
    generators = [torch.Generator().manual_seed(job.seed + 7919 * rank) for job in all_jobs]

    # -- run --
    # The cascade's order; the sweep and the check-only attacks run on every example, after the rows.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].rank, i)) + list(range(len(jobs), len(all_jobs)))
    every = [per_attack or i >= len(jobs) or job.rank == CASCADE_RANKS["every example"]
             for i, job in enumerate(all_jobs)]
    n = len(data)
    # per example (dataset order) and job: correct, ran, last- and best-iterate correct (False where it did not run)
    correct = torch.zeros(n, len(all_jobs), dtype=torch.bool)
    ran_all, correct_last, correct_best = correct.clone(), correct.clone(), correct.clone()
    zero = torch.zeros(n, dtype=torch.bool)
    worst_cols = [i for i, job in enumerate(jobs) if job.in_worst_case]
    main_process = accelerator is None or accelerator.is_main_process
    modes = [(m, m.training) for m in model.modules()]

    def run(cols: List[int], indices: Optional[List[int]], desc: str, probe: bool = False) -> None:
        """Run the jobs ``cols`` on the examples ``indices`` (None: all), in batches of ``batch_size`` (a cascade's
        survivors are batched afresh, so a row on few survivors still runs full batches), into the matrices above."""
        from tqdm.auto import tqdm
        loader = DataLoader(_Indexed(data, indices), batch_size=batch_size, shuffle=False)
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
        bar = tqdm(loader, desc=desc, disable=not (progress and main_process), leave=False)
        col_index = torch.tensor(cols, dtype=torch.long)
        for x, y, index in bar:
            x = x.to(device).float()
            y = torch.as_tensor(y).to(device).long()
            index = torch.as_tensor(index).to(device)
            idx = index.tolist()
            flags = torch.zeros(x.shape[0], len(cols), dtype=torch.bool, device=x.device)
            last_flags, best_flags = flags.clone(), flags.clone()
            for c, i in enumerate(cols):
                job = all_jobs[i]
                t0 = time.perf_counter()
                generator = generators[i]
                if job.per_example_seed:  # each example's random draws from its own seed: batch-size independent
                    generator = [torch.Generator().manual_seed(_example_seed(job.seed, k)) for k in idx]
                out = job.craft(x, y, {"index": idx}, generator)
                x_adv, info = out if isinstance(out, tuple) else (out, None)
                _check_threat_model(job, x, x_adv)
                correct_now = deployed_correct(model, x_adv, y)
                flags[:, c] = correct_now
                # last- and best-iterate correctness, where the attack scored its iterates on this model
                scored = info is not None and job.iterative
                last_flags[:, c] = ~info.fooled_last if scored else correct_now
                best_flags[:, c] = ~info.fooled_any if scored else correct_now
                job.seconds += time.perf_counter() - t0
            pos = _gather_tensor(accelerator, index).cpu().long()
            rows_at = (pos.unsqueeze(1), col_index.unsqueeze(0))
            correct[rows_at] = _gather(accelerator, flags).cpu()
            ran_all[rows_at] = True
            correct_last[rows_at] = _gather(accelerator, last_flags).cpu()
            correct_best[rows_at] = _gather(accelerator, best_flags).cpu()
            if probe:
                zero[pos] = _gather(accelerator, zero_input_gradient(target, x, y)).cpu()
            if progress and main_process:
                done = ran_all[:, cols[0]]
                robust = correct[done][:, [i for i in worst_cols if i in cols]].all(dim=1)
                bar.set_postfix(robust=f"{100 * float(robust.float().mean()):.1f}%")

    try:
        run([i for i in order if every[i]], None, f"eval {format_eps(eps)}", probe=checks)
        alive = correct[:, [i for i in worst_cols if every[i]]].all(dim=1)
        for i in order:
            if every[i]:
                continue
            # the cascade: only the examples that every earlier row left correct
            survivors = alive.nonzero().squeeze(1).tolist()
            if survivors:
                run([i], survivors, f"{all_jobs[i].name} on {len(survivors)}")
            if i in worst_cols:
                alive &= correct[:, i]
    finally:
        for module, training in modes:
            module.training = training

    # -- report --
    zero_grads = [zero] if checks else []
    results = []
    for i, job in enumerate(all_jobs):
        whole = bool(every[i])
        c = int(correct[:, i].sum())
        last = int(correct_last[:, i].sum()) / n if (job.iterative and n and whole) else None
        results.append(AttackResult(job.name, job.kind, (c / n if n else 0.0) if whole else None, c if whole else None,
                                    n, round(job.seconds, 4), job.eps, job.settings, job.notes, job.in_worst_case,
                                    family=job.family or job.name, objective=job.objective,
                                    last_iterate_accuracy=last, attacked=int(ran_all[:, i].sum())))
    attack_results = results[:len(jobs)]
    worst_idx = [i for i, job in enumerate(jobs) if job.in_worst_case]
    worst_flags = correct[:, worst_idx].all(dim=1) if n else torch.zeros(0, dtype=torch.bool)
    worst = {"accuracy": int(worst_flags.sum()) / n if n else 0.0, "n_correct": int(worst_flags.sum()),
             "n": n, "attacks": [jobs[i].name for i in worst_idx]}
    # the cascade accounting, in the order the rows ran (the same numbers in both modes)
    cascade = []
    alive = torch.ones(n, dtype=torch.bool)
    for i in order[:len(jobs)]:
        if not jobs[i].in_worst_case:
            continue
        newly = int((alive & ~correct[:, i]).sum())
        alive &= correct[:, i]
        results[i].newly_fooled, results[i].robust_after = newly, int(alive.sum())
        cascade.append({"row": jobs[i].name, "attacked": results[i].attacked, "newly_fooled": newly,
                        "robust_after": int(alive.sum()), "every_example": bool(every[i])})
    families: Dict[str, dict] = {}
    for i in worst_idx:
        if jobs[i].kind == "noise":
            continue
        f = families.setdefault(jobs[i].family or jobs[i].name, {"rows": [], "cols": [], "survivors_only": []})
        if bool(every[i]):
            f["rows"].append(jobs[i].name)
            f["cols"].append(i)
        else:
            f["survivors_only"].append(jobs[i].name)
    for name in list(families):
        f = families[name]
        if not f["rows"]:  # no row of this family ran on every example: it has no accuracy here
            del families[name]
            continue
        flags = correct[:, f.pop("cols")].all(dim=1) if n else torch.zeros(0, dtype=torch.bool)
        f["accuracy"] = int(flags.sum()) / n if n else 0.0
        f["n_correct"] = int(flags.sum())
        if f["survivors_only"]:
            f["upper_bound"] = True
        else:
            del f["survivors_only"]
    per_example = {}
    for i, job in enumerate(all_jobs):
        flags, ran_i = correct[:, i].tolist(), ran_all[:, i].tolist()
        per_example[job.name] = flags if bool(every[i]) else [c if r else None for c, r in zip(flags, ran_i)]
    per_example["worst_case"] = worst_flags.tolist()
    check_list = (_run_checks(results, all_jobs, len(jobs), correct, correct_last, correct_best, zero_grads, n, eps,
                              has_cas, ran=ran_all) if checks else [])
    world = accelerator.num_processes if accelerator is not None else 1
    protocol = {
        "scoring": "eval mode, every CAS module routed by its own prediction, model(x_adv).argmax(1) == y",
        "crafting": "eval mode; predicted routing unless a row says otherwise",
        "iterates": "best iterate per example (one that fools the deployed model if any step did; restarts: the "
                    "worst over restarts); the last-iterate accuracy is kept as evidence",
        "row_names": "on a CAS model, attack[objective(,routing)]; [final-logits] marks an attack that sees only "
                     "the final logits" if has_cas else "plain attack names (no CAS modules)",
        "alpha_rule": "2.5 * eps / steps unless a row says otherwise",
        "random_starts": "per example and row: seed (row seed * 1000003 + dataset index) mod 2**63, so results do "
                         "not depend on the batch size or the process count (Square and AutoAttack: per batch)",
        "tolerance": f"max({MIN_TOLERANCE}, 2 * sqrt(max(p(1-p), 1/n) / n))",
        "large_eps": LARGE_EPS, "large_eps_max_accuracy": LARGE_EPS_MAX_ACCURACY,
        "zero_grad_max_fraction": ZERO_GRAD_MAX_FRACTION, "max_examples": max_examples,
        "objective": _objective(has_cas), "beta": 2.0,
        "mode": "per-attack: every row on every example" if per_attack else "cascade: " + CASCADE_RULE,
    }
    return EvalReport(
        model=describe_model(model, source), dataset=data_name, n_examples=n, eps=eps, eps_str=format_eps(eps),
        norm="linf", suite=suite, seed=seed, seeds={job.name: job.seed for job in all_jobs}, batch_size=batch_size,
        device=str(device), world_size=world, natural_accuracy=attack_results[0].accuracy, attacks=attack_results,
        worst_case=worst, eps_sweep=results[len(jobs):len(jobs) + len(sweep_jobs)], checks=check_list,
        gradient_masking_suspected=any(c.passed is False for c in check_list) if checks else None,
        protocol=protocol, versions=_versions(extra_versions),
        elapsed_seconds=round(time.perf_counter() - start_time, 3), families=families, per_attack=bool(per_attack),
        cascade=cascade, per_example=per_example)


def _gather_tensor(accelerator, t: torch.Tensor) -> torch.Tensor:
    return t if accelerator is None else accelerator.gather_for_metrics(t)


def _gather(accelerator, t: torch.Tensor) -> torch.Tensor:
    if accelerator is None:
        return t
    return accelerator.gather_for_metrics(t.to(torch.uint8)).bool()


def _check_threat_model(job: _Job, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Refuse a result whose examples leave the eps-ball or [0, 1]: the worst case must stay one threat model."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack {job.name!r} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    dist = float((x_adv.float() - x).abs().max()) if x.numel() else 0.0
    if dist > job.eps + 1e-5 or float(x_adv.min()) < -1e-6 or float(x_adv.max()) > 1 + 1e-6:
        raise RuntimeError(f"attack {job.name!r} left the threat model: L-inf distance {dist:.5f} vs eps "
                           f"{job.eps:.5f}, range [{float(x_adv.min()):.4f}, {float(x_adv.max()):.4f}]")


def _autoattack_job(aa_class, flavour: str, model: nn.Module, target: nn.Module, eps: float, seed: int,
                    device, cas: bool = False) -> _Job:
    """AutoAttack on ``target`` (the model with its input tied, same logits) in eval mode with predicted routing,
    i.e. on the deployed logits; the explicit routing also overrides any label routing a caller left active.
    Its gradient attacks see only the final logits, so on a CAS model the row is ``autoattack[final-logits]``."""
    def craft(x, y, batch, generator):
        x = x.contiguous()  # pyautoattack .view()s the input gradient, which fails on a permuted (NHWC) batch
        with attack_context(model):
            if flavour == "pyautoattack":
                aa = aa_class(target, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
                out = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
            else:
                aa = aa_class(target, norm="Linf", eps=eps, version="standard", device=device, seed=seed,
                              verbose=False)
                out = aa.run_standard_evaluation(x, y, bs=x.shape[0])
        x_adv = out[0] if isinstance(out, tuple) else out
        return x_adv.detach().to(x.device, x.dtype)

    name = "autoattack[final-logits]" if cas else "autoattack"
    return _Job(name, "autoattack", eps,
                {"version": "standard", "norm": "Linf", "package": flavour, "seed": seed, "eps_str": format_eps(eps)},
                "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) on the deployed logits", craft, family=name,
                objective="ce" if not cas else "final logits (APGD-CE, APGD-T, FAB-T; Square: black-box)")


# -- gradient-masking checks -----------------------------------------------------------------------------------------
def _run_checks(results: List[AttackResult], jobs: List[_Job], n_rows: int, correct: torch.Tensor,
                correct_last: torch.Tensor, correct_best: torch.Tensor, zero_grads: List[torch.Tensor], n: int,
                eps: float, cas: bool, ran: Optional[torch.Tensor] = None) -> List[Check]:
    """The checks over every job's per-example flags. ``jobs[:n_rows]`` are the report's rows (the rest are the eps
    sweep and the check-only attacks); ``correct_last`` / ``correct_best`` hold, for the iterative gradient rows, the
    flags of the last iterate and of the best one (as the attack scored them).

    In a cascade (``ran``: which job ran on which example; a row whose result has ``accuracy`` None ran only on the
    examples every earlier row left correct) the rows the checks compare whole run on every example (natural, FGSM,
    PGD-20, noise, the check-only attacks), and the others adapt: ``more_steps_do_not_help`` is skipped (PGD-100 ran
    only on examples PGD-20 left correct); ``iterative_beats_single_step`` compares the rows that ran on every
    example; ``black_box_not_stronger`` asks that a black-box row fool at most tol of the examples it attacked (all
    left correct by every earlier row), which implies the per-attack condition; ``best_vs_last_iterate`` compares
    the iterates on the examples the row attacked; ``worst_case_near_single_attacks`` bounds each such row's
    accuracy (at least its survivors, at most that plus the examples it did not attack) and passes or fails only when
    the bounds decide it (else skipped: "undetermined")."""
    if ran is None:
        ran = torch.ones_like(correct)

    def partial(i: int) -> bool:
        return results[i].accuracy is None

    by_name = {r.name: (i, r) for i, r in enumerate(results)}
    by_role = {j.role: (i, results[i]) for i, j in enumerate(jobs[:n_rows]) if j.role}
    rows = range(n_rows)
    worst_cols = [i for i in rows if jobs[i].in_worst_case]
    worst = int(correct[:, worst_cols].all(dim=1).sum()) / n if n else 0.0
    out = []

    # (a) accuracy falls with eps and reaches ~0 at a large eps
    points = [(0.0, by_name["natural"][1].accuracy)]
    if "pgd20" in by_role:
        points.append((eps, by_role["pgd20"][1].accuracy))
    points += [(r.eps, r.accuracy) for r in results if r.kind == "sweep" or r.name == f"pgd20@{format_eps(LARGE_EPS)}"]
    points.sort(key=lambda p: p[0])
    rises = [(format_eps(a[0]), format_eps(b[0])) for a, b in zip(points, points[1:])
             if b[0] > a[0] and b[1] > a[1] + tolerance(a[1], n)]
    large = by_name[f"pgd20@{format_eps(LARGE_EPS)}"][1].accuracy
    out.append(Check("eps_monotone", not rises and large < LARGE_EPS_MAX_ACCURACY,
                     f"accuracy must not rise with eps and must fall below {100 * LARGE_EPS_MAX_ACCURACY:g} % at "
                     f"eps {format_eps(LARGE_EPS)}",
                     {"curve": [[format_eps(e), round(a, 4)] for e, a in points], "rises": rises,
                      "accuracy_at_large_eps": large}))

    # (b) more steps must not help the model
    if "pgd100" in by_role and partial(by_role["pgd100"][0]):
        out.append(Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 on every example (per_attack=True)",
                         {"skipped": "cascade: PGD-100 ran only on the examples every earlier row left correct"}))
    elif "pgd20" in by_role and "pgd100" in by_role:
        a20, a100 = by_role["pgd20"][1].accuracy, by_role["pgd100"][1].accuracy
        tol = tolerance(a20, n)
        out.append(Check("more_steps_do_not_help", a100 <= a20 + tol, "PGD-100 accuracy <= PGD-20 accuracy + tol",
                         {"pgd20": a20, "pgd100": a100, "rows": [by_role["pgd20"][1].name, by_role["pgd100"][1].name],
                          "tolerance": tol}))
    else:
        out.append(Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 (the standard suite)",
                         {"skipped": "pgd20 or pgd100 not run"}))

    # (c) black-box attacks must not beat white-box ones
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
        out.append(Check("black_box_not_stronger", ok, "transfer / Square accuracy >= white-box worst case - tol "
                         "(cascade: a black-box row fools at most tol of the examples every earlier row left correct)",
                         evidence))
    else:
        out.append(Check("black_box_not_stronger", None, "needs a black-box attack (transfer_from= or square_queries=)",
                         {"skipped": "no black-box attack run"}))

    # (d) PGD must beat uniform noise of the same size
    if "pgd20" in by_role:
        i_pgd, i_noise = by_role["pgd20"][0], by_name["noise"][0]
        acc_pgd, acc_noise = results[i_pgd].accuracy, results[i_noise].accuracy
        pgd_only = int((correct[:, i_noise] & ~correct[:, i_pgd]).sum())
        noise_only = int((correct[:, i_pgd] & ~correct[:, i_noise]).sum())
        nothing_left = acc_noise <= tolerance(acc_noise, n)
        significant = pgd_only - noise_only > 2.0 * math.sqrt(pgd_only + noise_only) and acc_pgd < acc_noise
        out.append(Check("pgd_beats_noise", bool(nothing_left or significant),
                         "PGD-20 fools significantly more examples than uniform noise (paired, 2 sigma)",
                         {"pgd20": acc_pgd, "row": results[i_pgd].name, "noise": acc_noise,
                          "fooled_by_pgd_only": pgd_only, "fooled_by_noise_only": noise_only}))
    else:
        out.append(Check("pgd_beats_noise", None, "needs pgd20", {"skipped": "pgd20 not run"}))

    # (e) the input gradient exists
    zero = torch.cat(zero_grads) if zero_grads else torch.zeros(0, dtype=torch.bool)
    frac = float(zero.float().mean()) if zero.numel() else 0.0
    out.append(Check("nonzero_gradients", frac <= ZERO_GRAD_MAX_FRACTION,
                     f"at most {100 * ZERO_GRAD_MAX_FRACTION:g} % of clean examples with a zero or non-finite input "
                     "gradient of the CW margin", {"zero_gradient_fraction": frac, "n": int(zero.numel())}))

    # (f) an iterative attack must not be weaker than a single step on the same objective
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
        out.append(Check("iterative_beats_single_step", ok, "PGD-20 / PGD-100 accuracy <= FGSM accuracy + tol "
                         "(same objective)", evidence))
    else:
        out.append(Check("iterative_beats_single_step", None, "needs fgsm and pgd20 or pgd100",
                         {"skipped": "fgsm or pgd20/pgd100 not run"}))

    # (g) final-logit vs adaptive objectives (CAS models)
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
        out.append(Check(
            "final_logits_vs_adaptive", bool(passed),
            "the reported worst case is no higher than a final-logit PGD-20 or an adaptive PGD-20 (check-only "
            "references where not rows) + tol; their gap says how much final-logit-only attacks overstate the model",
            {"final_logits_pgd20": final, "adaptive_pgd20": adaptive, "adaptive_row": ref.name,
             "final_minus_adaptive": gap, "worst_case": worst, "tolerance": tol, "verdict": verdict}))
    else:
        out.append(Check("final_logits_vs_adaptive", None, "needs a model with CAS modules",
                         {"skipped": "no CAS modules: the adaptive objectives are the final-logit ones"}))

    # (h) the last iterate must not be far weaker than the best one, and no row may report a last iterate that is
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
        out.append(Check("best_vs_last_iterate", ok, "per iterative gradient row: last-iterate accuracy <= "
                         "best-iterate accuracy + 2 tol (a larger gap: the answer depends on when the attack stops), "
                         "and a row that keeps the last iterate reports <= best-iterate accuracy + tol", evidence))
    else:
        out.append(Check("best_vs_last_iterate", None, "needs an iterative gradient attack",
                         {"skipped": "no iterative gradient attack run"}))

    # (i) the worst case must not lie far below every single attack
    singles = [i for i in rows if jobs[i].in_worst_case and jobs[i].kind not in ("natural", "noise")]
    description = ("worst case >= strongest single attack - 2 tol (attacks that each miss many examples another finds "
                   "are unreliable one by one)")
    if len(singles) > 1 and n and not any(partial(i) for i in singles):
        strongest = min(singles, key=lambda i: results[i].accuracy)
        best_single = results[strongest].accuracy
        margin = 2.0 * tolerance(best_single, n)
        out.append(Check("worst_case_near_single_attacks", worst >= best_single - margin, description,
                         {"worst_case": worst, "strongest_single": jobs[strongest].name,
                          "strongest_single_accuracy": best_single, "allowed_gap": margin}))
    elif len(singles) > 1 and n:
        # a cascade: a row that ran on survivors only has accuracy in [its survivors, + the examples it skipped]
        low = {i: int(correct[:, i].sum()) / n for i in singles}
        high = {i: low[i] + (int((~ran[:, i]).sum()) / n if partial(i) else 0.0) for i in singles}
        hi_i, lo_i = min(singles, key=lambda i: high[i]), min(singles, key=lambda i: low[i])
        hi, lo = high[hi_i], low[lo_i]
        sure_pass = worst >= hi - 2.0 * tolerance(hi, n) and worst >= lo - 2.0 * tolerance(lo, n)
        sure_fail = worst < hi - 2.0 * tolerance(hi, n) and worst < lo - 2.0 * tolerance(lo, n)
        out.append(Check("worst_case_near_single_attacks", True if sure_pass else (False if sure_fail else None),
                         description + " (cascade: decided from bounds on the strongest single attack, else "
                         "undetermined: run per_attack=True)",
                         {"worst_case": worst, "strongest_single_accuracy_bounds": [lo, hi],
                          "strongest_single_candidates": sorted({jobs[lo_i].name, jobs[hi_i].name}),
                          **({} if sure_pass or sure_fail else
                             {"skipped": "undetermined in a cascade: run per_attack=True"})}))
    else:
        out.append(Check("worst_case_near_single_attacks", None, "needs two attacks or more",
                         {"skipped": "fewer than two attacks"}))
    return out


__all__ = ["AttackResult", "CASCADE_RANKS", "CASCADE_RULE", "Check", "EvalReport", "LARGE_EPS", "SUITES",
           "clean_routings", "deployed_correct",
           "describe_model", "evaluate", "format_eps", "parse_eps", "row_name", "square_attack", "suite_attacks",
           "tolerance", "zero_input_gradient"]
