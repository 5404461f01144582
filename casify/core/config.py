"""``DefenseConfig``: everything that decides what a wrapped model is, as one typed, versioned value.

The same value flows both ways (the pattern of PEFT's ``PeftConfig``): ``casify.wrap(model, config)`` builds a model
from it, the rewrite returns it *resolved* (layer names instead of patterns / ``"auto"``, the channel axis and count
of every layer, the class count, the normalisation's mean and std), ``save_pretrained`` writes its
:meth:`DefenseConfig.to_dict` as ``config.json``, and ``from_pretrained`` reads it back with :meth:`DefenseConfig.from_dict`
and calls ``wrap`` with it: one path for a fresh wrap and for a load.

The wire format is the JSON casify has always written (``{"base_model", "cas": {...}, "defense": {"name",
"options"}, "normalize", "class_names", "versions"}``); ``config_version`` (see
:data:`casify.core.config_validation.CONFIG_VERSION`) says which layout a dict has: 2 added the ``defense`` section, and
a dict without one (version 1, or no version at all) is read as CAS. Untrusted dicts are checked by
:func:`casify.core.config_validation.validate_config` before they become a ``DefenseConfig`` (``from_dict(d, validate=True)``,
:meth:`DefenseConfig.from_json_file`).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .config_validation import CONFIG_VERSION, FORMAT, LoadError, read_config, validate_config

FILE_KEYS = ("format", "weights_sha256", "weights_dtype")
"""Top-level keys that describe one saved file, not the model: written at save time, never carried by a config."""

CAS_KEYS = ("layers", "init", "suppress", "num_classes", "channel_dims", "channels", "input_size")


@dataclass
class DefenseConfig:
    """What to wrap and how; resolved by ``wrap`` (see the module docstring).

    Attributes:
        layers: before wrapping, names, ``"re:<regex>"`` strings, compiled patterns or ``"auto"``; resolved: the
            layer names in graph order (``[]``: no CAS, normalisation and save/load only).
        defense: the registered defense inserted at every layer (:mod:`casify.defenses`: ``"cas"``, ``"cifs"``,
            ``"fsr"``, or a user's own); defense_options: its options (checked against the defense's ``OPTIONS``);
            layer_options: per-layer overrides of those options, ``{layer name: {option: value}}`` (CIFS as its
            authors built it: an MLP probe on ``layer4.0``, a linear one on ``layer4.1``).
        init: ``"identity"`` (function-preserving) or ``"paper"``; None: the defense's own default (resolved).
        suppress: apply the channel mask (CAS only; False: the Table 2 ablation).
        normalize: before wrapping ``"auto"``, ``"imagenet"``, ``(mean, std)``, a dict or None; resolved: a
            ``{"mean": [...], "std": [...]}`` dict or None.
        num_classes: classes of the auxiliary classifiers (None: the model's output width).
        channel_dims: channel axis per layer name (given, or resolved for every layer).
        channels: channels per layer (resolved only; written to the saved config for readers).
        input_size: (C, H, W) of the dummy input used to find shapes (None: timm's pretrained size or 224).
        class_names: optional names of the classes.
        base_model: how to rebuild the original (``{"source", "name", "kwargs"}``); None: inferred when saving.
        versions: library versions the model was wrapped with (resolved only).
        version: the ``config_version`` of this layout.
        extra: other top-level fields (``metrics``, ``training``, fields a caller saved), kept as inert data.
    """
    layers: Any = "auto"
    init: Optional[str] = None
    suppress: bool = True
    defense: str = "cas"
    defense_options: Dict[str, Any] = field(default_factory=dict)
    layer_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    normalize: Any = "auto"
    num_classes: Optional[int] = None
    channel_dims: Dict[str, int] = field(default_factory=dict)
    channels: Dict[str, int] = field(default_factory=dict)
    input_size: Optional[Tuple[int, ...]] = None
    class_names: Optional[List[str]] = None
    base_model: Optional[dict] = None
    versions: Optional[dict] = None
    version: int = CONFIG_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.channel_dims = dict(self.channel_dims or {})
        self.defense_options = dict(self.defense_options or {})
        self.layer_options = {str(k): dict(v) for k, v in (self.layer_options or {}).items()}
        self.channels = dict(self.channels or {})
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)
        if self.class_names is not None:
            self.class_names = list(self.class_names)

    # -- the wire format ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON-able dict ``config.json`` holds (without the file fields ``format`` and ``weights_sha256``,
        which ``save_pretrained`` adds), and ``model.casify_config`` is."""
        cas = {"layers": _layers_to_json(self.layers), "init": self.init, "suppress": bool(self.suppress),
               "num_classes": None if self.num_classes is None else int(self.num_classes),
               "channel_dims": dict(self.channel_dims), "channels": dict(self.channels),
               "input_size": None if self.input_size is None else list(self.input_size)}
        out = {"base_model": copy.deepcopy(self.base_model), "cas": cas,
               "defense": self._defense_to_json(),
               "normalize": _normalize_to_json(self.normalize),
               "class_names": None if self.class_names is None else list(self.class_names),
               "versions": copy.deepcopy(self.versions), "config_version": int(self.version)}
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    def _defense_to_json(self) -> dict:
        """The ``defense`` section; ``layer_options`` only when some layer has its own (older folders stay as they
        were written)."""
        out = {"name": self.defense, "options": copy.deepcopy(self.defense_options)}
        if self.layer_options:
            out["layer_options"] = copy.deepcopy(self.layer_options)
        return out

    @classmethod
    def from_dict(cls, data: dict, *, validate: bool = False, source: str = "config") -> "DefenseConfig":
        """Read a dict written by :meth:`to_dict` (or any casify's ``config.json``, older layouts included).

        ``validate=True`` first checks it as untrusted data (:func:`casify.core.config_validation.validate_config`);
        ``from_pretrained`` reads configs that :func:`casify.core.config_validation.read_config` already checked.
        """
        if validate:
            data = validate_config({"format": FORMAT, **data}, source)
        data = _upgrade(dict(data), source)
        cas = dict(data.get("cas") or {})
        defense = dict(data.get("defense") or {})
        known = {"base_model", "cas", "defense", "normalize", "class_names", "versions", "config_version", *FILE_KEYS}
        return cls(layers=list(cas.get("layers", [])), init=cas.get("init", "identity"),
                   suppress=cas.get("suppress", True), defense=defense.get("name", "cas"),
                   defense_options=copy.deepcopy(defense.get("options") or {}),
                   layer_options=copy.deepcopy(defense.get("layer_options") or {}),
                   normalize=copy.deepcopy(data.get("normalize")),
                   num_classes=cas.get("num_classes"), channel_dims=cas.get("channel_dims") or {},
                   channels=cas.get("channels") or {}, input_size=cas.get("input_size"),
                   class_names=data.get("class_names"), base_model=copy.deepcopy(data.get("base_model")),
                   versions=copy.deepcopy(data.get("versions")), version=CONFIG_VERSION,
                   extra={k: copy.deepcopy(v) for k, v in data.items() if k not in known and v is not None})

    @classmethod
    def from_json_file(cls, path) -> "DefenseConfig":
        """A saved ``config.json``, read and checked as untrusted data (bounded size, strict JSON, every field)."""
        return cls.from_dict(read_config(path))

    def replace(self, **changes) -> "DefenseConfig":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_resolved(self) -> bool:
        """Whether ``layers`` are concrete names (a config returned by ``wrap`` or read from a folder)."""
        return isinstance(self.layers, list) and all(
            isinstance(l, str) and l != "auto" and not l.startswith("re:") for l in self.layers)


@dataclass(frozen=True)
class SavedConfig:
    """A saved folder's ``config.json``, read once: the model it describes (upgraded to :data:`CONFIG_VERSION`) and
    the checked dict as written, whose file fields describe the weights beside it."""
    config: DefenseConfig
    checked: dict

    @property
    def base_spec(self) -> dict:
        return self.config.base_model

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def weights_dtype(self) -> Optional[str]:
        """The dtype the floating-point weights were saved in (None: an older folder that did not record it)."""
        return self.checked.get("weights_dtype")


def read_saved_config(path) -> SavedConfig:
    """``config.json`` at ``path`` as untrusted data: bounded read, every field and the base spec checked
    (:func:`casify.core.config_validation.read_config`), then upgraded: one step from a file to what is built."""
    checked = read_config(path)
    return SavedConfig(DefenseConfig.from_dict(checked, source=str(path)), checked)


def _upgrade(data: dict, source: str) -> dict:
    """Bring an older layout up to :data:`CONFIG_VERSION`. Version 1 (also every folder written before
    ``config_version`` existed) knew one defense, so it becomes version 2 with ``defense: {"name": "cas"}``; the
    ``cas`` section (placement: layers, channels, classes, init, CAS's ``suppress``) keeps its name in both."""
    version = data.get("config_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LoadError(f"{source}: refused config_version = {version!r}; expected an integer from 1 to "
                        f"{CONFIG_VERSION}")
    if version > CONFIG_VERSION:
        raise LoadError(f"{source}: config_version {version} was written by a newer casify (this one reads up to "
                        f"{CONFIG_VERSION}); upgrade casify-robust")
    if version == 1:
        data["defense"] = {"name": "cas", "options": {}}
    data["config_version"] = CONFIG_VERSION
    return data


def _layers_to_json(layers) -> Union[str, List[str]]:
    if isinstance(layers, (str, re.Pattern)):
        layers = [layers]
    return [f"re:{l.pattern}" if isinstance(l, re.Pattern) else l for l in layers]


def _normalize_to_json(normalize):
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2 and not isinstance(normalize[0], (int, float)):
        return {"mean": [float(v) for v in normalize[0]], "std": [float(v) for v in normalize[1]]}
    return copy.deepcopy(normalize)


def as_config(layers: Any = "auto", **settings) -> DefenseConfig:
    """A :class:`DefenseConfig` from ``wrap``'s keyword form (``base_spec`` is the config's ``base_model``)."""
    if "base_spec" in settings:
        settings["base_model"] = settings.pop("base_spec")
    if isinstance(layers, (str, re.Pattern)):
        layers = [layers] if not (isinstance(layers, str) and layers == "auto") else "auto"
    elif isinstance(layers, Sequence):
        layers = list(layers)
    return DefenseConfig(layers=layers, **settings)
