"""A recipe, read and checked once: defaults < the YAML file < ``--set key.sub=value`` < the command's flags, turned
into a typed :class:`Recipe` with one section per concern before anything is built.

Everything downstream (:func:`casify.recipe.run`) receives these sections, never the raw mapping; a mistake is an
error naming the setting, the closest known one and where it came from (the file, or the command line), raised here
and only here.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from .defenses import validate_options
from .eps import parse_eps
from .evaluate.plan import SUITES
from .train.config import METHODS, TrainConfig

# The YAML's shape, with its defaults. The training attack (eps, attack_steps, attack_alpha) is written in `train:`
# because those settings are part of every run folder's recorded identity (run_config.json); the typed recipe gives
# them their own section (:class:`TrainingAttack`).
DEFAULTS = {
    "model": {"name": None, "pretrained": False, "checkpoint": None, "kwargs": {}, "cas_layers": "auto",
              "init": None, "suppress": True, "normalize": "auto", "input_size": None, "defense": "cas",
              "defense_options": {}},
    "data": {"name": "digits", "root": None, "download": False, "augment": True, "val_size": None, "image_size": None,
             "test": None, "kwargs": {}},
    "train": {},
    "eval": {"split": "test", "suite": "quick", "max_examples": 1000, "batch_size": 256, "eps": None},
    "hub": {"push": False, "model_id": None, "private": False, "force": False},
    "output_dir": None,  # None: outputs/<method>-<model>-<data>-s<seed>-<hash of every setting>, see run_name()
    "resume": True,
    "overwrite": False,
}
TOP_LEVEL = set(DEFAULTS) | {"method"}
FREE_FORM = {("model", "kwargs"), ("data", "kwargs"), ("model", "normalize"), ("eval", "eps")}  # checked elsewhere
COMMAND_LINE = "the command line (--set)"
FLAGS = "the command line"  # --output_dir, --max_steps, --push_to_hub, ...


class ConfigError(ValueError):
    """A recipe setting is unknown or has the wrong type; raised before anything is built or trained."""


# -- the typed sections ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSection:
    """The base model (a timm name, ``torchvision:<name>`` or a saved casify folder) and where the defense goes."""
    name: Optional[str] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    cas_layers: Union[str, List[str], None] = "auto"
    init: Optional[str] = None
    suppress: bool = True
    normalize: Any = "auto"
    input_size: Optional[List[int]] = None


@dataclass(frozen=True)
class DefenseSection:
    """Which registered defense is inserted (``model.defense``) and its options (``model.defense_options``)."""
    name: str = "cas"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSection:
    """The dataset (:func:`casify.data.build_dataset` names), its held-out split and the test source."""
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    augment: bool = True
    val_size: Optional[int] = None
    image_size: Optional[int] = None
    test: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingAttack:
    """The attack that crafts the training examples (pixel units, inputs in [0, 1])."""
    eps: float
    steps: int
    alpha: Optional[float]


@dataclass(frozen=True)
class EvalSection:
    """The final evaluation of the selected model: its own radius (default: the training eps) and suite."""
    eps: float
    suite: str = "quick"
    split: str = "test"
    max_examples: Optional[int] = 1000
    batch_size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class HubSection:
    """Publishing: checked here, once, before anything is built (not after hours of training)."""
    push: bool = False
    model_id: Optional[str] = None
    private: bool = False
    force: bool = False

    def __post_init__(self):
        if self.push and not self.model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id user/name (or hub.model_id in the config)")
        if self.model_id is not None and (not isinstance(self.model_id, str) or self.model_id.count("/") != 1):
            raise ConfigError(f"hub.model_id must be a Hub repo id 'user/name', got {self.model_id!r}")


@dataclass(frozen=True)
class Recipe:
    """A whole run, typed: what :func:`casify.recipe.run` trains, evaluates and publishes."""
    method: str
    model: ModelSection
    defense: DefenseSection
    data: DataSection
    train: TrainConfig  # method and output_dir filled in
    attack: TrainingAttack
    eval: EvalSection
    hub: HubSection
    output_dir: str
    resume: bool = True
    overwrite: bool = False

    def identity(self) -> dict:
        """What identifies the run beyond its TrainConfig (the run folder's record): the model and data settings,
        spelled as the YAML spells them, so run folders written by earlier versions resume."""
        model = {**dataclasses.asdict(self.model), "defense": self.defense.name,
                 "defense_options": dict(self.defense.options)}
        return {"recipe": {"model": model, "data": dataclasses.asdict(self.data)}}


@dataclass
class CommandLine:
    """What the command's flags set (``casify train`` / ``recipes/finetune_*.py``): applied after ``--set``."""
    overrides: Sequence[str] = ()
    method: Optional[str] = None
    output_dir: Optional[str] = None
    max_steps: Optional[int] = None
    no_resume: bool = False
    overwrite: bool = False
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    force_push: bool = False

    @classmethod
    def from_args(cls, args, method: Optional[str] = None) -> "CommandLine":
        """From parsed :func:`casify_cli.add_train_arguments` options."""
        return cls(overrides=tuple(args.set or ()), method=method or getattr(args, "method", None),
                   output_dir=args.output_dir, max_steps=args.max_steps, no_resume=args.no_resume,
                   overwrite=args.overwrite, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
                   force_push=args.force_push)


# -- reading ---------------------------------------------------------------------------------------------------------
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


def _set(config: dict, dotted: str) -> tuple:
    """Apply one ``key.sub=value``; returns the key's path (the settings the command line wrote)."""
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
    return tuple(parts)


def _read_file(path: Optional[str]) -> dict:
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, ...), got {type(data).__name__}")
    unknown = set(data) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}"
                          f"{_closest(sorted(unknown)[0], TOP_LEVEL)} known: {sorted(TOP_LEVEL)}")
    return data


class _Sources:
    """Where each setting came from, so an error names the file or the command line (the one that wrote it)."""

    def __init__(self, path: Optional[str], written: dict):
        self.path, self.written = path or "config", written  # written: key path -> who wrote it

    def of(self, *key: str) -> str:
        for w, source in self.written.items():
            if w[:len(key)] == key or key[:len(w)] == w:  # it, a parent or a child
                return source
        return self.path

    def of_message(self, section: str, message: str) -> str:
        """For an error raised by a section's own checks: the command line if it wrote a setting the message names."""
        for k, source in self.written.items():
            if k[0] == section and len(k) > 1 and k[1] in message:
                return source
        return self.path


def _check_keys_and_types(config: dict, sources: _Sources) -> None:
    """Every key known, every value of the right type: a typo is an error naming the closest known setting, not a
    silently ignored line."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "output_dir"}
    for key in config:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{sources.of(key)}: unknown setting {key!r}{_closest(key, TOP_LEVEL)} "
                              f"(known: {sorted(TOP_LEVEL)})")
    for section in ("model", "data", "eval", "hub", "train"):
        values = config.get(section)
        if not isinstance(values, dict):
            raise ConfigError(f"{sources.of(section)}: {section} must be a mapping of settings, got {values!r}")
        known = train_fields if section == "train" else set(DEFAULTS[section])
        for key, value in values.items():
            where = sources.of(section, key)
            if key not in known:
                raise ConfigError(f"{where}: unknown setting {section}.{key}{_closest(key, known)} "
                                  f"(known {section} settings: {sorted(known)})")
            default = None if section == "train" else DEFAULTS[section][key]
            if (section, key) in FREE_FORM or default is None or value is None:
                continue
            expected = (int, float) if isinstance(default, (int, float)) and not isinstance(default, bool) else type(default)
            if key == "cas_layers":
                expected = (str, list)
            if not isinstance(value, expected) or isinstance(value, bool) and not isinstance(default, bool):
                raise ConfigError(f"{where}: {section}.{key} must be a {type(default).__name__} like {default!r}, "
                                  f"got {value!r}")
    for key in ("resume", "overwrite"):
        if not isinstance(config.get(key), bool):
            raise ConfigError(f"{sources.of(key)}: {key} must be true or false, got {config.get(key)!r}")
    if config.get("output_dir") is not None and not isinstance(config["output_dir"], str):
        raise ConfigError(f"{sources.of('output_dir')}: output_dir must be a folder path, got {config['output_dir']!r}")
    method = config.get("method")
    if method is not None and method not in METHODS:
        raise ConfigError(f"{sources.of('method')}: method must be one of {METHODS}, got {method!r}")


def run_name(config: dict, method: str) -> str:
    """A default output folder named after the run: what it trains, and a hash of every setting that changes it
    (the settings as written, so the name is the one earlier versions gave the same recipe)."""
    record = {"method": method, "model": config["model"], "data": config["data"], "train": config["train"]}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(str(config["model"].get("name") or "model")).name.replace(":", "-")
    data = Path(str(config["data"].get("name") or "data").split(":")[-1]).stem
    cas = "-cas" if config["train"].get("cas", True) else ""
    return f"outputs/{method}{cas}-{model}-{data}-s{config['train'].get('seed', 0)}-{digest}"


def _apply_command_line(config: dict, cli: CommandLine, written: dict) -> None:
    flags = {("output_dir",): cli.output_dir, ("train", "max_steps"): cli.max_steps,
             ("resume",): False if cli.no_resume else None, ("overwrite",): True if cli.overwrite else None,
             ("hub", "push"): True if cli.push_to_hub else None, ("hub", "model_id"): cli.hub_model_id,
             ("hub", "force"): True if cli.force_push else None}
    for key, value in flags.items():
        if value is not None:
            node = config
            for part in key[:-1]:
                node = node[part]
            node[key[-1]] = value
            written[key] = FLAGS


def _resolve_method(config: dict, cli: CommandLine, path: Optional[str]) -> str:
    written = config.pop("method", None)
    if cli.method and written and cli.method != written:
        raise ConfigError(f"{path} is a {written} config but the command asks for {cli.method}: run it with "
                          f"recipes/finetune_{written}.py or casify train --config {path}, or drop one of the two")
    return cli.method or written or "at"


def load_recipe(path: Optional[str] = None, cli: Optional[CommandLine] = None) -> Recipe:
    """Read, check and type a recipe in one pass: defaults < ``path`` < ``cli.overrides`` (``--set``) < the flags."""
    cli = cli or CommandLine()
    config = _merge(DEFAULTS, _read_file(path))
    written: dict = {}
    for item in cli.overrides:
        written[_set(config, item)] = COMMAND_LINE
    _apply_command_line(config, cli, written)
    sources = _Sources(path, written)
    _check_keys_and_types(config, sources)
    method = _resolve_method(config, cli, path)
    return _typed(config, method, sources)


def _typed(config: dict, method: str, sources: _Sources) -> Recipe:
    model = dict(config["model"])
    defense = DefenseSection(name=model.pop("defense") or "cas", options=dict(model.pop("defense_options") or {}))
    try:
        validate_options(defense.name, defense.options, where="model.defense_options")
    except ValueError as e:
        raise ConfigError(f"{sources.of('model', 'defense')}: model.defense: {e}") from None
    try:
        hub = HubSection(**config["hub"])
    except ConfigError as e:
        raise ConfigError(f"{sources.of_message('hub', str(e))}: {e}") from None
    output_dir = config["output_dir"] or run_name(config, method)
    try:
        train = TrainConfig(**{**config["train"], "method": method, "output_dir": output_dir})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{sources.of_message('train', str(e))}: {e}") from None
    ev = dict(config["eval"])
    if ev["suite"] not in SUITES:
        raise ConfigError(f"{sources.of('eval', 'suite')}: eval.suite must be one of {SUITES}, got {ev['suite']!r}")
    try:
        eval_eps = train.eps if ev.pop("eps") is None else parse_eps(config["eval"]["eps"])
    except ValueError as e:
        raise ConfigError(f"{sources.of('eval', 'eps')}: eval.eps: {e}") from None
    return Recipe(method=method, model=ModelSection(**model), defense=defense, data=DataSection(**config["data"]),
                  train=train, attack=TrainingAttack(eps=train.eps, steps=train.attack_steps, alpha=train.attack_alpha),
                  eval=EvalSection(eps=eval_eps, seed=train.seed, **ev), hub=hub, output_dir=output_dir,
                  resume=config["resume"], overwrite=config["overwrite"])
