"""What the fine-tuning recipes share: read a YAML config, build data and model, train, evaluate, publish.

The scripts under ``recipes/`` only pick the method; everything a library user would need lives here or below, so
``python recipes/finetune_at.py --config ...`` and ``accelerate launch recipes/finetune_at.py --config ...`` run the
same code on one CPU or on many GPUs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch import nn

from .defenses import find_defense_modules, validate_options
from .data import build_dataset
from .hub import from_pretrained
from .spec import infer_base_spec
from .surgery import wrap
from .train import TrainConfig, Trainer

DEFAULTS = {
    "model": {"name": None, "pretrained": False, "checkpoint": None, "kwargs": {}, "cas_layers": "auto",
              "init": None, "suppress": True, "normalize": "auto", "input_size": None, "defense": "cas",
              "defense_options": {}},
    "data": {"name": "digits", "root": None, "download": False, "augment": True, "val_size": None, "image_size": None,
             "test": None, "kwargs": {}},
    "train": {},
    "eval": {"split": "test", "suite": "quick", "max_examples": 1000, "batch_size": 256},
    "hub": {"push": False, "model_id": None, "private": False, "force": False},
    "output_dir": None,  # None: outputs/<method>-<model>-<data>-s<seed>-<hash of every setting>, see run_name()
    "resume": True,
    "overwrite": False,
}
TOP_LEVEL = set(DEFAULTS) | {"method"}
FREE_FORM = {("model", "kwargs"), ("data", "kwargs"), ("model", "normalize")}  # passed on to other libraries as given


class ConfigError(ValueError):
    """A recipe setting is unknown or has the wrong type; raised before anything is built or trained."""


def _closest(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set(config: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"--set expects key.sub=value, got {dotted!r}")
    key, raw = dotted.split("=", 1)
    node = config
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def validate_config(config: dict, source: str = "config") -> dict:
    """Every key known, every value of the right type, before anything is built: a typo is an error naming the
    closest known setting, not a silently ignored line."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "output_dir"}
    for key in config:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown setting {key!r}{_closest(key, TOP_LEVEL)} (known: {sorted(TOP_LEVEL)})")
    for section in ("model", "data", "eval", "hub", "train"):
        values = config.get(section)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section} must be a mapping of settings, got {values!r}")
        known = train_fields if section == "train" else set(DEFAULTS[section])
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown setting {section}.{key}{_closest(key, known)} "
                                  f"(known {section} settings: {sorted(known)})")
            default = None if section == "train" else DEFAULTS[section][key]
            if (section, key) in FREE_FORM or default is None or value is None:
                continue
            expected = (int, float) if isinstance(default, (int, float)) and not isinstance(default, bool) else type(default)
            if key == "cas_layers":
                expected = (str, list)
            if not isinstance(value, expected) or isinstance(value, bool) and not isinstance(default, bool):
                raise ConfigError(f"{source}: {section}.{key} must be a {type(default).__name__} like {default!r}, "
                                  f"got {value!r}")
    model = config.get("model") or {}
    try:
        validate_options(model.get("defense") or "cas", model.get("defense_options"), where="model.defense_options")
    except ValueError as e:
        raise ConfigError(f"{source}: model.defense: {e}") from None
    for key in ("resume", "overwrite"):
        if not isinstance(config.get(key), bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {config.get(key)!r}")
    if config.get("output_dir") is not None and not isinstance(config["output_dir"], str):
        raise ConfigError(f"{source}: output_dir must be a folder path, got {config['output_dir']!r}")
    try:
        TrainConfig(**config["train"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> dict:
    """Defaults < the YAML file < ``--set key.sub=value`` overrides, validated (:func:`validate_config`)."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, ...), got {type(data).__name__}")
        unknown = set(data) - TOP_LEVEL
        if unknown:
            raise ConfigError(f"{path}: unknown sections {sorted(unknown)}"
                              f"{_closest(sorted(unknown)[0], TOP_LEVEL)} known: {sorted(TOP_LEVEL)}")
        config = _merge(config, data)
        validate_config(copy.deepcopy(config), path)  # the file's own mistakes name the file
    for item in overrides:
        _set(config, item)
    # what is still wrong came from --set: name the command line, not the YAML
    return validate_config(config, "the command line (--set)" if overrides else (path or "config"))


def run_name(config: dict, method: str) -> str:
    """A default output folder named after the run: what it trains, and a hash of every setting that changes it."""
    record = {"method": method, "model": config["model"], "data": config["data"], "train": config["train"]}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(str(config["model"].get("name") or "model")).name.replace(":", "-")
    data = Path(str(config["data"].get("name") or "data").split(":")[-1]).stem
    cas = "-cas" if config["train"].get("cas", True) else ""
    return f"outputs/{method}{cas}-{model}-{data}-s{config['train'].get('seed', 0)}-{digest}"


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
    base_spec = infer_base_spec(base)
    if not spec.get("pretrained") or spec.get("checkpoint"):
        base_spec.pop("hf_hub_id", None)  # the weights do not come from that Hub repo: the card must not say they do
    layers = spec.get("cas_layers")
    return wrap(base, layers if layers is not None else [], init=spec.get("init"),
                suppress=spec.get("suppress", True), normalize=spec.get("normalize", "auto"),
                input_size=spec.get("input_size"), base_spec=base_spec, defense=spec.get("defense") or "cas",
                **(spec.get("defense_options") or {}))


def build_datasets(spec: dict):
    common = dict(root=spec.get("root"), download=spec.get("download", False), val_size=spec.get("val_size"),
                  image_size=spec.get("image_size"), **(spec.get("kwargs") or {}))
    train = build_dataset(spec["name"], "train", augment=spec.get("augment", True), **common)
    val = build_dataset(spec["name"], "val", **common)
    test_source = spec.get("test") or spec["name"]
    test = build_dataset(test_source, "test", **common)
    return train, val, test


def evaluate_model(model: nn.Module, dataset, config: dict, accelerator=None):
    """Robust accuracy on the test split with the configured suite (CAS models under the adaptive attacks)."""
    from .evaluate import evaluate
    train = TrainConfig(**config["train"])
    ev = config["eval"]
    return evaluate(model, dataset, attacks=ev.get("suite", "quick"), eps=train.eps,
                    batch_size=ev.get("batch_size", 256), max_examples=ev.get("max_examples"),
                    seed=train.seed, accelerator=accelerator, progress=False)


def check_publishing(config: dict) -> None:
    """Publishing settings are checked before training, not after hours of it."""
    hub = config["hub"]
    if hub.get("push") and not hub.get("model_id"):
        raise ConfigError("--push_to_hub needs --hub_model_id user/name (or hub.model_id in the config)")
    if hub.get("model_id") is not None and (not isinstance(hub["model_id"], str) or hub["model_id"].count("/") != 1):
        raise ConfigError(f"hub.model_id must be a Hub repo id 'user/name', got {hub['model_id']!r}")


def check_hub_before_training(config: dict) -> None:
    """With ``hub.push``: the Hub is reachable and the token can write to the repo, checked before anything is built
    (:func:`casify.hub_access.check_hub_access`)."""
    if config["hub"].get("push"):
        from .hub_access import check_hub_access
        check_hub_access(config["hub"]["model_id"])


def run(config: dict, method: str) -> dict:
    """Train with ``method`` ("standard", "at", "trades", "mart") as configured; return a summary (also in
    ``<output_dir>/summary.json``).

    The seed is set before the model is built, so a paper-initialised model and its CAS modules are the same in every
    run with that seed. ``output_dir`` defaults to a folder named after the run (:func:`run_name`); a folder that holds
    another run is refused (see :meth:`casify.train.Trainer.train`).
    """
    from accelerate.utils import set_seed

    validate_config(config)
    check_publishing(config)
    check_hub_before_training(config)
    output_dir = config.get("output_dir") or run_name(config, method)
    train_cfg = dict(config["train"])
    train_cfg.update(method=method, output_dir=output_dir)
    tcfg = TrainConfig(**train_cfg)
    set_seed(tcfg.seed)
    model = build_model(config["model"])
    if tcfg.cas and not find_defense_modules(model):
        raise ValueError("train.cas is true but model.cas_layers is empty; set model.cas_layers or train.cas=false")
    train_set, val_set, test_set = build_datasets(config["data"])
    identity = {"recipe": {"model": config["model"], "data": config["data"]}}
    trainer = Trainer(model, train_set, val_set, tcfg, identity=identity)
    state = trainer.train(resume=bool(config.get("resume", True)), overwrite=bool(config.get("overwrite", False)))
    acc = trainer.accelerator
    out = Path(output_dir)
    selected = out / "best" if (out / "best").exists() else out / "final"
    robust = from_pretrained(selected).to(acc.device)
    report = evaluate_model(robust, test_set, config, accelerator=acc)
    summary = {"method": method, "cas": tcfg.cas, "output_dir": str(out), "steps": state.global_step,
               "global_batch_size": trainer.global_batch_size, "best_step": state.best_step,
               "validation": state.history, "selected": selected.name, "test": report.summary()}
    if acc.is_main_process:
        from .hub import write_hub_folder
        hub = config["hub"]
        data_name = str(config["data"]["name"])
        model_id = hub.get("model_id") or f"casify-{method}{'-cas' if tcfg.cas else ''}"
        card = dict(evaluation=report.summary(), dataset_name=data_name, dataset_type=data_name,
                    split=config["eval"].get("split", "test"))
        report.save(out / "hub")  # report + figures first: the card shows the figures, push_to_hub uploads them
        card["figures"] = report.figures
        write_hub_folder(robust, out / "hub", model_id, **card)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if hub.get("push"):
            summary["pushed"] = _publish(out / "hub", hub, f"casify {method}{'+CAS' if tcfg.cas else ''}")
        from .run_table import format_run_table
        print(format_run_table(summary))
    acc.wait_for_everyone()
    return summary


def _publish(folder: Path, hub: dict, message: str) -> bool:
    """Push the run's hub/ folder; a refusal or a failed upload keeps it and prints the command that pushes it."""
    from .push import PublishRefused, PushFailed, push_folder
    try:
        push_folder(folder, hub["model_id"], private=bool(hub.get("private")), force=bool(hub.get("force")),
                    commit_message=message)
    except (PublishRefused, PushFailed) as e:
        print(f"casify: {e}", file=sys.stderr)
        return False
    except Exception as e:  # the Hub went away since the check before training
        from .push import push_command
        print(f"casify: the push to {hub['model_id']} failed ({type(e).__name__}: {e}); the folder is kept. Push it "
              f"later with: {push_command(folder, hub['model_id'])}", file=sys.stderr)
        return False
    print(f"casify: pushed {folder} to https://huggingface.co/{hub['model_id']}")
    return True


def main(method: str, argv: Optional[Sequence[str]] = None) -> dict:
    from casify_cli import Parser, add_train_arguments
    parser = Parser(description=f"Adversarial fine-tuning with {method.upper()} (optionally +CAS)")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    config_method = config.pop("method", None)
    if config_method and config_method != method:
        raise ConfigError(f"{args.config} is a {config_method} config; run it with recipes/finetune_{config_method}.py "
                          f"or casify train --config {args.config}")
    return run_from_args(config, method, args)


def run_from_args(config: dict, method: str, args: argparse.Namespace) -> dict:
    """Apply the command line's options (:func:`casify_cli.add_train_arguments`) to ``config`` and :func:`run` it."""
    if args.output_dir:
        config["output_dir"] = args.output_dir
    if args.max_steps is not None:
        config["train"]["max_steps"] = args.max_steps
    if args.no_resume:
        config["resume"] = False
    if args.overwrite:
        config["overwrite"] = True
    if args.push_to_hub:
        config["hub"]["push"] = True
    if args.hub_model_id:
        config["hub"]["model_id"] = args.hub_model_id
    if args.force_push:
        config["hub"]["force"] = True
    validate_config(config, args.config or "config")
    check_publishing(config)
    return run(config, method)
