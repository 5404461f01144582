"""What the fine-tuning recipes share: build data and model from a typed recipe, train, evaluate, publish.

A recipe is read and checked once (:func:`casify.recipe.config.load_recipe`); everything here receives its typed
sections. The scripts under ``recipes/`` only pick the method, so ``python recipes/finetune_at.py --config ...`` and
``accelerate launch recipes/finetune_at.py --config ...`` run the same code on one CPU or on many GPUs.

The package holds the recipe's schema (``config.py``: the typed sections, defaults < YAML < ``--set`` < the command's
flags) and, here, what runs one. It may import every layer below it (:mod:`casify.train`, :mod:`casify.evaluate`,
:mod:`casify.model`, :mod:`casify.data`, :mod:`casify.io`, :mod:`casify.core`), and only :mod:`casify.cli` imports it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from torch import nn

from ..core.code_version import code_version
from ..data import build_dataset, short_name
from ..defenses import find_defense_modules
from ..model.loading import from_pretrained
from ..model.pretrained_weights import NamedBase, build_named_base
from .config import (CommandLine, ConfigError, DataSection, DefenseSection, EvalSection, HubSection,
                            ModelSection, Recipe, load_recipe, run_name)
from ..model.surgery import wrap
from ..train import Trainer

__all__ = ["CommandLine", "ConfigError", "Recipe", "build_base_model", "build_datasets", "build_model",
           "evaluate_model", "load_recipe", "main", "run", "run_name"]


def build_base_model(spec: ModelSection) -> nn.Module:
    """The base model of :func:`_named_base` (see there)."""
    return _named_base(spec).model


def _named_base(spec: ModelSection) -> NamedBase:
    """A timm (``name``) or torchvision (``torchvision:name``) model, optionally pretrained or from a local checkpoint,
    with its spec (:func:`casify.model.pretrained_weights.build_named_base`). A timm checkpoint goes through timm's own
    loading path after a check that its backbone fits: an ImageNet checkpoint loads into a ``num_classes: 10`` model
    with only the classifier re-initialised, and one line says what was dropped."""
    base = build_named_base(spec.name, pretrained=bool(spec.pretrained), checkpoint=spec.checkpoint,
                            **(spec.kwargs or {}))
    if base.loaded is not None:
        print(f"casify: {base.loaded.describe()}", file=sys.stderr)
    return base


def build_model(spec: ModelSection, defense: Optional[DefenseSection] = None) -> nn.Module:
    """The model to fine-tune: a base model wrapped with the configured defense (default: CAS with its default
    options), or a saved casify folder as it is."""
    if not _is_saved_folder(spec.name):
        return _wrapped_base(spec, defense or DefenseSection())
    return from_pretrained(spec.name)


def _is_saved_folder(name: Optional[str]) -> bool:
    return bool(name) and Path(name).is_dir() and (Path(name) / "config.json").exists()


def _wrapped_base(spec: ModelSection, defense: DefenseSection) -> nn.Module:
    """The base model wrapped with ``defense``; its spec names where its weights came from (the model card says)."""
    base = _named_base(spec)
    layers = spec.cas_layers
    return wrap(base.model, layers if layers is not None else [], init=spec.init, suppress=spec.suppress,
                normalize=spec.normalize, input_size=spec.input_size, base_spec=base.spec, defense=defense.name,
                layer_options=defense.layer_options, **defense.options)


def build_datasets(spec: DataSection):
    """The train, held-out (checkpoint selection) and test splits."""
    common = dict(root=spec.root, download=spec.download, val_size=spec.val_size, image_size=spec.image_size,
                  **(spec.kwargs or {}))
    train = build_dataset(spec.name, "train", augment=spec.augment, **common)
    val = build_dataset(spec.name, "val", **common)
    test = build_dataset(spec.test or spec.name, "test", **common)
    return train, val, test


def evaluate_model(model: nn.Module, dataset, spec: EvalSection, accelerator=None):
    """Robust accuracy on the test split with the configured suite and radius (defended models under the adaptive
    attacks)."""
    from ..evaluate import evaluate
    return evaluate(model, dataset, attacks=spec.suite, eps=spec.eps, batch_size=spec.batch_size,
                    max_examples=spec.max_examples, seed=spec.seed, accelerator=accelerator, progress=False)


def check_class_count(model: nn.Module, dataset, recipe: Recipe) -> None:
    """The model's class count must be the data's, checked before anything trains: a 1000-class head on CIFAR-10
    would train (labels 0-9 fit) and publish a model that predicts ImageNet indices."""
    model_classes = getattr(model, "num_classes", None)
    data_classes = getattr(dataset, "num_classes", None)
    if model_classes and data_classes and int(model_classes) != int(data_classes):
        raise ConfigError(f"the model has {model_classes} classes but {recipe.data.name} has {data_classes}; set "
                          f"--set model.kwargs.num_classes={data_classes} (a pretrained checkpoint's classifier is "
                          "then re-initialised for it)")


def check_hub_before_training(hub: HubSection) -> None:
    """With ``hub.push``: the Hub is reachable and the token can write to the repo, checked before anything is built
    (:func:`casify.io.hub_access.check_hub_access`)."""
    if hub.push:
        from ..io.hub_access import check_hub_access
        check_hub_access(hub.model_id)


def run(recipe: Recipe) -> dict:
    """Train, evaluate and publish as ``recipe`` says; return a summary (also in ``<output_dir>/summary.json``).

    The seed is set before the model is built, so a paper-initialised model and its defense modules are the same in
    every run with that seed. A folder that holds another run is refused (see :meth:`casify.train.Trainer.train`).
    """
    from accelerate.utils import set_seed

    if not isinstance(recipe, Recipe):
        raise TypeError(f"run() takes a Recipe (casify.recipe.load_recipe(path, CommandLine(...))), got "
                        f"{type(recipe).__name__}")
    check_hub_before_training(recipe.hub)
    tcfg = recipe.train
    set_seed(tcfg.seed)
    model = build_model(recipe.model, recipe.defense)
    if tcfg.cas and not find_defense_modules(model):
        raise ValueError("train.cas is true but model.cas_layers is empty; set model.cas_layers or train.cas=false")
    train_set, val_set, test_set = build_datasets(recipe.data)
    check_class_count(model, train_set, recipe)
    trainer = Trainer(model, train_set, val_set, tcfg, identity=recipe.identity())
    # The run folder is locked from training to its hub/ folder and summary: a second run into it is refused.
    with trainer.holding_run_folder():
        state = trainer.train(resume=recipe.resume, overwrite=recipe.overwrite)
        acc = trainer.accelerator
        out = Path(recipe.output_dir)
        selected = out / "best" if (out / "best").exists() else out / "final"
        robust = from_pretrained(selected).to(acc.device)
        report = evaluate_model(robust, test_set, recipe.eval, accelerator=acc)
        summary = {"method": recipe.method, "cas": tcfg.cas, "output_dir": str(out), "steps": state.global_step,
                   "global_batch_size": trainer.global_batch_size, "best_step": state.best_step,
                   "validation": state.history, "selected": selected.name, "overfitting": state.overfitting,
                   "test": report.summary(),
                   "code": code_version()}
        if acc.is_main_process:
            _write_outputs(recipe, robust, report, summary, out)
        acc.wait_for_everyone()
        return summary


def _write_outputs(recipe: Recipe, robust: nn.Module, report, summary: dict, out: Path) -> None:
    """The run's hub/ folder (model, card, report, figures), summary.json, the push if asked, the run table."""
    from ..io.publish import write_hub_folder
    from ..io.push import push_run_folder
    from ..io.run_table import format_run_table
    defended = "-cas" if recipe.train.cas else ""
    model_id = recipe.hub.model_id or f"casify-{recipe.method}{defended}"
    report.save(out / "hub")  # report + figures first: the card shows the figures, push_to_hub uploads them
    name = short_name(recipe.data.name)  # cifar10, or a file's / folder's name: never a path
    write_hub_folder(robust, out / "hub", model_id, evaluation=report.summary(), dataset_name=name,
                     dataset_type=name, split=recipe.eval.split, figures=report.figures)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if recipe.hub.push:
        label = f"casify {recipe.method}{'+CAS' if recipe.train.cas else ''}"
        summary["pushed"] = push_run_folder(out / "hub", recipe.hub.model_id, private=recipe.hub.private,
                                            force=recipe.hub.force, commit_message=label)
    print(format_run_table(summary))

