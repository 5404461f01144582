"""Robustness evaluation that a reader can trust: the model as deployed, adaptive attacks, and gradient-masking checks.

Every accuracy is measured on the model as it would be used: eval mode, every CAS module routed by its own prediction,
no labels anywhere near the forward, ``model(x_adv).argmax(1) == y`` (``shared/docs/cas-reference.md``: evaluating in
training mode with ``y`` leaks the label through the mask). How an attack *crafts* its examples may differ (a fixed
routing, an auxiliary head, a surrogate model); how it is *scored* never does.

Suites (all L-inf, eps in [0, 1] pixel units, alpha = 2.5 * eps / steps unless said otherwise):

- ``"quick"``: natural; FGSM as the authors ran it (uniform random start, then one eps step on the ``"cas"``
  objective); PGD-20 (``"cas"`` objective, random start); CW-inf (20 steps, per-example margin, kappa 50).
- ``"standard"``: quick + PGD-100, and for CAS models the adaptive attacks: PGD-20 on each auxiliary head alone
  (``"aux:<i>"``, flipping one module's argmax changes its mask) and PGD-20 with a fixed routing that bypasses the
  argmax: every module routed by the model's clean prediction, and by a soft mixture of weight rows weighted by the
  softmax of the clean auxiliary logits (averaged over modules, detached).

Plain (non-CAS) models get the same attacks on the ``"ce"`` objective. The *worst case* is per example: an example
counts as robust only if it is classified correctly under every attack run at ``eps`` (natural, white-box, adaptive,
AutoAttack, transfer, Square and same-size uniform noise). The eps sweep and the large-eps check are reported apart.

Gradient-masking checks (each returns pass / fail / skipped with its evidence; any failure sets
``gradient_masking_suspected``):

- ``eps_monotone``: accuracy must not rise with eps (beyond noise) and PGD-20 at eps = 128/255 must leave fewer than
  10 % of examples correct (at that radius the constant grey image lies in every ball).
- ``more_steps_do_not_help``: PGD-100 accuracy <= PGD-20 accuracy + tolerance.
- ``black_box_not_stronger``: transfer / Square accuracy >= white-box worst case - tolerance.
- ``pgd_beats_noise``: PGD-20 must fool significantly more examples than uniform noise of the same size (paired
  one-sided McNemar test at 2 sigma), unless noise already leaves nothing to fool.
- ``nonzero_gradients``: at most 10 % of clean examples may have an all-zero (or non-finite) input gradient of the
  CW margin (the margin's gradient does not saturate the way a confident cross-entropy does).

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
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .attacks import PRESETS, Attack, attack_context, cw_margin
from .cas import CASModule, aux_logits, find_cas_modules

SUITES = ("quick", "standard")
LARGE_EPS = 128 / 255
LARGE_EPS_MAX_ACCURACY = 0.10
ZERO_GRAD_MAX_FRACTION = 0.10
MIN_TOLERANCE = 0.01
SQUARE_P_INIT = 0.8
AUTOATTACK_INSTALL = "pip install casify[autoattack]"

AttackSpec = Union[str, Attack]


# -- eps as text -----------------------------------------------------------------------------------------------------
def parse_eps(text: Union[str, float, int]) -> float:
    """``"8/255"`` -> 0.0314, ``"0.031"`` -> 0.031. eps is in [0, 1] pixel units, so ``"8"`` is an error."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(s)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read eps {text!r}; write it like 8/255 or 0.031") from None
    if not 0.0 <= value <= 1.0 or not math.isfinite(value):
        raise ValueError(f"eps {text!r} is {value:g}, outside [0, 1]: eps is in pixel units, write 8/255, not 8")
    return value


def format_eps(eps: float) -> str:
    """0.0314 -> ``"8/255"``; a radius that is no whole number of grey levels keeps three digits (``"7.91/255"``)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{k:.3g}/255"


def tolerance(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy ``p`` on ``n`` examples, at least one point (see module doc)."""
    if n <= 0:
        return 1.0
    return max(MIN_TOLERANCE, 2.0 * math.sqrt(max(p * (1.0 - p), 1.0 / n) / n))


# -- the report ------------------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """Accuracy of the deployed model under one attack. ``kind``: natural, white-box, adaptive, autoattack,
    black-box, noise, sweep or check. Only results with ``in_worst_case`` enter the per-example worst case."""
    name: str
    kind: str
    accuracy: float
    n_correct: int
    n: int
    seconds: float
    eps: float
    settings: dict = field(default_factory=dict)
    notes: str = ""
    in_worst_case: bool = True


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
    out of the JSON unless asked for: it is for callers that combine attacks themselves."""
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
    gradient_masking_suspected: bool
    protocol: dict
    versions: dict
    elapsed_seconds: float
    per_example: Dict[str, List[bool]] = field(default_factory=dict, repr=False)

    def accuracy(self, name: str) -> float:
        """Accuracy under the attack (or sweep point) called ``name``; ``"worst_case"`` for the worst case."""
        if name == "worst_case":
            return self.worst_case["accuracy"]
        for result in self.attacks + self.eps_sweep:
            if result.name == name:
                return result.accuracy
        raise KeyError(f"no attack {name!r} in this report; it has {[r.name for r in self.attacks + self.eps_sweep]}")

    def summary(self) -> dict:
        """The headline numbers in the shape the model card and recipe summaries use: threat model, number of
        examples, accuracy under natural, every attack that enters the worst case, and the worst case itself."""
        accuracy = {r.name: r.accuracy for r in self.attacks if r.in_worst_case and r.kind != "noise"}
        accuracy["worst_case"] = self.worst_case["accuracy"]
        return {"eps": self.eps, "eps_str": self.eps_str, "norm": self.norm, "n": self.n_examples,
                "suite": self.suite, "accuracy": accuracy,
                "gradient_masking_suspected": self.gradient_masking_suspected}

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
            f"- suite: {self.suite}; seed {self.seed}; {self.elapsed_seconds:.1f} s on {self.device}"
            + (f" x {self.world_size} processes" if self.world_size > 1 else ""),
            "", "| attack | accuracy % | notes |", "|---|---|---|",
        ]
        for r in self.attacks:
            note = r.notes + ("" if r.in_worst_case else " (not in the worst case)")
            lines.append(f"| {r.name} | {100 * r.accuracy:.2f} | {note} |")
        wc = self.worst_case
        lines.append(f"| **worst case** | **{100 * wc['accuracy']:.2f}** | correct under every one of the "
                     f"{len(wc['attacks'])} rows above that enter it |")
        if self.eps_sweep:
            lines += ["", "## eps sweep (PGD-20)", "", "| eps | accuracy % |", "|---|---|"]
            lines += [f"| {format_eps(r.eps)} | {100 * r.accuracy:.2f} |" for r in self.eps_sweep]
        lines += ["", "## Gradient-masking checks", ""]
        if not self.checks:
            lines.append("Not run (checks=False).")
        else:
            lines += [f"Gradient masking suspected: **{'YES' if self.gradient_masking_suspected else 'no'}**", "",
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


@torch.no_grad()
def clean_routings(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Routings for the fixed-routing attacks, from one clean deployed forward (detached):

    ``"predicted"``: the model's own predicted class (N,); ``"soft"``: the mean over CAS modules of the softmax of
    each module's auxiliary logits (N, num_classes), a mixture of weight rows. ``casify.route`` takes one routing
    for all modules, hence the mean.
    """
    with attack_context(model):
        logits = model(x)
        soft = torch.stack([F.softmax(a.float(), dim=1) for a in aux_logits(model)]).mean(dim=0)
    return {"predicted": logits.argmax(dim=1), "soft": soft}


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
    """One row of the evaluation: how to craft ``x_adv`` for a batch, and where its accuracy goes."""
    name: str
    kind: str
    eps: float
    settings: dict
    notes: str
    craft: Callable[[torch.Tensor, torch.Tensor, dict, torch.Generator], torch.Tensor]
    in_worst_case: bool = True
    seed: int = 0
    seconds: float = 0.0


def _objective(cas: bool) -> str:
    return "cas" if cas else "ce"


def suite_attacks(suite: str, eps: float = 8 / 255, cas: bool = True) -> Dict[str, Attack]:
    """The gradient attacks of a suite at radius ``eps``, by name (routing-specific ones included for CAS models).

    The fixed-routing rows reuse PGD-20's settings; :func:`evaluate` gives them their routings.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES} or a list of attacks, got {suite!r}")
    obj = _objective(cas)
    attacks = {
        "fgsm": Attack(name="fgsm", kind="fgsm", eps=eps, alpha=eps, objective=obj, random_start=True),
        "pgd20": Attack(name="pgd20", eps=eps, steps=20, objective=obj),
        "cw20": Attack(name="cw20", kind="cw", eps=eps, steps=20, kappa=50.0),
    }
    if suite == "standard":
        attacks["pgd100"] = Attack(name="pgd100", eps=eps, steps=100, objective=obj)
    return attacks


def _adaptive_attacks(num_modules: int, eps: float) -> Dict[str, Tuple[Attack, Optional[str]]]:
    rows = {f"aux{i}-pgd20": (Attack(name=f"aux{i}-pgd20", eps=eps, steps=20, objective=f"aux:{i}"), None)
            for i in range(num_modules)}
    rows["pgd20-route-predicted"] = (Attack(name="pgd20-route-predicted", eps=eps, steps=20, objective="cas"),
                                     "predicted")
    rows["pgd20-route-soft"] = (Attack(name="pgd20-route-soft", eps=eps, steps=20, objective="cas"), "soft")
    return rows


def _describe_attack(a: Attack, routing: Optional[str] = None) -> str:
    if a.kind == "fgsm":
        text = f"1 step of {format_eps(a.alpha)}" + (" after a random start" if a.random_start != "none" else "")
    else:
        text = f"{a.steps} steps of {format_eps(a.alpha)}" + (f", {a.restarts} restarts" if a.restarts > 1 else "")
        text += f", {a.random_start} start" if a.random_start != "none" else ", no random start"
    text += ", CW margin (kappa %g)" % a.kappa if a.objective == "cw" else f", objective {a.objective}"
    if routing == "predicted":
        text += "; crafted with every module routed by the clean predicted class"
    elif routing == "soft":
        text += "; crafted with a soft routing: softmax of the clean aux logits (mean over modules)"
    return text


def _resolve_attack(spec: AttackSpec, eps: float, cas: bool) -> Attack:
    """A list entry as an Attack at the evaluation's eps: an Attack (its eps must not exceed it), a suite name,
    or an :data:`casify.attacks.PRESETS` name (eps set to ``eps``, alpha scaled with it)."""
    if isinstance(spec, Attack):
        if spec.eps > eps + 1e-9:
            raise ValueError(f"attack {spec.name!r} has eps {spec.eps:.5f} > the evaluation's eps {eps:.5f}: the worst "
                             "case would mix threat models; evaluate it with eps= its own radius")
        return spec
    standard = suite_attacks("standard", eps, cas)
    if spec in standard:
        return standard[spec]
    if spec in PRESETS:
        preset = PRESETS[spec]
        return dataclasses.replace(preset, eps=eps, alpha=preset.alpha * eps / preset.eps)
    raise ValueError(f"unknown attack {spec!r}; choose an Attack, one of {sorted(standard)}, 'adaptive', "
                     f"or a preset from {sorted(PRESETS)}")


def _gradient_job(name: str, kind: str, attack: Attack, target: nn.Module, routing: Optional[str] = None,
                  in_worst_case: bool = True, notes: Optional[str] = None) -> _Job:
    def craft(x, y, batch, generator):
        route = None if routing is None else batch["routings"][routing]
        return attack(target, x, y, routing=route, generator=generator)

    settings = attack.to_dict()
    settings["routing"] = routing or "predicted (by each module, as deployed)"
    settings["eps_str"] = format_eps(attack.eps)
    return _Job(name, kind, attack.eps, settings, notes or _describe_attack(attack, routing), craft, in_worst_case)


def _noise_job(eps: float) -> _Job:
    def craft(x, y, batch, generator):
        noise = (torch.rand(x.shape, generator=generator, device=generator.device) * 2 - 1).to(x.device)
        return (x + eps * noise).clamp(0.0, 1.0)

    return _Job("noise", "noise", eps, {"distribution": "uniform in the L-inf ball", "eps_str": format_eps(eps)},
                "uniform random noise of the same size (baseline for the checks)", craft)


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
             eps_sweep: Optional[Sequence[float]] = None, checks: bool = True) -> EvalReport:
    """Evaluate ``model``'s robustness in the L-inf ball of radius ``eps`` (pixels in [0, 1]).

    Args:
        model: an ``nn.Module`` (moved to ``device``), or a folder / Hub id for :func:`casify.from_pretrained`.
        dataset: a Dataset of ``(image, label)``, a pair of tensors ``(x, y)``, or a name for
            :func:`casify.data.build_dataset` (its test split). The first ``max_examples`` items are used.
        attacks: ``"quick"``, ``"standard"`` or a list of :class:`casify.attacks.Attack`, suite names (``"fgsm"``,
            ``"pgd20"``, ``"cw20"``, ``"pgd100"``), preset names, and ``"adaptive"`` (the CAS-specific attacks).
        autoattack: also run AutoAttack (standard version) on the deployed logits; needs ``casify[autoattack]``.
        transfer_from: a surrogate model (or its folder): PGD-20 is crafted on it and scored on ``model``.
        square_queries: query budget of a Square attack (0: none).
        eps_sweep: radii for a PGD-20 sweep, reported apart from the worst case.
        checks: run the gradient-masking checks (adds uniform noise, PGD-20 at 128/255 and a gradient probe).
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
    jobs: List[_Job] = [_Job("natural", "natural", 0.0, {}, "clean inputs", lambda x, y, b, g: x)]
    if isinstance(attacks, str):
        suite = attacks
        for name, attack in suite_attacks(attacks, eps, has_cas).items():
            jobs.append(_gradient_job(name, "white-box", attack, target))
        adaptive = attacks == "standard"
    else:
        suite = "custom"
        adaptive = False
        for spec in attacks:
            if isinstance(spec, str) and spec == "adaptive":
                adaptive = True
                continue
            attack = _resolve_attack(spec, eps, has_cas)
            jobs.append(_gradient_job(attack.name, "white-box", attack, target))
    if adaptive and has_cas:
        for name, (attack, routing) in _adaptive_attacks(len(cas_modules), eps).items():
            jobs.append(_gradient_job(name, "adaptive", attack, target, routing))
    extra_versions = {}
    if autoattack:
        aa_class, aa_flavour = _load_autoattack()
        extra_versions[aa_flavour] = _autoattack_version(aa_flavour)
        jobs.append(_autoattack_job(aa_class, aa_flavour, model, target, eps, seed, device))
    if transfer_from is not None:
        surrogate_obj = _objective(bool(find_cas_modules(transfer_from)))
        attack = Attack(name="transfer-pgd20", eps=eps, steps=20, objective=surrogate_obj)
        jobs.append(_gradient_job("transfer-pgd20", "black-box", attack, _InputTied(transfer_from),
                                  notes=f"PGD-20 crafted on the surrogate {type(transfer_from).__name__} "
                                        f"(objective {surrogate_obj}), scored on the model"))
    if square_queries > 0:
        jobs.append(_Job(f"square{square_queries}", "black-box", eps,
                         {"n_queries": int(square_queries), "p_init": SQUARE_P_INIT, "loss": "margin",
                          "eps_str": format_eps(eps)},
                         f"Square attack, {square_queries} queries, margin loss, p_init {SQUARE_P_INIT}",
                         lambda x, y, b, g: square_attack(model, x, y, eps=eps, n_queries=square_queries,
                                                          generator=g)))
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
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    main_process = True
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        main_process = accelerator.is_main_process
    modes = [(m, m.training) for m in model.modules()]
    rows: List[torch.Tensor] = []
    zero_grads: List[torch.Tensor] = []
    worst_cols = [i for i, job in enumerate(jobs) if job.in_worst_case]
    seen = robust = 0
    try:
        from tqdm.auto import tqdm
        bar = tqdm(loader, desc=f"eval {format_eps(eps)}", disable=not (progress and main_process), leave=False)
        for x, y in bar:
            x = x.to(device).float()
            y = torch.as_tensor(y).to(device).long()
            batch = {"routings": clean_routings(model, x) if has_cas else {}}
            flags = []
            for job, generator in zip(all_jobs, generators):
                t0 = time.perf_counter()
                x_adv = job.craft(x, y, batch, generator)
                _check_threat_model(job, x, x_adv)
                flags.append(deployed_correct(model, x_adv, y))
                job.seconds += time.perf_counter() - t0
            if checks:
                zero_grads.append(_gather(accelerator, zero_input_gradient(target, x, y)).cpu())
            rows.append(_gather(accelerator, torch.stack(flags, dim=1)).cpu())
            seen += rows[-1].shape[0]
            robust += int(rows[-1][:, worst_cols].all(dim=1).sum())
            if progress and main_process:
                bar.set_postfix(worst=f"{100 * robust / max(seen, 1):.1f}%")
    finally:
        for module, training in modes:
            module.training = training
    correct = torch.cat(rows) if rows else torch.zeros(0, len(all_jobs), dtype=torch.bool)
    n = correct.shape[0]

    # -- report --
    results = []
    for i, job in enumerate(all_jobs):
        c = int(correct[:, i].sum())
        results.append(AttackResult(job.name, job.kind, c / n if n else 0.0, c, n, round(job.seconds, 4), job.eps,
                                    job.settings, job.notes, job.in_worst_case))
    attack_results = results[:len(jobs)]
    worst_idx = [i for i, job in enumerate(jobs) if job.in_worst_case]
    worst_flags = correct[:, worst_idx].all(dim=1) if n else torch.zeros(0, dtype=torch.bool)
    worst = {"accuracy": float(worst_flags.float().mean()) if n else 0.0, "n_correct": int(worst_flags.sum()),
             "n": n, "attacks": [jobs[i].name for i in worst_idx]}
    per_example = {job.name: correct[:, i].tolist() for i, job in enumerate(all_jobs)}
    per_example["worst_case"] = worst_flags.tolist()
    check_list = _run_checks(results, jobs, correct, zero_grads, n, eps) if checks else []
    world = accelerator.num_processes if accelerator is not None else 1
    protocol = {
        "scoring": "eval mode, every CAS module routed by its own prediction, model(x_adv).argmax(1) == y",
        "crafting": "eval mode; predicted routing unless a row says otherwise",
        "alpha_rule": "2.5 * eps / steps unless a row says otherwise",
        "tolerance": f"max({MIN_TOLERANCE}, 2 * sqrt(max(p(1-p), 1/n) / n))",
        "large_eps": LARGE_EPS, "large_eps_max_accuracy": LARGE_EPS_MAX_ACCURACY,
        "zero_grad_max_fraction": ZERO_GRAD_MAX_FRACTION, "max_examples": max_examples,
        "objective": _objective(has_cas), "beta": 2.0,
    }
    return EvalReport(
        model=describe_model(model, source), dataset=data_name, n_examples=n, eps=eps, eps_str=format_eps(eps),
        norm="linf", suite=suite, seed=seed, seeds={job.name: job.seed for job in all_jobs}, batch_size=batch_size,
        device=str(device), world_size=world, natural_accuracy=attack_results[0].accuracy, attacks=attack_results,
        worst_case=worst, eps_sweep=results[len(jobs):len(jobs) + len(sweep_jobs)], checks=check_list,
        gradient_masking_suspected=any(c.passed is False for c in check_list), protocol=protocol,
        versions=_versions(extra_versions), elapsed_seconds=round(time.perf_counter() - start_time, 3),
        per_example=per_example)


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
                    device) -> _Job:
    """AutoAttack on ``target`` (the model with its input tied, same logits) in eval mode with predicted routing,
    i.e. on the deployed logits; the explicit routing also overrides any label routing a caller left active."""
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

    return _Job("autoattack", "autoattack", eps,
                {"version": "standard", "norm": "Linf", "package": flavour, "seed": seed, "eps_str": format_eps(eps)},
                "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) on the deployed logits", craft)


# -- gradient-masking checks -----------------------------------------------------------------------------------------
def _run_checks(results: List[AttackResult], jobs: List[_Job], correct: torch.Tensor, zero_grads: List[torch.Tensor],
                n: int, eps: float) -> List[Check]:
    by_name = {r.name: (i, r) for i, r in enumerate(results)}
    out = []

    # (a) accuracy falls with eps and reaches ~0 at a large eps
    points = [(0.0, by_name["natural"][1].accuracy)]
    if "pgd20" in by_name:
        points.append((eps, by_name["pgd20"][1].accuracy))
    points += [(r.eps, r.accuracy) for r in results if r.kind in ("sweep", "check")]
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
    if "pgd20" in by_name and "pgd100" in by_name:
        a20, a100 = by_name["pgd20"][1].accuracy, by_name["pgd100"][1].accuracy
        tol = tolerance(a20, n)
        out.append(Check("more_steps_do_not_help", a100 <= a20 + tol, "PGD-100 accuracy <= PGD-20 accuracy + tol",
                         {"pgd20": a20, "pgd100": a100, "tolerance": tol}))
    else:
        out.append(Check("more_steps_do_not_help", None, "needs pgd20 and pgd100 (the standard suite)",
                         {"skipped": "pgd20 or pgd100 not run"}))

    # (c) black-box attacks must not beat white-box ones
    white = [i for i, j in enumerate(jobs) if j.kind in ("natural", "white-box", "adaptive", "autoattack")]
    black = [i for i, j in enumerate(jobs) if j.kind == "black-box"]
    if black and len(white) > 1:
        white_flags = correct[:, white].all(dim=1)
        wb = float(white_flags.float().mean()) if n else 0.0
        tol = tolerance(wb, n)
        evidence = {"white_box_worst": wb, "tolerance": tol}
        ok = True
        for i in black:
            acc = results[i].accuracy
            only_black = int((white_flags & ~correct[:, i]).sum())
            evidence[jobs[i].name] = acc
            evidence[f"{jobs[i].name}_fools_white_box_survivors"] = only_black
            ok &= acc >= wb - tol
        out.append(Check("black_box_not_stronger", ok, "transfer / Square accuracy >= white-box worst case - tol",
                         evidence))
    else:
        out.append(Check("black_box_not_stronger", None, "needs a black-box attack (transfer_from= or square_queries=)",
                         {"skipped": "no black-box attack run"}))

    # (d) PGD must beat uniform noise of the same size
    if "pgd20" in by_name:
        i_pgd, i_noise = by_name["pgd20"][0], by_name["noise"][0]
        acc_pgd, acc_noise = results[i_pgd].accuracy, results[i_noise].accuracy
        pgd_only = int((correct[:, i_noise] & ~correct[:, i_pgd]).sum())
        noise_only = int((correct[:, i_pgd] & ~correct[:, i_noise]).sum())
        nothing_left = acc_noise <= tolerance(acc_noise, n)
        significant = pgd_only - noise_only > 2.0 * math.sqrt(pgd_only + noise_only) and acc_pgd < acc_noise
        out.append(Check("pgd_beats_noise", bool(nothing_left or significant),
                         "PGD-20 fools significantly more examples than uniform noise (paired, 2 sigma)",
                         {"pgd20": acc_pgd, "noise": acc_noise, "fooled_by_pgd_only": pgd_only,
                          "fooled_by_noise_only": noise_only}))
    else:
        out.append(Check("pgd_beats_noise", None, "needs pgd20", {"skipped": "pgd20 not run"}))

    # (e) the input gradient exists
    zero = torch.cat(zero_grads) if zero_grads else torch.zeros(0, dtype=torch.bool)
    frac = float(zero.float().mean()) if zero.numel() else 0.0
    out.append(Check("nonzero_gradients", frac <= ZERO_GRAD_MAX_FRACTION,
                     f"at most {100 * ZERO_GRAD_MAX_FRACTION:g} % of clean examples with a zero or non-finite input "
                     "gradient of the CW margin", {"zero_gradient_fraction": frac, "n": int(zero.numel())}))
    return out


__all__ = ["AttackResult", "Check", "EvalReport", "LARGE_EPS", "SUITES", "clean_routings", "deployed_correct",
           "describe_model", "evaluate", "format_eps", "parse_eps", "square_attack", "suite_attacks", "tolerance",
           "zero_input_gradient"]
