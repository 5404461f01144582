"""Several models side by side on the same images, eps and suite (``casify compare A B [C ...]``,
:func:`compare_models`): one table (natural, each attack family, worst case), the paired per-image statistics of
every model against the first (:mod:`casify.evaluate.compare`: McNemar and its interval, pooled over seeds, the seed
rule), and their robustness curves overlaid.

Numbers are compared only when they measure the same thing: reports made on different images (their data SHA-256,
:mod:`casify.evaluate.examples`), at a different eps or norm, or with a different suite are refused with what
differs. A model folder is evaluated first (every model with the same arguments); a report folder is read as saved.
An argument may name several runs of one model (training seeds): ``casify compare a_s0,a_s1,a_s2 b_s0,b_s1,b_s2``
pairs seed i with seed i, pools the per-seed McNemar tests and, with 3 seeds or more, applies the seed rule.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from torch import nn

from .compare import SEED_RULE, paired, pooled, seed_comparison, welch
from .report import REPORT_JSON, EvalReport, load_report

Source = Union[str, os.PathLike, EvalReport]
COMPARE_JSON, COMPARE_MD, CURVES_FILE = "compare_report.json", "compare_report.md", "robustness_curves.png"
SIGNIFICANCE = ("paired on the same images: McNemar's z = (only A right - only B right) / sqrt(discordant), exact "
                "two-sided p, Wald 95 % interval of the per-image difference; 'significant' when |z| > 2 and the "
                "interval excludes 0")


class IncomparableReports(ValueError):
    """Reports that do not measure the same thing (images, eps, norm or suite); the message says what differs."""


@dataclass
class ModelComparison:
    """``labels``: one per arm (the first is the reference); ``table``: per arm, natural / each family /
    worst_case accuracy (mean over the arm's runs); ``pairs``: per arm after the first and metric, the paired
    comparison against the first arm (``per_seed``, ``pooled``, and with 3 runs or more ``seed_rule`` and
    ``welch``); ``curves``: per arm, eps -> worst-case accuracy; ``statement``: the significance sentences."""
    labels: List[str]
    runs: List[List[str]]
    setting: dict
    table: Dict[str, Dict[str, Optional[float]]]
    metrics: List[str]
    pairs: List[dict]
    curves: Dict[str, Dict[str, float]]
    statement: List[str]
    figures: Dict[str, str] = field(default_factory=dict)
    reports: List[List[EvalReport]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("reports")
        d["significance"] = SIGNIFICANCE
        return d

    def to_markdown(self) -> str:
        s = self.setting
        lines = ["# Models side by side", "",
                 f"- images: {s['n']} of {s['dataset']} (SHA-256 {s['data_sha256'][:16]}...), the same for every model",
                 f"- threat model: {s['norm']}, eps = {s['eps_str']}; suite {s['suite']}",
                 f"- significance: {SIGNIFICANCE}", "",
                 "| model | runs | " + " | ".join(f"{m} %" for m in self.metrics) + " |",
                 "|---|---|" + "---|" * len(self.metrics)]
        for label, runs in zip(self.labels, self.runs):
            row = self.table[label]
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(
                "" if row.get(m) is None else f"{100 * row[m]:.2f}" for m in self.metrics) + " |")
        if self.pairs:
            lines += ["", f"## Against {self.labels[0]} (paired, same images)", "",
                      "| model | metric | difference (points) [95 % CI] | McNemar z | p | only it right | only "
                      f"{self.labels[0]} right |", "|---|---|---|---|---|---|---|"]
            for p in self.pairs:
                c = p["pooled"]
                lines.append(f"| {p['model']} | {p['metric']} | {100 * c['diff']:+.2f} [{100 * c['ci95'][0]:+.2f}, "
                             f"{100 * c['ci95'][1]:+.2f}] | {c['z']:+.2f} | {c['p']:.3g} | {c['a_only']} | "
                             f"{c['b_only']} |")
        lines += ["", "## What it says", ""] + [f"- {t}" for t in self.statement]
        if self.figures:
            lines += ["", "## Figures", ""] + [f"![robustness curves overlaid]({name})"
                                               for name in self.figures.values()]
        return "\n".join(lines) + "\n"

    def save(self, directory: Union[str, os.PathLike], figures: bool = True) -> Path:
        """``compare_report.json``, ``compare_report.md`` and the overlaid curves (``robustness_curves.png``)."""
        from ..io.serialization import atomic_write
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if figures:
            from .figures import plot_overlaid_curves
            plot_overlaid_curves([runs[0] for runs in self.reports], self.labels, out / CURVES_FILE)
            self.figures = {"robustness_curves": CURVES_FILE}
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(out / COMPARE_JSON, lambda tmp: Path(tmp).write_text(text))
        md = self.to_markdown()
        atomic_write(out / COMPARE_MD, lambda tmp: Path(tmp).write_text(md))
        return out


def is_report(source: Source) -> bool:
    """Is ``source`` a saved report (a ``.json`` file, or a folder holding ``eval_report.json``), not a model?"""
    if isinstance(source, EvalReport):
        return True
    path = Path(source)
    return (path.is_file() and path.suffix == ".json") or (path.is_dir() and (path / REPORT_JSON).is_file())


def resolve(source: Source, evaluate_kwargs: dict,
            load_model: Optional[Callable[[str], nn.Module]] = None) -> EvalReport:
    """A report from a report folder / JSON file / EvalReport, or by evaluating a model: a folder or Hub id
    (:func:`casify.from_pretrained`), or whatever ``load_model`` loads (``casify compare`` passes the loader of
    ``casify eval``, so weights files and ``--arch`` work alike)."""
    if isinstance(source, EvalReport):
        return source
    path = Path(source)
    if is_report(source):
        return load_report(path)
    if "dataset" not in evaluate_kwargs or evaluate_kwargs["dataset"] is None:
        raise ValueError(f"{source} is not a report ({REPORT_JSON} or its folder); to evaluate it as a model, give "
                         "the data (casify compare --data ..., compare_models(..., dataset=...))")
    from .api import evaluate
    kwargs = dict(evaluate_kwargs)
    dataset = kwargs.pop("dataset")
    model = load_model(os.fspath(source)) if load_model is not None else os.fspath(source)
    report = evaluate(model, dataset, **kwargs)
    report.model["source"] = os.fspath(source)
    return report


def check_comparable(reports: Sequence[EvalReport], labels: Sequence[str]) -> None:
    """Refuse reports that were not made on the same images, eps, norm and suite, naming what differs and in which
    report; and reports without per-example results (made before casify kept them)."""
    first, name0 = reports[0], labels[0]
    for report, name in zip(reports, labels):
        if not report.data.get("sha256") or not report.per_example.get("worst_case"):
            raise IncomparableReports(f"{name}: the report has no per-example results or data fingerprint (made by "
                                      "an older casify); rerun casify eval on it")
    for report, name in zip(reports[1:], labels[1:]):
        differs = []
        if report.data["sha256"] != first.data["sha256"]:
            differs.append(f"images: {name} was evaluated on {report.n_examples} images with data SHA-256 "
                           f"{report.data['sha256'][:12]}..., {name0} on {first.n_examples} with "
                           f"{first.data['sha256'][:12]}... ({report.dataset!r} vs {first.dataset!r})")
        if report.norm != first.norm:
            differs.append(f"norm: {name} {report.norm} vs {name0} {first.norm}")
        if abs(report.eps - first.eps) > 1e-12:
            differs.append(f"eps: {name} {report.eps_str} vs {name0} {first.eps_str}")
        if report.suite != first.suite:
            differs.append(f"suite: {name} {report.suite!r} vs {name0} {first.suite!r}")
        if differs:
            raise IncomparableReports("cannot compare: the reports differ in " + "; ".join(differs)
                                      + ". Evaluate every model on the same images, eps and suite.")


def _label(report: EvalReport, source: Source, i: int) -> str:
    if not isinstance(source, EvalReport):
        return Path(os.fspath(source)).name or f"model {i}"
    return Path(str(report.model.get("source") or report.model.get("architecture") or report.model.get("class")
                    or f"model {i}")).name


def _flags(report: EvalReport, metric: str) -> Optional[List[bool]]:
    if metric == "natural":
        return [bool(f) for f in report.per_example["natural"]]
    if metric == "worst_case":
        return [bool(f) for f in report.per_example["worst_case"]]
    return report.per_example_families.get(metric)


def _accuracy(report: EvalReport, metric: str) -> Optional[float]:
    if metric == "natural":
        return report.natural_accuracy
    if metric == "worst_case":
        return report.worst_case["accuracy"]
    family = report.families.get(metric)
    return family["accuracy"] if family else None


def compare_models(sources: Sequence[Union[Source, Sequence[Source]]], *, labels: Optional[Sequence[str]] = None,
                   out: Optional[Union[str, os.PathLike]] = None,
                   load_model: Optional[Callable[[str], nn.Module]] = None, **evaluate_kwargs) -> ModelComparison:
    """Compare models (or their saved reports) on the same images, eps and suite, each against the first.

    Args:
        sources: per model, a report folder (``casify eval --out``), an ``eval_report.json``, an
            :class:`EvalReport`, or a saved model folder / Hub id (evaluated with ``evaluate_kwargs``:
            ``dataset=`` is then required, and ``eps``, ``attacks``, ``norm``, ``max_examples``, ``eps_sweep``, ...
            are passed to :func:`casify.evaluate.evaluate`); or a list of those: several runs (training seeds) of
            one model, paired run by run with the other models' runs.
        labels: a name per model (default: the folder names).
        load_model: how a model source (not a report) becomes a model; default :func:`casify.from_pretrained`.
        out: also write ``compare_report.json``, ``compare_report.md`` and ``robustness_curves.png`` there.

    Raises :class:`IncomparableReports` when the reports were made on different images, eps, norm or suite.
    """
    if len(sources) < 2:
        raise ValueError(f"compare needs two models or more, got {len(sources)}")
    arms = [list(s) if isinstance(s, (list, tuple)) else [s] for s in sources]
    if len({len(a) for a in arms}) != 1:
        raise ValueError(f"every model needs the same number of runs (seeds) to pair them: {[len(a) for a in arms]}")
    reports = [[resolve(s, evaluate_kwargs, load_model) for s in arm] for arm in arms]
    names = list(labels) if labels else [_label(arm_reports[0], arm[0], i)
                                         for i, (arm_reports, arm) in enumerate(zip(reports, arms))]
    if len(names) != len(arms):
        raise ValueError(f"{len(names)} labels for {len(arms)} models")
    names = [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
    flat = [r for arm in reports for r in arm]
    flat_names = [f"{n}" + (f" run {k}" if len(arm) > 1 else "") for n, arm in zip(names, reports)
                  for k in range(len(arm))]
    check_comparable(flat, flat_names)
    first = flat[0]
    families = []
    for r in flat:
        families += [f for f in r.families if f not in families and f != "natural"]
    metrics = ["natural"] + families + ["worst_case"]
    table = {}
    for name, arm in zip(names, reports):
        row = {}
        for m in metrics:
            values = [_accuracy(r, m) for r in arm]
            row[m] = None if any(v is None for v in values) else sum(values) / len(values)
        table[name] = row
    pairs, statement = [], []
    for name, arm in zip(names[1:], reports[1:]):
        for m in metrics:
            per_seed = []
            for ref, run in zip(reports[0], arm):
                a, b = _flags(run, m), _flags(ref, m)
                if a is None or b is None:
                    break
                per_seed.append(paired(a, b))
            if len(per_seed) != len(arm):
                continue
            entry = {"model": name, "reference": names[0], "metric": m,
                     "per_seed": [c.to_dict() for c in per_seed], "pooled": pooled(per_seed).to_dict()}
            if len(arm) > 1:
                entry["welch"] = welch([_accuracy(r, m) for r in arm],
                                       [_accuracy(r, m) for r in reports[0]]).to_dict()
            if len(arm) >= 3:
                entry["seed_rule"] = seed_comparison(per_seed, list(range(len(arm)))).to_dict()
            pairs.append(entry)
            if m in ("natural", "worst_case"):
                statement.append(_sentence(entry))
    curves = {name: {p["eps_str"]: p["worst_case"] for p in arm[0].robustness_curve}
              for name, arm in zip(names, reports)}
    setting = {"n": first.n_examples, "dataset": first.dataset, "data_sha256": first.data["sha256"],
               "norm": first.norm, "eps": first.eps, "eps_str": first.eps_str, "suite": first.suite}
    result = ModelComparison(names, [[_source_name(s) for s in arm] for arm in arms], setting, table, metrics, pairs,
                             curves, statement, reports=reports)
    if len(arms[0]) > 1 and len(arms[0]) < 3:
        result.statement.append(f"{len(arms[0])} runs per model: the seed rule needs 3 or more ({SEED_RULE[:60]}...)")
    if out is not None:
        result.save(out)
    return result


def _source_name(source: Source) -> str:
    return "EvalReport" if isinstance(source, EvalReport) else os.fspath(source)


def _sentence(entry: dict) -> str:
    c = entry["pooled"]
    metric = entry["metric"].replace("_", " ")
    significant = abs(c["z"]) > 2 and (c["ci95"][0] > 0 or c["ci95"][1] < 0)
    word = ("significantly " + ("higher" if c["diff"] > 0 else "lower")) if significant else "no significant difference"
    text = (f"{entry['model']} vs {entry['reference']}, {metric}: {100 * c['diff']:+.2f} points "
            f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}] on {c['n']} paired images, McNemar z "
            f"{c['z']:+.2f}, p {c['p']:.3g}: {word}")
    if "seed_rule" in entry:
        text += f"; over {len(entry['per_seed'])} seeds the seed rule says: {entry['seed_rule']['verdict']}"
    return text


__all__ = ["COMPARE_JSON", "COMPARE_MD", "CURVES_FILE", "IncomparableReports", "ModelComparison", "SIGNIFICANCE",
           "check_comparable", "compare_models", "is_report", "resolve"]
