"""RobustBench's conventions without depending on robustbench (its wheel pins an old timm): :func:`benchmark` has
RobustBench's signature and return value, ``(clean_accuracy, robust_accuracy)`` as fractions, and writes a model-info
JSON with RobustBench's field names, so a casify number can be set beside a leaderboard entry.

What differs, on purpose: RobustBench's robust accuracy is AutoAttack's (standard version, on the final logits);
casify's is the per-example **worst case** over its adaptive suite *and* AutoAttack, so it is never above AutoAttack's
on the same images. The JSON keeps both: ``autoattack_acc`` (RobustBench's field, AutoAttack alone, run on every
example) and, under ``casify``, the adaptive worst case, the gap between the two, the gradient-masking checks and,
for a routed model, the routing-echo diagnostics. A large gap says the leaderboard-style number overstates the model.

Threat models: ``"Linf"`` and ``"L2"`` (eps defaults to the leaderboards' radii: 8/255 and 0.5 on CIFAR, 4/255 on
ImageNet), and ``"corruptions"`` (mean accuracy over corruptions x 5 severities: CIFAR-10-C-style corruptions
generated locally and seeded by :mod:`casify.data.corruptions`, or the released CIFAR-10-C arrays from
``corruptions_dir``; RobustBench's field ``corruptions_acc``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..io.serialization import atomic_write
from .deployed import architecture_name
from ..attacks.threat_model import format_radius

THREAT_MODELS = ("Linf", "L2", "corruptions")
DEFAULT_EPS = {("cifar10", "Linf"): 8 / 255, ("cifar100", "Linf"): 8 / 255, ("imagenet", "Linf"): 4 / 255,
               ("cifar10", "L2"): 0.5, ("cifar100", "L2"): 0.5}
# RobustBench's ModelInfo fields, in its order (robustbench/utils.py); accuracies there are percentages as strings
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
                     "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote")


def _percent(fraction: Optional[float]) -> Optional[str]:
    return None if fraction is None else str(round(100 * fraction, 2))


def _threat_model(threat_model: str) -> str:
    for name in THREAT_MODELS:
        if str(threat_model).lower() == name.lower():
            return name
    raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {threat_model!r}")


def _data(dataset, n_examples: int, data_dir) -> Tuple[Dataset, str]:
    """The first ``n_examples`` test images, as RobustBench takes them."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        data, name = TensorDataset(dataset[0], dataset[1]), "tensors"
    elif isinstance(dataset, (str, os.PathLike)):
        from ..data import build_dataset, short_name
        name = os.fspath(dataset)
        data = build_dataset("imagefolder:" + os.fspath(data_dir) if name == "imagenet" and data_dir else name,
                             "test", root=data_dir)
        name = short_name(name)  # cifar10, or a file's stem: RobustBench's dataset names, never a path
    else:
        from ..data import dataset_name
        data, name = dataset, dataset_name(dataset)[0] or type(dataset).__name__
    return Subset(data, range(min(int(n_examples), len(data)))), name


def _folder_name(data_name: str) -> str:
    """RobustBench's dataset folder (``cifar10``); a file or folder path gives its stem."""
    name = data_name.split(":")[-1]
    return Path(name).stem if ("/" in name or os.sep in name or "." in name) else name


def corruption_accuracy(model: nn.Module, data: Dataset, *, corruptions: Optional[Sequence[str]] = None,
                        severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0, corruptions_dir=None,
                        batch_size: int = 128, device=None) -> dict:
    """Accuracy of the deployed model on every corruption at every severity, and their mean (``mean``).
    ``corruptions_dir``: read the released CIFAR-10-C arrays there instead of generating the corruptions."""
    from ..data.corruptions import CorruptedDataset, corruption_names, load_cifar10c
    from .deployed import deployed_correct
    names = corruption_names(corruptions)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    table: Dict[str, Dict[str, float]] = {}
    for name in names:
        table[name] = {}
        for severity in severities:
            corrupted = (load_cifar10c(corruptions_dir, name, severity, len(data)) if corruptions_dir
                         else CorruptedDataset(data, name, severity, seed))
            right = total = 0
            for x, y in DataLoader(corrupted, batch_size=batch_size, shuffle=False):
                right += int(deployed_correct(model, x.to(device).float(), torch.as_tensor(y).to(device)).sum())
                total += len(y)
            table[name][str(severity)] = right / max(total, 1)
    values = [a for per in table.values() for a in per.values()]
    return {"mean": sum(values) / len(values), "per_corruption": table,
            "source": f"CIFAR-10-C arrays from {corruptions_dir}" if corruptions_dir
            else f"generated by casify.data.corruptions (seed {seed}), CIFAR-10-C style", "severities": list(severities)}


def benchmark(model: Union[nn.Module, str, os.PathLike], n_examples: int = 10000, dataset="cifar10",
              threat_model: str = "Linf", **kwargs) -> Tuple[float, float]:
    """RobustBench's ``benchmark(model, n_examples, dataset, threat_model, eps=...)``: ``(clean_accuracy,
    robust_accuracy)``, fractions; the keywords and what is measured are :func:`benchmark_info`'s."""
    info = benchmark_info(model, n_examples, dataset, threat_model, **kwargs)
    return info["casify"]["clean_acc"], info["casify"]["robust_acc"]


def benchmark_info(model: Union[nn.Module, str, os.PathLike], n_examples: int = 10000, dataset="cifar10",
                   threat_model: str = "Linf", *, eps: Optional[float] = None, data_dir=None, device=None,
                   batch_size: int = 128, attacks="standard", autoattack: bool = True, seed: int = 0,
                   model_name: Optional[str] = None, to_disk: bool = False, model_info_dir="model_info",
                   corruptions: Optional[Sequence[str]] = None, corruptions_dir=None, per_attack: bool = False,
                   echo: bool = True, progress: bool = True) -> dict:
    """The model-info record of :func:`benchmark` (RobustBench's fields, casify's under ``casify``, where
    ``clean_acc`` / ``robust_acc`` are fractions) for ``model`` on the first ``n_examples`` test images of ``dataset``
    (a name for :func:`casify.data.build_dataset`, a Dataset, or ``(x, y)`` tensors).

    For ``"Linf"`` / ``"L2"`` the robust accuracy is casify's adaptive worst case: per example, correct under every
    row of ``attacks`` (:func:`casify.evaluate.evaluate`) and, with ``autoattack=True``, under AutoAttack (standard
    version, run on every example so its own accuracy is exact too). For ``"corruptions"`` it is the mean accuracy
    over ``corruptions`` (default :data:`casify.data.corruptions.CORRUPTIONS`) x 5 severities.

    ``to_disk=True`` writes ``<model_info_dir>/<dataset>/<threat_model>/<model_name>.json`` (RobustBench's layout and
    field names; ``clean_acc`` / ``autoattack_acc`` / ``corruptions_acc`` as percentage strings, as RobustBench writes
    them) with casify's own fields under ``casify``, and the evaluation report (JSON, markdown, figures) in
    ``<model_name>.eval/`` beside it.
    """
    from .api import evaluate
    tm = _threat_model(threat_model)
    if isinstance(model, (str, os.PathLike)):
        from ..model.loading import from_pretrained
        model_name = model_name or Path(os.fspath(model)).name
        model = from_pretrained(model)
    if to_disk and not model_name:
        raise ValueError("to_disk=True needs model_name= (the JSON's file name, as in RobustBench)")
    if device is not None:
        model = model.to(device)
    data, data_name = _data(dataset, n_examples, data_dir)
    info = {f: None for f in MODEL_INFO_FIELDS}
    info.update(name=model_name, dataset=data_name, architecture=architecture_name(model))  # not "DefendedModel"
    casify_info: dict = {"threat_model": tm, "n_examples": len(data)}
    report = None
    if tm == "corruptions":
        clean = evaluate(model, data, attacks=[], checks=False, batch_size=batch_size, seed=seed, device=device,
                         progress=progress)
        corr = corruption_accuracy(model, data, corruptions=corruptions, seed=seed, corruptions_dir=corruptions_dir,
                                   batch_size=batch_size, device=device)
        clean_acc, robust_acc = clean.natural_accuracy, corr["mean"]
        info.update(clean_acc=_percent(clean_acc), corruptions_acc=_percent(robust_acc))
        casify_info.update(clean_acc=clean_acc, robust_acc=robust_acc,
                           robust_acc_definition="mean accuracy over the corruptions x severities", corruptions=corr,
                           data_sha256=clean.data["sha256"],
                           note="corruptions_mce (mean corruption error relative to AlexNet) is ImageNet-C's; "
                                "not computed")
    else:
        norm = tm.lower()
        if eps is None:
            if (data_name, tm) not in DEFAULT_EPS:
                raise ValueError(f"give eps= for {data_name} / {tm} (defaults exist for {sorted(DEFAULT_EPS)})")
            eps = DEFAULT_EPS[(data_name, tm)]
        report = evaluate(model, data, attacks=attacks, eps=eps, norm=norm, batch_size=batch_size, seed=seed,
                          device=device, progress=progress, per_attack=per_attack)
        worst = list(report.per_example["worst_case"])
        aa_acc = None
        if autoattack:
            aa = evaluate(model, data, attacks=[], autoattack=True, eps=eps, norm=norm, batch_size=batch_size,
                          seed=seed, device=device, progress=progress, checks=False, per_attack=True)
            row = aa.attacks[-1]
            aa_acc = row.accuracy
            worst = [bool(w) and bool(a) for w, a in zip(worst, aa.per_example[row.name])]
            casify_info.update(autoattack_row=row.name, autoattack_flags=row.settings.get("flags", []))
        clean_acc = report.natural_accuracy
        robust_acc = sum(worst) / max(len(worst), 1)
        summary = report.summary()
        info.update(eps=eps, clean_acc=_percent(clean_acc), autoattack_acc=_percent(aa_acc))
        casify_info.update(
            eps_str=format_radius(eps, norm), clean_acc=clean_acc, robust_acc=robust_acc,
            robust_acc_percent=_percent(robust_acc),
            robust_acc_definition=("per example, correct under every row of the suite and AutoAttack (adaptive "
                                   "worst case); autoattack_acc is AutoAttack alone" if autoattack else
                                   "per example, correct under every row of the suite (adaptive worst case; "
                                   "AutoAttack not run)"),
            autoattack_minus_adaptive_points=None if aa_acc is None else round(100 * (aa_acc - robust_acc), 2),
            suite_worst_case=report.worst_case["accuracy"], families=summary["accuracy"],
            gradient_masking_suspected=report.gradient_masking_suspected,
            failed_checks=summary["failed_checks"], checks={c.name: c.passed for c in report.checks},
            data_sha256=report.data["sha256"], suite=report.suite, mode=summary["mode"])
        from ..defenses import routed_modules
        if echo and report.routing_echo is not None:
            casify_info["routing_echo"] = report.routing_echo
        elif echo and routed_modules(model):  # an L2 evaluation: the echo's own L-inf PGD at 8/255
            from .echo import routing_echo
            casify_info["routing_echo"] = routing_echo(model, data, eps=8 / 255, max_examples=min(len(data), 500),
                                                       batch_size=batch_size, seed=seed).to_dict()
    from ..core.spec import versions
    casify_info["versions"] = versions()
    info["casify"] = casify_info
    if to_disk:
        folder = Path(model_info_dir) / _folder_name(data_name) / tm
        folder.mkdir(parents=True, exist_ok=True)
        if report is not None:
            report.save(folder / f"{model_name}.eval")
            casify_info["report"] = f"{model_name}.eval/eval_report.json"
        text = json.dumps(info, indent=2) + "\n"
        atomic_write(folder / f"{model_name}.json", lambda tmp: Path(tmp).write_text(text))
    return info


__all__ = ["DEFAULT_EPS", "MODEL_INFO_FIELDS", "THREAT_MODELS", "benchmark", "benchmark_info", "corruption_accuracy"]
