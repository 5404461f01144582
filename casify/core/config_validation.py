"""Checking a saved model's ``config.json`` before anything is built from it.

A config is data written by someone else (a Hub repo, a shared folder), so it is never a way in: every field
``from_pretrained`` reads has its type and size checked here, base models must be registered timm / torchvision
classifiers built from an allow-list of architectural kwargs (no hub or file prefixes, no pretrained weights, no
paths), and anything else is refused with a :class:`LoadError` that says what was refused and what would be right.
Nothing here touches the network, the file system beyond the one file, or allocates more than the config itself.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from ..defenses import DEFENSES, validate_options
from ..defenses.cas import INITS

FORMAT = "casify"
CONFIG_VERSION = 2
"""The layout of ``config.json`` that this casify writes (``config_version``): 2 names the defense and its options;
1 (and folders written before the field existed) is CAS only. A larger number was written by a newer casify."""

# Bounds: generous for real classifiers (ImageNet-21k has 21,843 classes; timm's largest inputs are under 1,000
# pixels a side), small enough that a hostile config cannot ask for terabytes or minutes.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_CLASSES = 100_000
MAX_IN_CHANS = 256
MAX_CHANNELS = 65_536
MAX_SIDE = 2048
MAX_INPUT_ELEMENTS = 3 * 2048 * 2048
MAX_LAYERS = 512
MAX_NAME_CHARS = 256
MAX_CLASS_NAME_CHARS = 1000
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16", "float64")

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # no ':' (hf-hub:, local-dir:) and no '/'
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
_POOL = re.compile(r"[a-z_]{0,16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class LoadError(RuntimeError):
    """A saved model could not be loaded as it was saved (or its config was refused)."""


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int_in(lo: int, hi: int) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an integer from {lo} to {hi}"


def _float_in(lo: float, hi: float, low_open: bool = False) -> Tuple[Callable[[Any], bool], str]:
    check = (lambda v: _is_number(v) and (lo < v if low_open else lo <= v) and v <= hi)
    return check, f"a number {'>' if low_open else '>='} {lo} and <= {hi}"


_BOOL = (lambda v: isinstance(v, bool)), "true or false"
_PROB = _float_in(0.0, 1.0)

# The only kwargs a base model may be built with: architectural settings of safe JSON scalar types. Anything that
# names weights, files, URLs or caches (pretrained, pretrained_cfg, checkpoint_path, weights, ...) is not here.
BASE_KWARGS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "num_classes": _int_in(0, MAX_CLASSES),            # timm: 0 = no head
    "in_chans": _int_in(1, MAX_IN_CHANS),
    "img_size": _int_in(1, MAX_SIDE),
    "patch_size": _int_in(1, MAX_SIDE),
    "output_stride": ((lambda v: _is_int(v) and v in (8, 16, 32)), "8, 16 or 32"),
    "global_pool": ((lambda v: isinstance(v, str) and _POOL.fullmatch(v) is not None), "a pooling name like 'avg'"),
    "width": _float_in(0.0, 16.0, low_open=True),       # casify's CIFAR ResNet / VGG width multiplier
    "width_mult": _float_in(0.0, 16.0, low_open=True),  # torchvision MobileNet / MNASNet
    "depth": _int_in(1, 1000),                          # casify's WideResNet
    "widen_factor": _int_in(1, 64),
    "drop_rate": _PROB, "drop_path_rate": _PROB, "proj_drop_rate": _PROB, "attn_drop_rate": _PROB,
    "pos_drop_rate": _PROB, "dropout": _PROB, "attention_dropout": _PROB, "stochastic_depth_prob": _PROB,
    "aux_logits": _BOOL, "init_weights": _BOOL, "transform_input": _BOOL, "class_token": _BOOL,
}


class _Check:
    """Raises :class:`LoadError` naming the source, the refused field and what would be right."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, value: Any, expected: str) -> None:
        raise LoadError(f"{self.source}: refused {field} = {_show(value)}; expected {expected}")

    def require(self, ok: bool, field: str, value: Any, expected: str) -> None:
        if not ok:
            self.fail(field, value, expected)

    def dict(self, config: dict, key: str, prefix: str = "", required: bool = True) -> Optional[dict]:
        if key not in config:
            if required:
                raise LoadError(f"{self.source}: the field {prefix}{key} is missing; a folder written by casify's "
                                "save_pretrained always has it")
            return None
        value = config[key]
        self.require(isinstance(value, dict) or (not required and value is None), prefix + key, value,
                     "a JSON object" + ("" if required else " or null"))
        return value

    def name(self, value: Any, field: str, limit: int = MAX_NAME_CHARS) -> str:
        self.require(isinstance(value, str) and 0 < len(value) <= limit and value.isprintable(), field, value,
                     f"a printable string of 1 to {limit} characters")
        return value


def _registered(source: str, name: str) -> bool:
    if source == "timm":
        import timm

        from .. import models  # noqa: F401  (registers casify's CIFAR models with timm)
        return bool(timm.is_model(name))
    import torchvision.models as tvm
    return name in tvm.list_models(module=tvm)  # classification builders only: none downloads with weights=None


def validate_base_spec(spec: Any, source_label: str = "config.json") -> dict:
    """The checked ``base_model`` spec: a registered timm / torchvision name and allow-listed kwargs, or ``custom``."""
    check = _Check(source_label)
    check.require(isinstance(spec, dict), "base_model", spec, "a JSON object with source, name and kwargs")
    source = spec.get("source")
    check.require(source in ("timm", "torchvision", "custom"), "base_model.source", source,
                  "'timm', 'torchvision' or 'custom'")
    out: Dict[str, Any] = {"source": source}
    name = check.name(spec.get("name"), "base_model.name")
    kwargs = spec.get("kwargs", {})
    check.require(isinstance(kwargs, dict), "base_model.kwargs", kwargs, "a JSON object of architectural settings")
    if source == "custom":
        out.update(name=name, kwargs={})  # never built from the config: the caller passes model=
    else:
        check.require(_MODEL_NAME.fullmatch(name) is not None, "base_model.name", name,
                      f"a plain {source} model name such as 'resnet18' (no 'hf-hub:', 'local-dir:' or other prefixes, "
                      "no paths)")
        check.require(_registered(source, name), "base_model.name", name,
                      f"a model name registered with {source} "
                      + ("(timm.list_models())" if source == "timm" else "(torchvision.models.list_models())"))
        for key, value in kwargs.items():
            if key not in BASE_KWARGS:
                check.fail(f"base_model.kwargs.{key}", value,
                           f"only architectural kwargs ({', '.join(sorted(BASE_KWARGS))}); weights are never "
                           "downloaded or read from paths named in a config")
            ok, expected = BASE_KWARGS[key]
            check.require(ok(value), f"base_model.kwargs.{key}", value, expected)
        out.update(name=name, kwargs=dict(kwargs))
    if spec.get("hf_hub_id") is not None:  # metadata for the model card only; never used to load anything
        hub_id = spec["hf_hub_id"]
        check.require(isinstance(hub_id, str) and _REPO_ID.fullmatch(hub_id) is not None, "base_model.hf_hub_id",
                      hub_id, "a Hub repo id 'owner/name' or null")
        out["hf_hub_id"] = hub_id
    if spec.get("pretrained_weights") is not None:  # which checkpoint the base was loaded from: metadata only
        weights = spec["pretrained_weights"]
        check.require(isinstance(weights, dict) and set(weights) == {"file", "sha256"}, "base_model.pretrained_weights",
                      weights, '{"file": <a file name>, "sha256": <64 hex digits>}')
        name = weights["file"]
        check.require(isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
                      and not any(c in name for c in "/\\") and name.isprintable(),
                      "base_model.pretrained_weights.file", name, "a file name (no folders, at most 255 characters)")
        check.require(isinstance(weights["sha256"], str) and _SHA256.fullmatch(weights["sha256"]) is not None,
                      "base_model.pretrained_weights.sha256", weights["sha256"], "64 lowercase hex digits")
        out["pretrained_weights"] = dict(weights)
    return out


def _validate_cas(cas: dict, check: _Check) -> dict:
    layers = cas.get("layers")
    check.require(isinstance(layers, list) and len(layers) <= MAX_LAYERS, "cas.layers", layers,
                  f"a list of at most {MAX_LAYERS} layer names")
    for i, layer in enumerate(layers):
        check.name(layer, f"cas.layers[{i}]")
        check.require(not layer.startswith("re:") and layer != "auto", f"cas.layers[{i}]", layer,
                      "a resolved layer name as save_pretrained writes it, not a pattern or 'auto'")
    check.require(len(set(layers)) == len(layers), "cas.layers", layers, "distinct layer names")
    if "num_classes" not in cas:
        raise LoadError(f"{check.source}: the field cas.num_classes is missing; a folder written by casify's "
                        "save_pretrained always has it")
    num_classes = cas["num_classes"]
    check.require(_is_int(num_classes) and 1 <= num_classes <= MAX_CLASSES, "cas.num_classes", num_classes,
                  f"an integer from 1 to {MAX_CLASSES}")
    init = cas.get("init", "identity")
    inits = sorted({i for d in DEFENSES.values() for i in d.INITS} | set(INITS))  # the defense's own: _validate_defense
    check.require(isinstance(init, str) and init in inits, "cas.init", init, f"one of {inits}")
    suppress = cas.get("suppress", True)
    check.require(isinstance(suppress, bool), "cas.suppress", suppress, "true or false")
    out = {"layers": list(layers), "num_classes": num_classes, "init": init, "suppress": suppress}

    input_size = cas.get("input_size")
    if input_size is not None:
        ok = (isinstance(input_size, list) and 2 <= len(input_size) <= 4 and all(_is_int(v) for v in input_size)
              and 1 <= input_size[0] <= MAX_IN_CHANS and all(1 <= v <= MAX_SIDE for v in input_size[1:])
              and math.prod(input_size) <= MAX_INPUT_ELEMENTS)
        check.require(ok, "cas.input_size", input_size,
                      f"null or [channels, height, width] with channels <= {MAX_IN_CHANS}, sides <= {MAX_SIDE} and "
                      f"at most {MAX_INPUT_ELEMENTS} elements")
    out["input_size"] = input_size

    for key, lo, hi in (("channel_dims", -6, 6), ("channels", 1, MAX_CHANNELS)):
        values = cas.get(key) or {}
        check.require(isinstance(values, dict), f"cas.{key}", values, "a JSON object {layer name: integer}")
        for layer, v in values.items():
            check.require(layer in layers, f"cas.{key}", layer, f"keys that are layers in cas.layers ({layers[:5]}...)")
            check.require(_is_int(v) and lo <= v <= hi, f"cas.{key}.{layer}", v, f"an integer from {lo} to {hi}")
        out[key] = dict(values)
    return out


def _validate_defense(defense: Any, version: int, cas: dict, check: _Check) -> dict:
    """The ``defense`` section (version 2): a registered name and options each within what the defense allows."""
    if version < 2:  # version 1 knew CAS only: a defense section there was not written by casify
        check.require(defense is None, "defense", defense, "no defense section in a config_version 1 file (CAS)")
        return {"name": "cas", "options": {}}
    check.require(isinstance(defense, dict) and set(defense) <= {"name", "options", "layer_options"}, "defense",
                  defense, '{"name": <a registered defense>, "options": {...}[, "layer_options": {...}]}')
    name = defense.get("name")
    check.require(isinstance(name, str) and name in DEFENSES, "defense.name", name,
                  f"one of the registered defenses {sorted(DEFENSES)}")
    options = defense.get("options", {})
    check.require(isinstance(options, dict) and len(options) <= 64, "defense.options", options,
                  "a JSON object of at most 64 options")
    try:
        validate_options(name, options, where="defense.options")
    except ValueError as e:
        raise LoadError(f"{check.source}: refused {e}") from None
    layer_options = defense.get("layer_options", {})
    layers = cas.get("layers") or []
    check.require(isinstance(layer_options, dict) and set(layer_options) <= set(layers), "defense.layer_options",
                  layer_options, "a JSON object keyed by layers of cas.layers")
    for layer, overrides in layer_options.items():
        check.require(isinstance(overrides, dict) and 0 < len(overrides) <= 64, f"defense.layer_options.{layer}",
                      overrides, "a JSON object of at most 64 options")
        try:
            validate_options(name, {**options, **overrides}, where=f"defense.layer_options.{layer}")
        except ValueError as e:
            raise LoadError(f"{check.source}: refused {e}") from None
    init = cas.get("init")
    check.require(init in DEFENSES[name].INITS, "cas.init", init, f"one of {list(DEFENSES[name].INITS)} for {name}")
    check.require(name == "cas" or cas.get("suppress", True) is True, "cas.suppress", cas.get("suppress"),
                  "true (suppress=False is CAS's ablation; other defenses have no such switch)")
    out = {"name": name, "options": dict(options)}
    if layer_options:
        out["layer_options"] = {k: dict(v) for k, v in layer_options.items()}
    return out


def _validate_normalize(norm: Any, check: _Check) -> Optional[dict]:
    if norm is None:
        return None
    expected = ("null or {\"mean\": [...], \"std\": [...]}: equal-length lists of 1 to "
                f"{MAX_IN_CHANS} finite numbers, std > 0")
    check.require(isinstance(norm, dict) and set(norm) == {"mean", "std"}, "normalize", norm, expected)
    mean, std = norm["mean"], norm["std"]
    ok = (isinstance(mean, list) and isinstance(std, list) and 1 <= len(mean) == len(std) <= MAX_IN_CHANS
          and all(_is_number(v) for v in mean + std) and all(v > 0 for v in std))
    check.require(ok, "normalize", norm, expected)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def validate_config(config: Any, source: str = "config.json") -> dict:
    """A checked copy of a saved config: raises :class:`LoadError` for anything malformed, oversized or hostile.

    Fields nothing reads (``versions`` and extras a caller saved) are kept as inert data.
    """
    check = _Check(source)
    check.require(isinstance(config, dict), "the config", config, "a JSON object written by casify's save_pretrained")
    check.require(config.get("format") == FORMAT, "format", config.get("format"),
                  f"{FORMAT!r} (is this a folder written by casify's save_pretrained?)")
    version = config.get("config_version", 1)
    check.require(_is_int(version) and 1 <= version <= CONFIG_VERSION, "config_version", version,
                  f"an integer from 1 to {CONFIG_VERSION} (a larger one was written by a newer casify: upgrade "
                  "casify-robust to load it)")
    out = dict(config)
    if "base_model" not in config:
        raise LoadError(f"{source}: the field base_model is missing; a folder written by casify's save_pretrained "
                        "always has it")
    out["base_model"] = validate_base_spec(config["base_model"], source)
    out["cas"] = _validate_cas(check.dict(config, "cas"), check)
    out["defense"] = _validate_defense(config.get("defense"), version, out["cas"], check)
    out["normalize"] = _validate_normalize(config.get("normalize"), check)
    names = config.get("class_names")
    if names is not None:
        n = out["cas"]["num_classes"]
        ok = isinstance(names, list) and len(names) == n and all(
            isinstance(c, str) and len(c) <= MAX_CLASS_NAME_CHARS for c in names)
        check.require(ok, "class_names", names,
                      f"null or a list of {n} strings (one per class, cas.num_classes = {n}), each at most "
                      f"{MAX_CLASS_NAME_CHARS} characters")
        out["class_names"] = list(names)
    for key in ("metrics", "training", "versions"):
        check.dict(config, key, required=False)
    dtype = config.get("weights_dtype")
    if dtype is not None:
        check.require(dtype in WEIGHTS_DTYPES, "weights_dtype", dtype,
                      f"one of {', '.join(WEIGHTS_DTYPES)} (the dtype of the floating-point weights) or no such field")
    sha = config.get("weights_sha256")
    if sha is not None:
        check.require(isinstance(sha, str) and _SHA256.fullmatch(sha) is not None, "weights_sha256", sha,
                      "64 lowercase hex digits (the SHA-256 of model.safetensors) or no such field")
    return out


def read_config(path: Union[str, os.PathLike]) -> dict:
    """Read and validate ``config.json`` at ``path``: bounded size, strict UTF-8 JSON, then :func:`validate_config`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise LoadError(f"{path} is {size} bytes; a casify config.json is at most {MAX_CONFIG_BYTES} bytes "
                            "(refused without reading it)")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise LoadError(f"{path} could not be read ({type(e).__name__}: {e})") from None
    if len(raw) > MAX_CONFIG_BYTES:  # grew while being read, or not a regular file
        raise LoadError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes, the most a casify config.json may be")
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LoadError(f"{path} is not UTF-8 text ({e}); expected the JSON written by casify's "
                        "save_pretrained") from None
    except RecursionError:
        raise LoadError(f"{path} nests JSON too deeply; expected the JSON written by casify's "
                        "save_pretrained") from None
    except ValueError as e:  # JSONDecodeError, and integers with thousands of digits
        raise LoadError(f"{path} is not valid JSON ({e}); was it truncated or edited? Re-save the model with "
                        "save_pretrained or download it again") from None
    return validate_config(config, str(path))
