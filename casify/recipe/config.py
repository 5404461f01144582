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

from ..defenses import validate_options
from ..core.eps import parse_eps
from ..evaluate.plan import SUITES
from ..train.config import METHODS, TrainConfig

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
    """Which registered defense is inserted (``model.defense``), its options (``model.defense_options``) and
    per-layer overrides of them (``model.defense_layer_options: {layer4.0: {probe: mlp}}``)."""
    name: str = "cas"
    options: Dict[str, Any] = field(default_factory=dict)
    layer_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)


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
    split: str = "test"
    suite: str = "quick"
    max_examples: Optional[int] = 1000
    batch_size: int = 256
    eps: float = field(kw_only=True)  # no default: null in the YAML, the training eps unless set
    seed: int = 0


@dataclass(frozen=True)
class HubSection:
    """Publishing: checked here, once, before anything is built (not after hours of training)."""
    push: bool = False
    model_id: Optional[str] = None
    private: bool = False
    force: bool = False

    def __post_init__(self):
        for name in ("push", "private", "force"):
            object.__setattr__(self, name, bool(getattr(self, name)))  # null in the YAML: off
        if self.push and not self.model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id user/name (or hub.model_id in the config)")
        if self.model_id is not None and (not isinstance(self.model_id, str) or self.model_id.count("/") != 1):
            raise ConfigError(f"hub.model_id must be a Hub repo id 'user/name', got {self.model_id!r}")


@dataclass(frozen=True)
class Recipe:
    """A whole run, typed: what :func:`casify.recipe.run` trains, evaluates and publishes. Frozen: a field is not
    reassigned (``dataclasses.replace`` makes a changed copy). ``method`` and ``output_dir`` are ``train``'s (a copy
    where they disagree is refused); the training attack is read off ``train``."""
    method: str
    model: ModelSection
    defense: DefenseSection
    data: DataSection
    train: TrainConfig  # method and output_dir filled in
    eval: EvalSection
    hub: HubSection
    output_dir: str
    resume: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if (self.method, self.output_dir) != (self.train.method, self.train.output_dir):
            raise ValueError(f"Recipe.method / output_dir ({self.method!r}, {self.output_dir!r}) must equal train's "
                             f"({self.train.method!r}, {self.train.output_dir!r}): replace both together")

    @property
    def attack(self) -> TrainingAttack:
        return TrainingAttack(eps=self.train.eps, steps=self.train.attack_steps, alpha=self.train.attack_alpha)

    def identity(self) -> dict:
        """What identifies the run beyond its TrainConfig (the run folder's record): the model and data settings,
        spelled as the YAML spells them, so run folders written by earlier versions resume."""
        model = {**dataclasses.asdict(self.model), "defense": self.defense.name,
                 "defense_options": dict(self.defense.options)}
        if self.defense.layer_options:  # absent when unused: earlier run folders keep their identity
            model["defense_layer_options"] = {k: dict(v) for k, v in self.defense.layer_options.items()}
        return {"recipe": {"model": model, "data": dataclasses.asdict(self.data)}}


# -- the YAML's shape, read off the typed sections -------------------------------------------------------------------
def _field_defaults(section, yaml_names: Optional[Dict[str, str]] = None, skip: Sequence[str] = ()) -> dict:
    """A section's settings as the YAML spells them (``yaml_names``: field -> key where they differ), with the
    dataclass's defaults; a field with none is null in the YAML (the typed recipe fills it in, e.g. eval.eps from the
    training eps). Written once, here: the dataclasses are the schema."""
    out = {}
    for f in dataclasses.fields(section):
        if f.name in skip:
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[(yaml_names or {}).get(f.name, f.name)] = None if value is dataclasses.MISSING else value
    return out


# The training attack (eps, attack_steps, attack_alpha) is written in `train:` because those settings are part of
# every run folder's recorded identity (run_config.json); the typed recipe gives them their own section
# (:class:`TrainingAttack`). The defense is written in `model:` (defense, defense_options, defense_layer_options), as
# earlier versions wrote it, so run names and run folders stay the same.
DEFAULTS = {
    "model": {**_field_defaults(ModelSection),
              **_field_defaults(DefenseSection, {"name": "defense", "options": "defense_options",
                                                 "layer_options": "defense_layer_options"})},
    "data": _field_defaults(DataSection),
    "train": {},  # TrainConfig's own defaults, filled in when it is built
    "eval": _field_defaults(EvalSection, skip=("seed",)),  # the seed is the training seed
    "hub": _field_defaults(HubSection),
    # output_dir None: outputs/<method>-<model>-<data>-s<seed>-<hash of every setting>, see run_name()
    **_field_defaults(Recipe, skip=("method", "model", "defense", "data", "train", "eval", "hub")),
}
TOP_LEVEL = set(DEFAULTS) | {"method"}
FREE_FORM = {("model", "kwargs"), ("data", "kwargs"), ("model", "normalize"), ("eval", "eps"),
             ("model", "defense_layer_options")}  # checked elsewhere
SET_OPTION = "the command line (--set)"
FLAGS = "the command line"  # --output_dir, --max_steps, --push_to_hub, ...


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
                   overwrite=args.overwrite, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id or None,
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


class _Invalid(Exception):
    """A check failed; :func:`load_recipe` adds where the setting came from (the file or the command line)."""


def _check_keys_and_types(config: dict) -> None:
    """Every key known, every value of the right type: a typo is an error naming the closest known setting, not a
    silently ignored line."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "output_dir"}
    for key in config:
        if key not in TOP_LEVEL:
            raise _Invalid(f"unknown setting {key!r}{_closest(key, TOP_LEVEL)} (known: {sorted(TOP_LEVEL)})")
    for section in ("model", "data", "eval", "hub", "train"):
        values = config.get(section)
        if not isinstance(values, dict):
            raise _Invalid(f"{section} must be a mapping of settings, got {values!r}")
        known = train_fields if section == "train" else set(DEFAULTS[section])
        for key, value in values.items():
            if key not in known:
                raise _Invalid(f"unknown setting {section}.{key}{_closest(key, known)} "
                               f"(known {section} settings: {sorted(known)})")
            default = None if section == "train" else DEFAULTS[section][key]
            if (section, key) in FREE_FORM or default is None or value is None:
                continue
            expected = (int, float) if isinstance(default, (int, float)) and not isinstance(default, bool) else type(default)
            if key == "cas_layers":
                expected = (str, list)
            if not isinstance(value, expected) or isinstance(value, bool) and not isinstance(default, bool):
                raise _Invalid(f"{section}.{key} must be a {type(default).__name__} like {default!r}, got {value!r}")
    for key in ("resume", "overwrite"):
        if not isinstance(config.get(key), bool):
            raise _Invalid(f"{key} must be true or false, got {config.get(key)!r}")
    if config.get("output_dir") is not None and not isinstance(config["output_dir"], str):
        raise _Invalid(f"output_dir must be a folder path, got {config['output_dir']!r}")
    method = config.get("method")
    if method is not None and method not in METHODS:
        raise _Invalid(f"method must be one of {METHODS}, got {method!r}")


def run_name(config: dict, method: str) -> str:
    """A default output folder named after the run: what it trains, and a hash of every setting that changes it
    (the settings as written, so the name is the one earlier versions gave the same recipe)."""
    model = {k: v for k, v in config["model"].items() if k != "defense_layer_options" or v}  # new: absent if unused
    record = {"method": method, "model": model, "data": config["data"], "train": config["train"]}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(str(config["model"].get("name") or "model")).name.replace(":", "-")
    data = Path(str(config["data"].get("name") or "data").split(":")[-1]).stem
    cas = "-cas" if config["train"].get("cas", True) else ""
    return f"outputs/{method}{cas}-{model}-{data}-s{config['train'].get('seed', 0)}-{digest}"


def _flag_settings(cli: CommandLine) -> Dict[tuple, Any]:
    """The settings the command's flags write (key path -> value); a flag not given writes nothing."""
    flags = {("output_dir",): cli.output_dir, ("train", "max_steps"): cli.max_steps,
             ("resume",): False if cli.no_resume else None, ("overwrite",): True if cli.overwrite else None,
             ("hub", "push"): True if cli.push_to_hub else None, ("hub", "model_id"): cli.hub_model_id or None,
             ("hub", "force"): True if cli.force_push else None}
    return {key: value for key, value in flags.items() if value is not None}


def _apply_command_line(config: dict, cli: CommandLine) -> None:
    for key, value in _flag_settings(cli).items():
        node = config
        for part in key[:-1]:
            if not isinstance(node.get(part), dict):
                raise _Invalid(f"{part} must be a mapping of settings, got {node.get(part)!r}")
            node = node[part]
        node[key[-1]] = value


def _checked(config: dict, method: Optional[str], sources: Dict[str, str]) -> Recipe:
    """Check and type a merged mapping (``method``: the command's, if any); raises :class:`_Invalid` or
    :class:`ConfigError` (a contradiction whose message says where each side came from)."""
    _check_keys_and_types(config)
    written = config.pop("method", None)
    if method and written and method != written:
        where = sources.get("method", "config")
        if where == SET_OPTION:
            raise ConfigError(f"--set method={written} contradicts the command's method {method}; drop one of the two")
        raise ConfigError(f"{where} says method: {written}, but the command asks for {method}: run it with "
                          f"recipes/finetune_{written}.py or casify train --config {where}, or drop one of the two")
    return _typed(config, method or written or "at")


def load_recipe(path: Optional[str] = None, cli: Optional[CommandLine] = None) -> Recipe:
    """Read, check and type a recipe once: defaults < ``path`` < ``cli.overrides`` (``--set``) < the command's flags.

    An error names where the bad setting came from. The mapping is checked once; only when that check fails is it
    repeated on the file alone, then with ``--set``, and the first of those that fails the same way is named."""
    cli = cli or CommandLine()
    stages = [(path or "config", _merge(DEFAULTS, _read_file(path)))]
    config = copy.deepcopy(stages[0][1])
    for item in cli.overrides:
        _set(config, item)
    stages.append((SET_OPTION, copy.deepcopy(config)))
    method_source = SET_OPTION if any(o.split("=", 1)[0].strip() == "method" for o in cli.overrides) else path
    try:
        _apply_command_line(config, cli)
        return _checked(config, cli.method, {"method": method_source or "config"})
    except _Invalid as failure:
        message = str(failure)
        for source, stage in stages:
            try:
                _checked(copy.deepcopy(stage), None, {})
            except (_Invalid, ConfigError) as earlier:
                if str(earlier) == message:
                    raise ConfigError(f"{source}: {message}") from None
            except Exception:  # a stage that fails otherwise (e.g. a flag's section is not a mapping there yet)
                pass
        raise ConfigError(f"{FLAGS if _flag_settings(cli) else SET_OPTION}: {message}") from None


def _typed(config: dict, method: str) -> Recipe:
    model = dict(config["model"])
    layer_options = model.pop("defense_layer_options") or {}
    if not isinstance(layer_options, dict) or not all(isinstance(v, dict) for v in layer_options.values()):
        raise _Invalid(f"model.defense_layer_options must map layer names to option mappings, e.g. "
                       f"{{layer4.0: {{probe: mlp}}}}; got {layer_options!r}")
    defense = DefenseSection(name=model.pop("defense") or DefenseSection.name, options=dict(model.pop("defense_options") or {}),
                             layer_options={str(k): dict(v) for k, v in layer_options.items()})
    try:
        validate_options(defense.name, defense.options, where="model.defense_options")
        for layer, overrides in defense.layer_options.items():
            validate_options(defense.name, {**defense.options, **overrides},
                             where=f"model.defense_layer_options[{layer!r}]")
    except ValueError as e:
        raise _Invalid(f"model.defense: {e}") from None
    try:
        hub = HubSection(**config["hub"])
    except ConfigError as e:
        raise _Invalid(str(e)) from None
    output_dir = config["output_dir"] or run_name(config, method)
    try:
        train = TrainConfig(**{**config["train"], "method": method, "output_dir": output_dir})
    except (TypeError, ValueError) as e:
        raise _Invalid(str(e)) from None
    ev = dict(config["eval"])
    if ev["suite"] not in SUITES:
        raise _Invalid(f"eval.suite must be one of {SUITES}, got {ev['suite']!r}")
    eps = ev.pop("eps")
    try:
        eval_eps = train.eps if eps is None else parse_eps(eps)
    except ValueError as e:
        raise _Invalid(f"eval.eps: {e}") from None
    if eval_eps <= 0:
        raise _Invalid(f"eval.eps must be above 0 (e.g. 8/255), got {eps!r}")
    if not model.get("name"):  # last: the checks above run first, whichever source holds the name
        raise _Invalid("model.name is required (a timm name, 'torchvision:<name>', or a casify folder)")
    return Recipe(method=method, model=ModelSection(**model), defense=defense, data=DataSection(**config["data"]),
                  train=train, eval=EvalSection(eps=eval_eps, seed=train.seed, **ev), hub=hub, output_dir=output_dir,
                  resume=config["resume"], overwrite=config["overwrite"])
