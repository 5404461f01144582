"""The analysis of Section 3 end to end: :func:`analyze` crafts PGD adversarial examples, captures natural and
adversarial activations, computes the statistics and, given ``out_dir``, writes the figures and a JSON and markdown
:class:`ChannelReport`; :func:`run_analysis` adds the t-SNE figure (what ``casify analyze`` runs). Argument parsing
lives in :mod:`casify.cli`.

This is the one file that ties the others together (capture, statistics, figures, t-SNE); none of them imports it.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

from ..attacks import pgd, resolve_alpha
from ..core.eps import format_eps
from ..model.defended import DefendedModel
from .capture import ActivationProbe, Data, default_layer, example_batches, resolve_device, resolve_objective
from .figures import plot_frequency, plot_magnitude
from .files import write_text_atomic
from .statistics import (activation_frequency, channel_magnitude, class_frequency_summary, frequency_summary,
                         magnitude_gap)
from .tsne import tsne_plot


# -- the report ------------------------------------------------------------------------------------------------------
def _json_safe(value):
    """NaN and infinity as null (JSON has neither), tensors and arrays as lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


REPORT_JSON, REPORT_MD = "channel_report.json", "channel_report.md"


@dataclass
class ChannelReport:
    """Everything :func:`analyze` measured. Per-channel vectors are in channel order (figures sort them).

    ``capture_point``: where the activation was taken, in words (``"before CAS mask (input of cas_modules.<key>)"``,
    ``"after CAS mask (output of cas_modules.<key>)"`` or ``"layer output (no CAS module)"``); ``captured`` says how.
    ``magnitude``: per-channel mean |activation| of natural and adversarial examples with :func:`magnitude_gap`.
    ``frequency``: the one class of Figure 2 (``class_index``): per-channel frequencies and :func:`frequency_summary`.
    ``frequency_class_mean``: the same summary computed per class and averaged over the classes present.
    ``figures``: the files written, by kind (paths; in the saved JSON, relative to its folder).
    The raw (N, C) activations and labels are kept as attributes, but not written to JSON.
    """
    layer: str
    captured: str
    cas_side: str
    channels: int
    num_examples: int
    threshold: float
    attack: dict
    accuracy: dict
    magnitude: dict
    frequency: dict
    frequency_class_mean: dict
    figures: dict = field(default_factory=dict)
    capture_point: str = ""
    natural_activations: Optional[torch.Tensor] = field(default=None, repr=False)
    adversarial_activations: Optional[torch.Tensor] = field(default=None, repr=False)
    labels: Optional[torch.Tensor] = field(default=None, repr=False)

    def to_dict(self, relative_to: Optional[Union[str, Path]] = None) -> dict:
        """The report as JSON-safe data; figure paths inside ``relative_to`` are given relative to it."""
        keys = ("layer", "capture_point", "captured", "cas_side", "channels", "num_examples", "threshold", "attack",
                "accuracy", "magnitude", "frequency", "frequency_class_mean", "figures")
        d = {k: getattr(self, k) for k in keys}
        if relative_to is not None:
            d["figures"] = {k: _relative(v, Path(relative_to)) for k, v in self.figures.items()}
        return _json_safe(d)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the JSON report to ``path`` (atomically; figure paths relative to its folder)."""
        path = Path(path)
        return write_text_atomic(path, json.dumps(self.to_dict(relative_to=path.parent), indent=1) + "\n")

    def write(self, out_dir: Union[str, Path]) -> Path:
        """Write ``channel_report.json`` and ``channel_report.md`` into ``out_dir`` (and list them in ``figures``)."""
        out = Path(out_dir)
        self.figures["report"] = str(out / REPORT_JSON)
        self.figures["markdown"] = str(out / REPORT_MD)
        write_text_atomic(out / REPORT_MD, self.to_markdown(relative_to=out))
        return self.save(out / REPORT_JSON)

    def summary(self) -> dict:
        """The scalars of the report (no per-channel vectors): what ``casify analyze`` prints."""
        full = self.to_dict()
        out = {key: full[key] for key in ("layer", "capture_point", "captured", "num_examples", "accuracy", "figures")}
        for key in ("magnitude", "frequency", "frequency_class_mean"):
            out[key] = {k: v for k, v in full[key].items() if not isinstance(v, list)}
        return out

    def to_markdown(self, relative_to: Optional[Union[str, Path]] = None) -> str:
        d = self.to_dict(relative_to)
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
        num = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        attack = d["attack"]
        lines = ["# Channel-wise activation analysis", "",
                 f"- layer: `{d['layer']}`",
                 f"- capture point: **{d['capture_point']}**; captured as: {d['captured']}",
                 f"- examples: {d['num_examples']}; channels: {d['channels']}; a channel is active above "
                 f"{100 * d['threshold']:g} % of the example's largest channel",
                 f"- attack: PGD-{attack['steps']}, L-inf eps = {format_eps(attack['eps'])}, objective "
                 f"`{attack['objective']}`, seed {attack['seed']} (eval mode, predicted CAS routing)",
                 f"- accuracy: natural {pct(d['accuracy']['natural'])}, adversarial "
                 f"{pct(d['accuracy']['adversarial'])}",
                 "", "## Magnitude (Figure 1)", "",
                 "| | natural | adversarial |", "|---|---|---|",
                 f"| mean channel magnitude | {num(d['magnitude']['mean_natural'])} | "
                 f"{num(d['magnitude']['mean_adversarial'])} |", "",
                 f"adversarial / natural: {num(d['magnitude']['ratio'])}; mean difference "
                 f"{num(d['magnitude']['mean_difference'])}."]

        def table(f: dict) -> List[str]:
            return ["| statistic | natural | adversarial |", "|---|---|---|",
                    f"| normalised entropy | {num(f['entropy_natural'])} | {num(f['entropy_adversarial'])} |",
                    f"| Gini coefficient | {num(f['gini_natural'])} | {num(f['gini_adversarial'])} |",
                    f"| frequency of the {f['rare_channels']:g} rarely used channels | "
                    f"{num(f['rare_frequency_natural'])} | {num(f['rare_frequency_adversarial'])} |",
                    f"| frequency of the other channels | {num(f['frequent_frequency_natural'])} | "
                    f"{num(f['frequent_frequency_adversarial'])} |", "",
                    f"mean |adversarial - natural| frequency: {num(f['mean_abs_difference'])}."]

        freq = d["frequency"]
        lines += ["", f"## Frequency, class {freq['class_index']} (Figure 2)", ""]
        lines += table(freq) if freq.get("class_examples") else ["No example of this class was analysed."]
        mean = d["frequency_class_mean"]
        lines += ["", f"## Frequency, averaged over {mean['classes']} classes", ""] + table(mean)
        files = {k: v for k, v in d["figures"].items() if k not in ("report", "markdown")}
        if files:
            lines += ["", "## Figures", ""] + [f"- {k}: {v}" for k, v in files.items()]
        return "\n".join(lines) + "\n"


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)



# -- the analysis ----------------------------------------------------------------------------------------------------
def analyze(model: nn.Module, data: Data, layer: Optional[str] = None, *, eps: float = 8 / 255, steps: int = 20,
            alpha: Optional[float] = None, attack_objective: str = "auto", class_index: int = 0,
            threshold: float = 0.01, rare_fraction: float = 0.5, cas_side: str = "before",
            channel_dim: Optional[int] = None, max_examples: Optional[int] = 1000, batch_size: int = 128,
            out_dir: Optional[Union[str, Path]] = None, seed: int = 0, device=None) -> ChannelReport:
    """Section 3 of the paper on ``model`` at ``layer``: magnitudes and activation frequencies of natural examples and
    their PGD adversarial examples (L-inf, ``eps``, ``steps`` steps, random start, eval mode, predicted routing).

    Args:
        data: a dataset of (image, label) (a seeded random subset of ``max_examples`` is used), a DataLoader or a
            tuple of tensors (x, y) (their first ``max_examples``). Images as the model takes them (pixels in [0, 1]
            for casify models).
        layer: a module or graph-node name; by default the last CAS layer of a CAS model, else the last feature stage.
        attack_objective: ``"auto"`` is ``"cas"`` (the adaptive attack) on a CAS model and ``"ce"`` otherwise.
        class_index: the class whose frequencies Figure 2 shows; statistics averaged over classes are also reported.
        threshold: a channel is active above this fraction of the example's largest channel value (paper: 1 %).
        rare_fraction: the share of channels, least activated by natural examples, counted as rare.
        cas_side: at a CAS layer, ``"before"`` the mask (the CAS module's input, default: the same point as the
            layer's output in a model without CAS) or ``"after"`` it. The report's ``capture_point`` says which.
        out_dir: where to write ``channel_magnitude.png``, ``channel_frequency.png``, ``channel_report.json`` and
            ``channel_report.md`` (each file atomically; other files in the folder are left alone).
    """
    device = resolve_device(model, device)
    objective = resolve_objective(model, attack_objective)
    batches = example_batches(data, max_examples, batch_size, seed)
    first = next(batches, None)
    if first is None:
        raise ValueError("the data holds no examples")
    if layer is None:
        layer = default_layer(model, tuple(first[0].shape[1:]))
    generator = torch.Generator(device=device).manual_seed(seed)
    nat_acts, adv_acts, labels, nat_pred, adv_pred = [], [], [], [], []
    with ActivationProbe(model, layer, cas_side=cas_side, channel_dim=channel_dim) as probe:
        for x, y in _chain(first, batches):
            x, y = x.to(device), y.to(device)
            logits, acts = probe(x)
            x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, objective=objective, generator=generator)
            adv_logits, adv = probe(x_adv)
            nat_acts.append(acts.cpu())
            adv_acts.append(adv.cpu())
            labels.append(y.cpu())
            nat_pred.append(logits.argmax(1).cpu())
            adv_pred.append(adv_logits.argmax(1).cpu())
        captured, capture_point = probe.captured, probe.capture_point
    nat, adv, labels = torch.cat(nat_acts), torch.cat(adv_acts), torch.cat(labels)
    nat_pred, adv_pred = torch.cat(nat_pred), torch.cat(adv_pred)

    nat_mag, adv_mag = channel_magnitude(nat), channel_magnitude(adv)
    keep = labels == class_index
    if bool(keep.any()):
        nat_freq = activation_frequency(nat[keep], threshold)
        adv_freq = activation_frequency(adv[keep], threshold)
        frequency = {"class_index": class_index, "class_examples": int(keep.sum()),
                     "natural": nat_freq, "adversarial": adv_freq,
                     **frequency_summary(nat_freq, adv_freq, rare_fraction)}
    else:
        warnings.warn(f"no example of class {class_index} among the {len(labels)} analysed; the one-class frequency "
                      "statistics and Figure 2 are left out (pass class_index= or more examples)")
        frequency = {"class_index": class_index, "class_examples": 0}
    report = ChannelReport(
        layer=layer, captured=captured, capture_point=capture_point, cas_side=cas_side, channels=int(nat.shape[1]),
        num_examples=int(len(labels)), threshold=float(threshold),
        attack={"name": "pgd", "norm": "linf", "eps": float(eps), "steps": int(steps),
                "alpha": resolve_alpha(eps, steps, alpha),
                "objective": objective, "seed": seed},
        accuracy={"natural": float((nat_pred == labels).float().mean()),
                  "adversarial": float((adv_pred == labels).float().mean())},
        magnitude={"natural": nat_mag, "adversarial": adv_mag, **magnitude_gap(nat_mag, adv_mag)},
        frequency=frequency,
        frequency_class_mean=class_frequency_summary(nat, adv, labels, threshold, rare_fraction),
        natural_activations=nat, adversarial_activations=adv, labels=labels)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = type(model.base_model if isinstance(model, DefendedModel) else model).__name__
        report.figures["magnitude"] = str(plot_magnitude(
            nat_mag.numpy(), adv_mag.numpy(), out / "channel_magnitude.png",
            f"{name} @ {layer}: magnitude ({len(labels)} examples, PGD-{steps})", capture_point=capture_point))
        if "natural" in frequency:
            report.figures["frequency"] = str(plot_frequency(
                frequency["natural"].numpy(), frequency["adversarial"].numpy(), out / "channel_frequency.png",
                f"{name} @ {layer}: frequency, class {class_index} ({frequency['class_examples']} examples)",
                capture_point=capture_point))
        report.write(out)
    return report


def run_analysis(model: nn.Module, data: Data, layer: Optional[str], out: Union[str, Path], *, tsne: bool = False,
                 tsne_examples: int = 500, eps: float = 8 / 255, steps: int = 20, attack_objective: str = "auto",
                 class_index: int = 0, threshold: float = 0.01, cas_side: str = "before",
                 max_examples: Optional[int] = 1000, batch_size: int = 128, seed: int = 0,
                 device=None) -> ChannelReport:
    """What ``casify analyze`` runs once the model and data are loaded: :func:`analyze` writing its figures and
    reports into ``out``, and with ``tsne`` the t-SNE figure of penultimate features (``tsne.png``, Figure 9) on
    ``tsne_examples`` examples, listed in the report. ``out`` should be a new folder (the command line writes into a
    staging folder that replaces ``--out`` at the end; see :mod:`casify.io.output_dir`)."""
    out = Path(out)
    report = analyze(model, data, layer, eps=eps, steps=steps, attack_objective=attack_objective,
                     class_index=class_index, threshold=threshold, cas_side=cas_side, max_examples=max_examples,
                     batch_size=batch_size, out_dir=out, seed=seed, device=device)
    if tsne:
        result = tsne_plot(model, data, out / "tsne.png", eps=eps, steps=steps, attack_objective=attack_objective,
                           max_examples=tsne_examples, batch_size=batch_size, seed=seed, device=device)
        report.figures["tsne"] = str(result.path)
        report.write(out)
    return report


def _chain(first, rest):
    yield first
    yield from rest

