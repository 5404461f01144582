"""Planning an evaluation: which rows it has, how each is named and crafted, and in which order the cascade runs them.

A row (:class:`Job`) knows how to craft ``x_adv`` for a batch and where its result goes; :func:`plan_rows` turns the
caller's request (a suite, a list of attacks, AutoAttack, transfer, Square, the sweep, the checks' own attacks) into
the rows, each with its seed. Every attacked row is an :class:`~casify.attacks.Attack` run through its kind
(:data:`casify.attacks.ATTACK_KINDS`): the kind crafts, describes the row and gives its settings; the plan names the
row, ranks it in the cascade and seeds it. Nothing here runs a batch: :mod:`casify.evaluate.runner` does.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..attacks import CASCADE_GROUPS, PRESETS, Attack, get_attack_kind, objective_tag
from ..defenses import attack_head_count, find_defense_modules
from ..attacks.threat_model import LARGE_EPS_LINF, ball_noise, format_radius, large_eps, with_norm
from . import blackbox
from .deployed import InputTied

SUITES = ("quick", "standard")
LARGE_EPS = LARGE_EPS_LINF  # the L-inf radius of the eps_monotone check (:func:`large_eps`)
CHECK_FINAL_LOGITS = "check:pgd20[final-logits]"
CHECK_ADAPTIVE = "check:pgd20[cas]"
LARGE_EPS_ROLE = "large-eps"  # the check-only PGD-20 at a radius where nothing should survive (eps_monotone)

AttackSpec = Union[str, Attack]


@dataclass
class Job:
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
    flags: List[str] = field(default_factory=list)  # doubts the attack raised itself (AutoAttack's)


# The cascade's order (per_attack=False): rows with a lower rank run first (ties: in the plan's order). Rank 0 runs on
# every example: natural, the main FGSM and PGD-20 and the noise baseline (the gradient-masking checks and the
# summary need them whole; FGSM costs one step). Then, each on the examples still robust: straight-through PGD on the
# adaptive objective, APGD (joint DLR) and routing-consistent APGD-T, CW on the joint objective, other rows with the
# deployed routing (PGD-100, custom attacks), each auxiliary head alone, the fixed routings, AutoAttack, and the
# black-box attacks (transfer, Square).
CASCADE_RANKS = {group: rank for rank, group in enumerate(CASCADE_GROUPS)}
CASCADE_RULE = ("rows run in this order, each after the first group only on the examples that every earlier row left "
                "correct: (0) on every example: natural, the main FGSM and PGD-20, uniform noise; then (1) straight-"
                "through PGD, (2) APGD on the joint DLR and routing-consistent APGD-T, (3) CW-20 on the joint "
                "objective, (4) other rows with the deployed routing (PGD-100, custom attacks), (5) each auxiliary head "
                "alone, (6) fixed routings, (7) AutoAttack, (8) black-box attacks; ties in the suite's order")
APGD_STEPS = 100  # AutoAttack's own budget for APGD and APGD-T
APGD_TARGETS = 3  # top-k targets of the targeted row (AutoAttack's standard version uses 9 with 1 restart each)
APGD_ROWS = ("apgd-dlr", "apgd-t")
PGD_FAMILY = ("pgd", "fgsm", "cw")


def cascade_rank(attack: Attack, role: Optional[str]) -> int:
    group = get_attack_kind(attack.kind).cascade  # a kind beyond the PGD family says where it runs
    if group is not None:
        return CASCADE_RANKS[group]
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


def objective_for(cas: bool) -> str:
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


def family_of(base: str, name: str, attack: Optional[Attack], cas: bool) -> str:
    """The family a row is aggregated under in the summary: its base name, unless it is a gradient attack on a CAS
    model that sees only the final logits (then its own, tagged, name)."""
    if not cas or attack is None or attack.sees_aux:
        return base.split("[")[0]
    return name


def suite_attacks(suite: str, eps: float = 8 / 255, cas: bool = True, num_modules: int = 1,
                  routed: bool = True) -> Dict[str, Attack]:
    """The gradient attacks of a suite at radius ``eps``, by row name (the defense-specific ones included for models
    with defense modules: ``num_modules`` auxiliary heads; the fixed-routing rows only when a module is ``routed``).
    Each :class:`Attack` carries its objective and crafting routing."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES} or a list of attacks, got {suite!r}")
    obj = objective_for(cas)
    rows = [("fgsm", Attack(name="fgsm", kind="fgsm", eps=eps, alpha=eps, objective=obj, random_start=True)),
            ("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective=obj))]
    if cas:
        rows.append(("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective=obj, routing="straight-through")))
    rows.append(("cw20", Attack(name="cw20", kind="cw", eps=eps, steps=20, kappa=50.0, objective=obj)))
    if suite == "standard":
        rows.append(("pgd100", Attack(name="pgd100", eps=eps, steps=100, objective=obj)))
        if cas:
            rows += [(base, a) for base, a in adaptive_rows(num_modules, eps, routed)]
    out = {}
    for base, attack in rows:
        name = row_name(base, attack, cas)
        out[name] = dataclasses.replace(attack, name=name)
    return out


def adaptive_rows(num_modules: int, eps: float, routed: bool = True) -> List[Tuple[str, Attack]]:
    """The defense-specific rows of the standard suite (also what ``"adaptive"`` adds to a custom list): each head
    alone (PGD on its CE, CW on its margin) and, for routed defenses, PGD-20 with the routing fixed to the clean
    prediction / soft mixture."""
    rows = [("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective=f"aux:{i}")) for i in range(num_modules)]
    rows += [("cw20", Attack(name="cw20", kind="cw", eps=eps, steps=20, kappa=50.0, objective=f"cw_aux:{i}"))
             for i in range(num_modules)]
    rows += [("pgd20", Attack(name="pgd20", eps=eps, steps=20, objective="cas", routing=r))
             for r in ("clean-predicted", "clean-soft") if routed]
    return rows


def is_main_row(attack: Attack, cas: bool) -> bool:
    return (attack.kind in PGD_FAMILY and attack.routing is None
            and attack.objective in (("cas", "cw_cas") if cas else ("ce", "cw")))


def resolve_attack(spec: AttackSpec, eps: float, cas: bool, num_modules: int = 1) -> Tuple[str, Attack]:
    """A list entry as ``(base name, Attack)`` at the evaluation's eps: an Attack (its eps must not exceed it), a
    suite name, or an :data:`casify.attacks.PRESETS` name (eps set to ``eps``, alpha scaled with it)."""
    if isinstance(spec, Attack):
        if not get_attack_kind(spec.kind).stays_in_ball:
            raise ValueError(f"attack {spec.name!r} (kind {spec.kind!r}) leaves the eps-ball by design: it is a "
                             "training attack, and an accuracy under it would be measured outside the threat model; "
                             "evaluate with kind 'pgd', 'fgsm' or 'apgd'")
        if spec.eps > eps + 1e-9:
            raise ValueError(f"attack {spec.name!r} has eps {spec.eps:.5f} > the evaluation's eps {eps:.5f}: the worst "
                             "case would mix threat models; evaluate it with eps= its own radius")
        return spec.name, spec
    standard = {name.split("[")[0]: a for name, a in suite_attacks("standard", eps, cas, num_modules).items()
                if is_main_row(a, cas)}
    if spec in standard:
        return spec, standard[spec]
    if spec in PRESETS:
        preset = PRESETS[spec]
        return spec, dataclasses.replace(preset, eps=eps, alpha=preset.alpha * eps / preset.eps)
    raise ValueError(f"unknown attack {spec!r}; choose an Attack, one of {sorted(standard)}, 'adaptive', "
                     f"or a preset from {sorted(PRESETS)}")


def attack_job(name: str, kind: str, attack: Attack, target: nn.Module, in_worst_case: bool = True,
               notes: Optional[str] = None, family: str = "", role: Optional[str] = None,
               defended: bool = False) -> Job:
    """The row ``name`` (of row kind ``kind``: white-box, adaptive, black-box, ...) that runs ``attack`` on ``target``
    through its attack kind, which also gives the row's notes (unless ``notes``), settings and objective
    (``defended``: the evaluated model has defense modules)."""
    attack = dataclasses.replace(attack, name=name)
    attack_kind = get_attack_kind(attack.kind)

    def craft(x, y, batch, generator):
        return attack(target, x, y, generator=generator, return_info=True)

    return Job(name, kind, attack.eps, attack_kind.settings(attack, defended),
               notes or attack_kind.describe(attack, defended), craft, in_worst_case, family=family or name,
               objective=attack_kind.row_objective(attack, defended), role=role,
               iterative=attack_kind.iterative(attack), per_example_seed=attack_kind.per_example_seed,
               rank=cascade_rank(attack, role))


def noise_job(eps: float, norm: str = "linf") -> Job:
    def craft(x, y, batch, generator):
        return ball_noise(x, eps, norm, generator)

    return Job("noise", "noise", eps, {"distribution": f"uniform in the {norm} ball", "norm": norm,
                                       "eps_str": format_radius(eps, norm)},
               "uniform random noise of the same size (baseline for the checks)", craft, family="noise",
               per_example_seed=True, rank=CASCADE_RANKS["every example"])


def apgd_job(base: str, target: nn.Module, eps: float, cas: bool, norm: str = "linf") -> Job:
    """``"apgd-dlr"``: AutoAttack's APGD on the joint DLR (final logits + beta * mean over the heads; the final
    logits' DLR on a plain model); ``"apgd-t"``: APGD-T on the targeted DLR of the final and auxiliary logits for the
    top-:data:`APGD_TARGETS` targets, with every CAS module routed to the target while crafting (see
    :mod:`casify.attacks.autopgd`). Named ``apgd-dlr[cas]`` / ``apgd-t3[cas,target-routing]`` on a CAS model."""
    if base == "apgd-dlr":
        name = "apgd-dlr[cas]" if cas else "apgd-dlr"  # on a plain model: APGD on the final logits' DLR
        attack = Attack(name=name, kind="apgd", eps=eps, steps=APGD_STEPS, objective="dlr_cas", norm=norm)
    elif base == "apgd-t":
        name = f"apgd-t{APGD_TARGETS}[cas,target-routing]" if cas else f"apgd-t{APGD_TARGETS}"
        attack = Attack(name=name, kind="apgd-t", eps=eps, steps=APGD_STEPS, norm=norm,
                        routing="target" if cas else None, options={"targets": APGD_TARGETS})
    else:
        raise ValueError(f"unknown APGD row {base!r}; choose one of {APGD_ROWS}")
    return attack_job(name, "adaptive" if cas else "white-box", attack, target, family=base, defended=cas)


def autoattack_job(aa_class, flavour: str, target: nn.Module, eps: float, seed: int, cas: bool = False,
                   norm: str = "linf") -> Job:
    """AutoAttack (``aa_class``, from the package ``flavour``, seeded with the evaluation's ``seed``) on ``target``
    (the model with its input tied, same logits) on the batch's device, in eval mode with predicted routing,
    i.e. on the deployed logits; the explicit routing also overrides any label routing a caller left active.
    Its gradient attacks see only the final logits, so on a CAS model the row is ``autoattack[final-logits]``.
    AutoAttack flags its own doubts (zero gradients, Square beating the gradient attacks, randomness, ...) with
    ``warnings.warn``: the row keeps them (``flags``, also in its settings) for the autoattack_flags check."""
    name = "autoattack[final-logits]" if cas else "autoattack"
    attack = Attack(name=name, kind="autoattack", eps=eps, norm=norm,
                    options={"version": "standard", "seed": seed, "attack_class": aa_class, "package": flavour})
    job = attack_job(name, "autoattack", attack, target, family=name, defended=cas)
    flags: List[str] = []
    crafting = job.craft

    def craft(x, y, batch, generator):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = crafting(x, y, batch, generator)
        flags.extend(str(w.message) for w in caught if str(w.message) not in flags)
        return out

    job.craft, job.flags = craft, flags
    job.settings["flags"] = flags  # filled while it runs: in the row's settings whether or not the checks run
    return job


def square_job(queries: int, model: nn.Module, eps: float, norm: str = "linf") -> Job:
    """Square (``queries`` queries, margin loss) on the deployed ``model``, one seed per batch from the row's
    generator."""
    name = f"square{queries}"
    attack = Attack(name=name, kind="square", eps=eps, steps=int(queries), norm=norm)
    return attack_job(name, "black-box", attack, model, family=name)


@dataclass
class Plan:
    """The rows of one evaluation: ``rows`` enter the report (those with ``in_worst_case`` the worst case), ``sweep``
    the eps sweep, ``checks`` the check-only attacks; ``suite`` names the request; ``versions`` the optional
    packages a row uses."""
    rows: List[Job]
    sweep: List[Job]
    checks: List[Job]
    suite: str
    versions: Dict[str, str] = field(default_factory=dict)

    @property
    def all(self) -> List[Job]:
        return self.rows + self.sweep + self.checks


@dataclass(frozen=True)
class RowBuilder:
    """What the rows of one evaluation share: ``target``, the model they attack (input tied), the radius and ball,
    and what the model's defense modules make of a suite (``defended``: any; ``heads``: the auxiliary heads the
    attacks see; ``routed``: a module routes by class). Read once, so each part of the plan needs no other argument."""
    target: nn.Module
    eps: float
    norm: str
    defended: bool
    heads: int
    routed: bool

    @classmethod
    def of(cls, model: nn.Module, target: nn.Module, eps: float, norm: str) -> "RowBuilder":
        modules = find_defense_modules(model)
        return cls(target, eps, norm, bool(modules), attack_head_count(model),  # CAS and CIFS: one head per module
                   any(m.routed for m in modules))

    def gradient_job(self, base: str, attack: Attack, kind: Optional[str] = None) -> Job:
        """The row of a gradient attack: named, typed (white-box / adaptive unless ``kind``), given its role and
        family, in the evaluation's ball (a caller's own non-Linf white-box Attack stays as it is)."""
        if not (kind == "white-box" and attack.norm != "linf"):
            attack = with_norm(attack, self.norm)
        name = row_name(base, attack, self.defended)
        main = is_main_row(attack, self.defended)
        role = base if main and base in ("fgsm", "pgd20", "pgd100", "cw20") else None
        kind = kind or ("white-box" if main or not self.defended else "adaptive")
        return attack_job(name, kind, attack, self.target, family=family_of(base, name, attack, self.defended),
                          role=role, defended=self.defended)

    def requested(self, attacks: Union[str, Sequence[AttackSpec]]) -> Tuple[str, List[Job]]:
        """The suite's name (or ``"custom"``) and its rows, natural first: a suite's rows, or a list's entries
        (``"adaptive"`` adds the defense-specific rows on a defended model; an APGD row name its APGD row)."""
        jobs = [Job("natural", "natural", 0.0, {}, "clean inputs", lambda x, y, b, g: x, family="natural",
                    rank=CASCADE_RANKS["every example"])]
        if isinstance(attacks, str):
            for name, attack in suite_attacks(attacks, self.eps, self.defended, self.heads, self.routed).items():
                jobs.append(self.gradient_job(name.split("[")[0], attack))
            if attacks == "standard":
                jobs.extend(apgd_job(base, self.target, self.eps, self.defended, self.norm) for base in APGD_ROWS)
            return attacks, jobs
        adaptive = False
        for spec in attacks:
            if isinstance(spec, str) and spec == "adaptive":
                adaptive = True
                continue
            if isinstance(spec, str) and spec in APGD_ROWS:
                jobs.append(apgd_job(spec, self.target, self.eps, self.defended, self.norm))
                continue
            base, attack = resolve_attack(spec, self.eps, self.defended, self.heads)
            jobs.append(self.gradient_job(base, attack, kind=get_attack_kind(attack.kind).row_kind
                                          if isinstance(spec, Attack) else None))
        if adaptive and self.defended:
            jobs.extend(self.gradient_job(base, attack) for base, attack in adaptive_rows(self.heads, self.eps,
                                                                                          self.routed))
        return "custom", jobs

    def sweep(self, eps_sweep: Optional[Sequence[float]]) -> List[Job]:
        """PGD-20 at each radius of the sweep, smallest first; outside the worst case."""
        jobs = []
        for e in sorted(float(v) for v in (eps_sweep or [])):
            attack = Attack(name=f"pgd20@{format_radius(e, self.norm)}", eps=e, steps=20,
                            objective=objective_for(self.defended), norm=self.norm)
            jobs.append(attack_job(attack.name, "sweep", attack, self.target, in_worst_case=False))
        return jobs

    def checks(self, big: float, has_pgd20: bool) -> List[Job]:
        """The checks' own attacks, never rows of the report: a PGD-20 at the large radius ``big`` (eps_monotone)
        and, on a defended model, the references of final_logits_vs_adaptive (an adaptive PGD-20 only when the rows
        have none)."""
        attack = Attack(name=f"pgd20@{format_radius(big, self.norm)}", eps=big, steps=20,
                        objective=objective_for(self.defended), norm=self.norm)
        jobs = [attack_job(attack.name, "check", attack, self.target, in_worst_case=False,
                           notes="large-eps PGD-20 for the eps_monotone check", role=LARGE_EPS_ROLE)]
        if self.defended:
            jobs.append(attack_job(
                CHECK_FINAL_LOGITS, "check", Attack(eps=self.eps, steps=20, objective="ce", norm=self.norm),
                self.target, in_worst_case=False,
                notes="check only: PGD-20 on the final logits alone (CE), predicted routing"))
            if not has_pgd20:
                jobs.append(attack_job(
                    CHECK_ADAPTIVE, "check", Attack(eps=self.eps, steps=20, objective="cas", norm=self.norm),
                    self.target, in_worst_case=False,
                    notes="check only: adaptive PGD-20 (CE + beta * mean auxiliary CE), as the report has none"))
        return jobs


def transfer_job(surrogate: nn.Module, eps: float, norm: str = "linf") -> Job:
    """PGD-20 crafted on ``surrogate`` (on its own objective) and scored on the model: a black-box row."""
    objective = objective_for(bool(find_defense_modules(surrogate)))
    attack = Attack(name="transfer-pgd20", eps=eps, steps=20, objective=objective, norm=norm)
    job = attack_job("transfer-pgd20", "black-box", attack, InputTied(surrogate),
                     notes=f"PGD-20 crafted on the surrogate {type(surrogate).__name__} (objective {objective}, best "
                           "iterate on the surrogate), scored on the model")
    job.iterative = False  # its iterates are scored on the surrogate: no last-iterate evidence
    job.rank = CASCADE_RANKS["black-box"]
    return job


def seeded(plan: Plan, seed: int) -> Plan:
    """Refuse repeated row names; give row ``i`` (in ``plan.all``'s order) the seed ``seed + 1009 * i``."""
    names = [job.name for job in plan.all]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"attack names must be unique in one evaluation; repeated: {duplicates}")
    for i, job in enumerate(plan.all):
        job.seed = seed + 1009 * i
    return plan


def plan_rows(model: nn.Module, target: nn.Module, attacks: Union[str, Sequence[AttackSpec]], *, eps: float,
              seed: int, autoattack: bool = False, transfer_from: Optional[nn.Module] = None,
              square_queries: int = 0, eps_sweep: Optional[Sequence[float]] = None, checks: bool = True,
              norm: str = "linf", input_numel: int = 0) -> Plan:
    """The rows for :func:`casify.evaluate.evaluate`'s arguments (see there); ``target`` is ``model`` with its input
    tied (:class:`InputTied`). Row ``i`` gets the seed ``seed + 1009 * i``; names must be unique. ``norm``: every
    suite row, AutoAttack, Square and the checks' attacks in that ball (:mod:`casify.attacks.threat_model`; ``input_numel``,
    the size of one input, sets the L2 check radius). Every row runs on its batch's device."""
    rows = RowBuilder.of(model, target, eps, norm)
    suite, jobs = rows.requested(attacks)
    versions: Dict[str, str] = {}
    if autoattack:
        aa_class, aa_flavour = blackbox.load_autoattack()
        versions[aa_flavour] = blackbox.autoattack_version(aa_flavour)
        jobs.append(autoattack_job(aa_class, aa_flavour, target, eps, seed, rows.defended, norm))
    if transfer_from is not None:
        jobs.append(transfer_job(transfer_from, eps, norm))
    if square_queries > 0:
        jobs.append(square_job(square_queries, model, eps, norm))
    if checks:
        jobs.append(noise_job(eps, norm))
    # the large radius depends on the ball alone (L-inf: LARGE_EPS; L2: the size of one input), not on the model
    check_jobs = (rows.checks(large_eps(norm, input_numel), has_pgd20=any(j.role == "pgd20" for j in jobs))
                  if checks else [])
    return seeded(Plan(jobs, rows.sweep(eps_sweep), check_jobs, suite, versions), seed)
