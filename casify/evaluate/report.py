"""What an evaluation measured and how: one row per attack (:class:`AttackResult`), one entry per gradient-masking
check (:class:`Check`), and the report that holds them, with its summary, JSON and markdown (:class:`EvalReport`).

Pure data: nothing here runs a model, so the model card, the CLI and the benchmarks read reports without importing
the attacks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from ..io.eval_summary import EvalSummary, at_chance
from ..io.serialization import atomic_write
from . import examples

__all__ = ["AttackResult", "Check", "EvalReport", "EvalSummary", "REPORT_JSON", "REPORT_MD", "load_report"]

REPORT_JSON, REPORT_MD = "eval_report.json", "eval_report.md"


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
    own: ``accuracy``, ``n_correct`` and ``last_iterate_accuracy`` are None. ``nonfinite``: the examples on which the
    deployed model's logits held a NaN or inf under this row; they count as wrong, never as class 0."""
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
    nonfinite: int = 0  # examples whose logits held a NaN or inf under this row (scored wrong)


@dataclass
class Check:
    """One gradient-masking check: ``passed`` is True, False (masking suspected) or None (skipped, and why)."""
    name: str
    passed: Optional[bool]
    description: str
    evidence: dict = field(default_factory=dict)


@dataclass
class EvalReport:
    """Everything an evaluation measured and how. ``per_example`` (row name and ``worst_case`` -> correct flags, in
    the order of ``data["indices"]``; None where a cascade skipped the example) and ``per_example_families``
    (family -> flags) are written by :meth:`save` in a compact form (:mod:`casify.evaluate.examples`), so reports
    can be compared image by image later; ``data`` identifies the images (``sha256``, ``indices``, ``n``).
    ``robustness_curve``: per eps (this evaluation's, then the eps sweep's), natural, worst case and each family,
    with the per-example worst case; ``figures``: figure kind -> file name, filled by :meth:`save`.
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
    per_example_families: Dict[str, List[bool]] = field(default_factory=dict, repr=False)
    data: dict = field(default_factory=dict)
    robustness_curve: List[dict] = field(default_factory=list)
    figures: Dict[str, str] = field(default_factory=dict)
    routing_echo: Optional[dict] = None  # RoutingEcho.to_dict() for a routed defense (casify.evaluate.echo)
    split: Optional[str] = None  # the dataset's split (test, val, train) when known; ``dataset`` is its name
    # attack (row, sweep or check-only) -> examples whose logits held a NaN or inf (scored wrong); only those with any
    nonfinite_logits: Dict[str, int] = field(default_factory=dict)
    num_classes: Optional[int] = None  # the model's class count (chance is 1 / num_classes)

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
        return self.summary_record().to_dict()

    def summary_record(self) -> EvalSummary:
        """:meth:`summary` as a typed record (:class:`casify.io.eval_summary.EvalSummary`); ``summary()`` is its
        ``to_dict()``."""
        accuracy = {name: f["accuracy"] for name, f in self.families.items()}
        if not accuracy:  # a report built by hand: the rows themselves
            accuracy = {r.name: r.accuracy for r in self.attacks
                        if r.in_worst_case and r.kind != "noise" and r.accuracy is not None}
        accuracy["worst_case"] = self.worst_case["accuracy"]
        rows = {r.name: r.accuracy for r in self.attacks
                if r.in_worst_case and r.kind != "noise" and r.accuracy is not None}
        failed = None if self.gradient_masking_suspected is None else [c.name for c in self.checks if c.passed is False]
        return EvalSummary(eps=self.eps, eps_str=self.eps_str, norm=self.norm, n=self.n_examples, suite=self.suite,
                           mode="per-attack" if self.per_attack else "cascade", accuracy=accuracy, rows=rows,
                           families={name: list(f["rows"]) for name, f in self.families.items()},
                           upper_bounds=[name for name, f in self.families.items() if f.get("upper_bound")],
                           cascade=[dict(c) for c in self.cascade],
                           gradient_masking_suspected=self.gradient_masking_suspected, failed_checks=failed,
                           routing_echo_forced=None if not self.routing_echo else self.routing_echo["forced_all"],
                           nonfinite_logits=dict(self.nonfinite_logits), num_classes=self.num_classes)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; the report has {[c.name for c in self.checks]}")

    def fooled_by(self, position: int) -> List[str]:
        """The worst-case rows that fooled (or, for ``natural``, misclassified) the example at ``position`` (in the
        order of ``data["indices"]``), in the order of the report's rows."""
        names = [r.name for r in self.attacks if r.in_worst_case and r.name in self.per_example]
        return examples.fooled_by({name: self.per_example[name] for name in names}, position)

    def to_dict(self, per_example: bool = False) -> dict:
        """The report as JSON-ready data; ``per_example=True`` adds the per-example block (what :meth:`save`
        writes): the encoding, each row's and family's flags and the worst case, one character per example."""
        d = dataclasses.asdict(self)
        d.pop("per_example")
        d.pop("per_example_families")
        if per_example:
            d["per_example"] = {
                "encoding": examples.ENCODING,
                "rows": {name: examples.encode(f) for name, f in self.per_example.items() if name != "worst_case"},
                "families": {name: examples.encode(f) for name, f in self.per_example_families.items()},
                "worst_case": examples.encode(self.per_example.get("worst_case", [])),
            }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        """A report read back from :meth:`to_dict` (or a saved ``eval_report.json``); the per-example block, when
        present, is decoded into ``per_example`` / ``per_example_families``."""
        d = dict(d)
        block = d.pop("per_example", None) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["attacks"] = [AttackResult(**r) for r in d.get("attacks", [])]
        kwargs["eps_sweep"] = [AttackResult(**r) for r in d.get("eps_sweep", [])]
        kwargs["checks"] = [Check(**c) for c in d.get("checks", [])]
        per_example = {name: examples.decode(text) for name, text in (block.get("rows") or {}).items()}
        if "worst_case" in block:
            per_example["worst_case"] = examples.decode(block["worst_case"])
        kwargs["per_example"] = per_example
        kwargs["per_example_families"] = {name: examples.decode(text)
                                          for name, text in (block.get("families") or {}).items()}
        return cls(**kwargs)

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None, per_example: bool = False) -> str:
        text = json.dumps(self.to_dict(per_example), indent=2) + "\n"
        if path is not None:
            atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
        return text

    @property
    def at_chance(self) -> Optional[bool]:
        """Is the natural accuracy no better than guessing among the model's classes? None when the class count
        is unknown (:func:`casify.io.eval_summary.at_chance`)."""
        return at_chance(self.natural_accuracy, self.num_classes, self.n_examples)

    def to_markdown(self, json_beside: bool = False) -> str:
        """The report as markdown; ``json_beside``: it is written next to ``eval_report.json`` (:meth:`save`), so it
        may point there for the per-example results."""
        model = self.model.get("architecture") or self.model.get("class", "model")
        if self.model.get("cas_layers"):
            model += f" with CAS at {', '.join(self.model['cas_layers'])}"
        lines = [
            "# Robustness evaluation", "",
            f"- model: {model}" + (f" ({self.model['source']})" if self.model.get("source") else ""),
            f"- data: {self.dataset}" + (f" ({self.split})" if self.split else "") + f", {self.n_examples} examples",
            f"- threat model: {'L-inf' if self.norm == 'linf' else 'L2 (Euclidean radius)'}, eps = {self.eps_str} "
            f"({self.eps:.5f}) in [0, 1] pixel units",
            *([f"- images: SHA-256 {self.data['sha256'][:16]}... of the {self.n_examples} images and labels"
               + (" (per-example results in eval_report.json)" if json_beside else "")]
              if self.data.get("sha256") else []),
            *([f"- **natural accuracy {100 * self.natural_accuracy:.2f} % is at chance** for {self.num_classes} "
               f"classes ({100 / self.num_classes:.1f} %): this model has not learned the task, and its robust "
               "accuracy means nothing"] if self.at_chance else []),
            *([f"- **non-finite logits**: the model output NaN or inf on "
               + ", ".join(f"{count} examples under {name}" for name, count in self.nonfinite_logits.items())
               + "; those are scored wrong and gradient masking is flagged"] if self.nonfinite_logits else []),
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
        if len(self.robustness_curve) > 1:
            families = [f for f in self.robustness_curve[0]["families"] if f != "natural"]
            lines += ["", "## Robustness curve (eps sweep: the same rows at each eps, worst case per example)", "",
                      "| eps | natural % | worst case % | " + " | ".join(f"{f} %" for f in families) + " |",
                      "|---" * (3 + len(families)) + "|"]
            for p in self.robustness_curve:
                fam = [p["families"].get(f) for f in families]
                lines.append(f"| {p['eps_str']} | {100 * p['natural']:.2f} | {100 * p['worst_case']:.2f} | "
                             + " | ".join("" if v is None else f"{100 * v:.2f}" for v in fam) + " |")
        if self.figures:
            lines += ["", "## Figures", ""]
            lines += [f"![{FIGURE_TITLES.get(kind, kind)}]({name})" for kind, name in self.figures.items()]
        if self.routing_echo:
            e = self.routing_echo
            lines += ["", "## Routing echo", "",
                      "Does the output only repeat an auxiliary head? Forced routing: every module routed to a random "
                      "wrong class; an echo model outputs that class (chance is "
                      f"{100 * e['chance']:.0f} %). Head agreement: final prediction == the head's argmax "
                      f"({e['adversarial']}).", "",
                      f"- forced routing followed: **{100 * e['forced_all']:.1f} %** of {e['n']} examples"
                      + (" (an echo)" if e.get("echoes") else ""), ""]
            lines += ["| module | agreement, clean | agreement, adversarial | forced (this module alone) |",
                      "|---|---|---|---|"]
            for name, clean, adv in zip(e["modules"], e["head_agreement_clean"], e["head_agreement_adversarial"]):
                lines.append(f"| {name} | {100 * clean:.1f} | {100 * adv:.1f} | "
                             f"{100 * e['forced_each'].get(name, float('nan')):.1f} |")
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

    def save(self, directory: Union[str, os.PathLike], figures: bool = True) -> Path:
        """Write ``eval_report.json`` (with the per-example results), the figures (``figures=True``: the robustness
        curve and the per-attack chart, :mod:`casify.evaluate.figures`) and ``eval_report.md``, which shows them,
        into ``directory`` (created if needed); each file is written atomically."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if figures:
            from .figures import write_report_figures
            self.figures = write_report_figures(self, out)
        self.to_json(out / REPORT_JSON, per_example=True)
        text = self.to_markdown(json_beside=True)
        atomic_write(out / REPORT_MD, lambda tmp: Path(tmp).write_text(text))
        return out


FIGURE_TITLES = {"robustness_curve": "robustness curve: accuracy against eps",
                 "attacks": "per-attack chart: each row's accuracy and the examples it newly fooled"}


def load_report(path: Union[str, os.PathLike]) -> EvalReport:
    """An :class:`EvalReport` from a report folder (its ``eval_report.json``) or the JSON file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation report at {path} (casify eval --out DIR writes {REPORT_JSON})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not an evaluation report ({REPORT_JSON} is JSON; this file is not: "
                         f"{type(e).__name__}); a model's weights or folder is evaluated instead when data are "
                         "given") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an evaluation report: it holds a JSON {type(data).__name__}, not an object")
    return EvalReport.from_dict(data)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
