"""What the fine-tuning recipes share: read a YAML config, build data and model, train, evaluate, publish.

The scripts under ``recipes/`` only pick the method; everything a library user would need lives here or below, so
``python recipes/finetune_at.py --config ...`` and ``accelerate launch recipes/finetune_at.py --config ...`` run the
same code on one CPU or on many GPUs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch import nn

from .cas import find_cas_modules
from .data import build_dataset
from .hub import from_pretrained
from .surgery import wrap
from .train import TrainConfig, Trainer

DEFAULTS = {
    "model": {"name": None, "pretrained": False, "checkpoint": None, "kwargs": {}, "cas_layers": "auto",
              "init": "identity", "suppress": True, "normalize": "auto", "input_size": None},
    "data": {"name": "digits", "root": None, "download": False, "augment": True, "val_size": None, "image_size": None,
             "test": None, "kwargs": {}},
    "train": {},
    "eval": {"split": "test", "suite": "quick", "max_examples": 1000, "batch_size": 256},
    "hub": {"push": False, "model_id": None, "private": False},
    "output_dir": "outputs/run",
    "resume": True,
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set(config: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise ValueError(f"--set expects key.sub=value, got {dotted!r}")
    key, raw = dotted.split("=", 1)
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> dict:
    """Defaults < the YAML file < ``--set key.sub=value`` overrides. Unknown sections are an error."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(DEFAULTS) - {"method"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        config = _merge(config, data)
    for item in overrides:
        _set(config, item)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(config["train"]) - train_fields
    if unknown:
        raise ValueError(f"unknown train settings {sorted(unknown)}; known: {sorted(train_fields)}")
    return config


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_base_model(spec: dict) -> nn.Module:
    """A timm (``name``) or torchvision (``torchvision:name``) model, optionally pretrained or from a local checkpoint."""
    name = spec["name"]
    if not name:
        raise ValueError("model.name is required (a timm name, 'torchvision:<name>', or a casify folder)")
    kwargs = dict(spec.get("kwargs") or {})
    if name.startswith("torchvision:"):
        import torchvision.models as tvm
        weights = "DEFAULT" if spec.get("pretrained") else None
        model = tvm.get_model(name.split(":", 1)[1], weights=weights, **kwargs)
    else:
        import timm
        model = timm.create_model(name, pretrained=bool(spec.get("pretrained")), **kwargs)
    if spec.get("checkpoint"):
        model.load_state_dict(_load_state_dict(Path(spec["checkpoint"])), strict=True)
    return model


def build_model(spec: dict) -> nn.Module:
    """The model to fine-tune: a saved casify folder as it is, or a base model wrapped with the configured CAS layers."""
    name = spec.get("name") or ""
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return from_pretrained(name)
    base = build_base_model(spec)
    layers = spec.get("cas_layers")
    return wrap(base, layers if layers is not None else [], init=spec.get("init", "identity"),
                suppress=spec.get("suppress", True),
                normalize=spec.get("normalize", "auto"), input_size=spec.get("input_size"))


def build_datasets(spec: dict):
    common = dict(root=spec.get("root"), download=spec.get("download", False), val_size=spec.get("val_size"),
                  image_size=spec.get("image_size"), **(spec.get("kwargs") or {}))
    train = build_dataset(spec["name"], "train", augment=spec.get("augment", True), **common)
    val = build_dataset(spec["name"], "val", **common)
    test_source = spec.get("test") or spec["name"]
    test = build_dataset(test_source, "test", **common)
    return train, val, test


def evaluate_model(model: nn.Module, dataset, config: dict, accelerator=None) -> dict:
    """Robust accuracy on the test split with the configured suite (CAS models under the adaptive attacks)."""
    from .evaluate import evaluate
    train = config["train"]
    ev = config["eval"]
    report = evaluate(model, dataset, attacks=ev.get("suite", "quick"), eps=train.get("eps", 8 / 255),
                      batch_size=ev.get("batch_size", 256), max_examples=ev.get("max_examples"),
                      seed=train.get("seed", 0), accelerator=accelerator, progress=False)
    return report


def run(config: dict, method: str) -> dict:
    """Train with ``method`` ("at", "trades", "mart") as configured; return a summary (also in ``summary.json``)."""
    train_cfg = dict(config["train"])
    train_cfg.update(method=method, output_dir=config["output_dir"])
    tcfg = TrainConfig(**train_cfg)
    model = build_model(config["model"])
    if tcfg.cas and not find_cas_modules(model):
        raise ValueError("train.cas is true but model.cas_layers is empty; set model.cas_layers or train.cas=false")
    train_set, val_set, test_set = build_datasets(config["data"])
    trainer = Trainer(model, train_set, val_set, tcfg)
    state = trainer.train(resume=bool(config.get("resume", True)))
    acc = trainer.accelerator
    out = Path(config["output_dir"])
    selected = out / "best" if (out / "best").exists() else out / "final"
    robust = from_pretrained(selected).to(acc.device)
    report = evaluate_model(robust, test_set, config, accelerator=acc)
    summary = {"method": method, "cas": tcfg.cas, "steps": state.global_step, "best_step": state.best_step,
               "validation": state.history, "selected": selected.name, "test": report.summary()}
    if acc.is_main_process:
        from .hub import write_hub_folder
        hub = config["hub"]
        data_name = str(config["data"]["name"])
        model_id = hub.get("model_id") or f"casify-{method}{'-cas' if tcfg.cas else ''}"
        write_hub_folder(robust, out / "hub", model_id, evaluation=report.summary(), dataset_name=data_name,
                         dataset_type=data_name, split=config["eval"].get("split", "test"))
        report.save(out / "hub")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if hub.get("push"):
            if not hub.get("model_id"):
                raise ValueError("--push_to_hub needs --hub_model_id user/name")
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo(hub["model_id"], private=bool(hub.get("private")), exist_ok=True)
            api.upload_folder(repo_id=hub["model_id"], folder_path=str(out / "hub"),
                              commit_message=f"casify {method}{'+CAS' if tcfg.cas else ''}")
        print(json.dumps(summary["test"], indent=1))
    acc.wait_for_everyone()
    return summary


def main(method: str, argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=f"Adversarial fine-tuning with {method.upper()} (optionally +CAS)")
    parser.add_argument("--config", help="YAML file (see recipes/configs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set train.epochs=5 --set model.name=resnet18")
    parser.add_argument("--output_dir")
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--no_resume", action="store_true", help="start afresh even if output_dir has a checkpoint")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    config_method = config.pop("method", None)
    if config_method and config_method != method:
        raise ValueError(f"{args.config} is a {config_method} config; run it with recipes/finetune_{config_method}.py")
    if args.output_dir:
        config["output_dir"] = args.output_dir
    if args.max_steps:
        config["train"]["max_steps"] = args.max_steps
    if args.no_resume:
        config["resume"] = False
    if args.push_to_hub:
        config["hub"]["push"] = True
    if args.hub_model_id:
        config["hub"]["model_id"] = args.hub_model_id
    return run(config, method)
