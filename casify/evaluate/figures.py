"""Figures that answer "how robust, against what, at which eps" at a glance: the robustness curve (accuracy against
eps: the clean point at eps 0, then the worst case and each attack family), the per-attack chart (each row's accuracy
and how many examples it newly fooled) and robustness curves of several models overlaid (``casify compare``).

Every figure says its threat model, the number of images and the unit of eps in its title and axes; accuracy axes
run from 0 to 100 %, count axes have whole-number ticks, legends sit outside the plotted data, and a dotted line marks
chance (1 / classes, when the report knows the model's class count), so a model at chance never looks flat and
"robust". Drawn with
matplotlib's Agg canvas without pyplot (no global backend is switched in the caller's process) and written
atomically: a reader never finds a half-written PNG under its final name. Nothing here imports the report class: a
report is read through its fields, so a report loaded from JSON draws the same figures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..io.serialization import atomic_write
from ..attacks.threat_model import axis_label, axis_value

CURVE_FILE = "robustness_curve.png"
ATTACKS_FILE = "attacks.png"
DPI = 120


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    """PNG via a temporary sibling renamed onto ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path


def threat_line(report) -> str:
    """``L-inf, eps 8/255, 846 images, standard suite (cascade)``: what every figure's title states."""
    norm = "L-inf" if report.norm == "linf" else "L2"
    mode = "per-attack" if report.per_attack else "cascade"
    return f"{norm}, eps {report.eps_str}, {report.n_examples} images, {report.suite} suite ({mode})"


def _model_name(report) -> str:
    """The base architecture (``cifar_resnet18``: never the wrapper's class), and the folder it was loaded from."""
    model = report.model or {}
    arch = model.get("architecture") or model.get("class") or "model"
    source = Path(str(model["source"])).name if model.get("source") else ""
    return f"{arch} ({source})" if source and source != arch else arch


def _data_name(report) -> str:
    """``digits, test split``: the dataset's name and, when known, its split (no nested parentheses)."""
    split = getattr(report, "split", None)
    return f"{report.dataset}, {split} split" if split else str(report.dataset)


def _chance(report) -> Optional[float]:
    """Chance accuracy in %, when the report knows the model's class count."""
    classes = getattr(report, "num_classes", None)
    return 100.0 / classes if isinstance(classes, int) and classes >= 2 else None


def _curve_xy(report, key: str) -> Tuple[List[float], List[float]]:
    """(eps on the axis, accuracy %) for ``key`` ("worst_case" or a family), starting at the clean point (eps 0)."""
    xs, ys = [0.0], [100 * report.natural_accuracy]
    for p in report.robustness_curve:
        value = p["worst_case"] if key == "worst_case" else p["families"].get(key)
        if value is not None and p["eps"] > 0:
            xs.append(axis_value(p["eps"], report.norm))
            ys.append(100 * value)
    return xs, ys


def _finish_curve(fig, ax, report, title: str, path) -> Path:
    """The axes every accuracy-vs-radius figure shares (the radius in the report's norm, accuracy in %), saved."""
    ax.set_xlabel(axis_label(report.norm))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    for line in ax.lines + ax.collections:  # points at 0 % and 100 % are drawn whole on the axis limits
        line.set_clip_on(False)
    chance = _chance(report)
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"chance ({chance:.3g} %: 1 / {report.num_classes} classes)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}\n{threat_line(report)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the curves
    return _save(fig, Path(path))


def plot_robustness_curve(report, path: Union[str, Path]) -> Path:
    """Accuracy against eps for one evaluation: natural at eps 0, the per-example worst case (bold) and each attack
    family (thin; "<=" marks a family that is an upper bound in a cascade), at this evaluation's eps and every eps of
    its sweep. With no sweep the curve has two points: eps 0 and the evaluation's eps."""
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    xs, ys = _curve_xy(report, "worst_case")
    ax.plot(xs, ys, "o-", color="black", linewidth=2.4, label="worst case (every attack)", zorder=3)
    families = [f for f in (report.robustness_curve[0]["families"] if report.robustness_curve else {})
                if f not in ("natural",)]
    upper = {f for p in report.robustness_curve for f in p.get("upper_bounds", [])}
    for i, family in enumerate(families):
        fx, fy = _curve_xy(report, family)
        if len(fx) > 1:
            ax.plot(fx, fy, "s--", linewidth=1.2, markersize=4, color=f"C{i % 10}",
                    label=("<= " if family in upper else "") + family)
    ax.scatter([0.0], [100 * report.natural_accuracy], s=70, color="tab:green", zorder=4, label="natural (eps 0)")
    for p in report.robustness_curve:
        if abs(p["eps"] - report.eps) < 1e-12:
            ax.axvline(axis_value(p["eps"], report.norm), color="grey", linewidth=0.8, linestyle=":")
    return _finish_curve(fig, ax, report, f"Robustness of {_model_name(report)} on {_data_name(report)}", path)


def plot_attacks(report, path: Union[str, Path]) -> Path:
    """Per worst-case row, in the order the rows ran: its accuracy (a row that ran only on a cascade's survivors has
    none of its own; the bar then shows the examples robust after it, hatched) and how many examples it newly fooled
    (fooled although every earlier row had left them correct). The worst case is the dashed line."""
    by_name = {r.name: r for r in report.attacks}
    entries = [c for c in report.cascade if c["row"] in by_name] or [
        {"row": r.name, "newly_fooled": r.newly_fooled or 0, "robust_after": r.robust_after or 0}
        for r in report.attacks if r.in_worst_case]
    names = [c["row"] for c in entries]
    n = max(report.n_examples, 1)
    fig = _figure(10.0, 1.2 + 0.34 * max(len(names), 2))
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(len(names)))[::-1]
    for y, c in zip(ys, entries):
        r = by_name[c["row"]]
        if r.accuracy is not None:
            value, text, style = 100 * r.accuracy, f"{100 * r.accuracy:.1f}", dict(color="tab:blue")
        else:
            value = 100 * c["robust_after"] / n
            text, style = f"{value:.1f} robust after (ran on survivors)", dict(color="white", edgecolor="tab:blue",
                                                                              hatch="//")
        left.barh(y, value, **style)
        inside = value > 80  # the label goes inside a long bar, so the axis can stop at 100 %
        left.text(value - 1 if inside else value + 1, y, text, va="center", ha="right" if inside else "left",
                  fontsize=7, color="white" if inside and r.accuracy is not None else "black")
        right.barh(y, c["newly_fooled"], color="tab:red")
        right.text(c["newly_fooled"], y, f" {c['newly_fooled']}", va="center", fontsize=7)
    left.axvline(100 * report.worst_case["accuracy"], color="black", linestyle="--", linewidth=1,
                 label=f"worst case {100 * report.worst_case['accuracy']:.1f} %")
    chance = _chance(report)
    if chance is not None:
        left.axvline(chance, color="tab:red", linestyle=":", linewidth=1.2,
                     label=f"chance {chance:.3g} % (1 / {report.num_classes} classes)")
    left.set_yticks(ys)
    left.set_yticklabels(names, fontsize=8)
    left.set_xlim(0, 100)
    left.set_xlabel("accuracy under the row (%)")
    right.set_xlabel(f"examples newly fooled (of {report.n_examples}; natural: misclassified)")
    right.set_xlim(0, max([c["newly_fooled"] for c in entries] + [1]) * 1.25)
    from matplotlib.ticker import MaxNLocator
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of examples: whole numbers only
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Attacks on {_model_name(report)} ({_data_name(report)}), in the order they ran\n"
                 f"{threat_line(report)}", fontsize=10)
    return _save(fig, Path(path))


def write_report_figures(report, directory: Union[str, Path]) -> Dict[str, str]:
    """Both figures of one evaluation into ``directory``; returns figure kind -> file name (relative, as the
    markdown report and the model card reference them)."""
    directory = Path(directory)
    plot_robustness_curve(report, directory / CURVE_FILE)
    plot_attacks(report, directory / ATTACKS_FILE)
    return {"robustness_curve": CURVE_FILE, "attacks": ATTACKS_FILE}


def plot_overlaid_curves(reports: Sequence, labels: Sequence[str], path: Union[str, Path]) -> Path:
    """Several models' robustness curves on one axis (same images, eps and suite: see ``casify compare``): each
    model's worst case (solid) from its clean point at eps 0."""
    first = reports[0]
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    for i, (report, label) in enumerate(zip(reports, labels)):
        xs, ys = _curve_xy(report, "worst_case")
        ax.plot(xs, ys, "o-", color=f"C{i % 10}", linewidth=2, label=f"{label}: worst case")
        ax.scatter([0.0], [100 * report.natural_accuracy], s=60, color=f"C{i % 10}", edgecolor="black", zorder=4)
    return _finish_curve(fig, ax, first, f"Robustness curves on {_data_name(first)} (clean point at eps 0)", path)


__all__ = ["ATTACKS_FILE", "CURVE_FILE", "plot_attacks", "plot_overlaid_curves", "plot_robustness_curve",
           "threat_line", "write_report_figures"]
