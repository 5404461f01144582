"""The graph rewrite: trace a model in both modes, insert a CAS node after each chosen layer (and input normalisation
after the input), and return the pieces a wrapped model is made of.

One job, no model class: :func:`rewrite` takes the original and a :class:`~casify.core.config.DefenseConfig`, and returns a
:class:`Rewrite` (the two rewritten fx graphs, the CAS modules, the normalisation module, fx's captured constants, and
the config resolved). :class:`casify.model.defended.DefendedModel` is built from it; ``casify.wrap`` does both steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import fx, nn

from ..defenses import DefenseModule, get_defense, layout_of, validate_options
from .config import DefenseConfig
from .discovery import (LayerError, default_input_size, expand_layers, locate, output_classes, probe_shape,
                        propagate_shapes, resolve_node)
from .normalize import InputNormalize, resolve_normalize
from .spec import versions
from .tracing import trace

CAS_ATTR = "cas_modules"
"""Where the wrapped model keeps its CAS modules (state-dict keys ``cas_modules.<key>.classifier.*``)."""
NORMALIZE_ATTR = "input_normalize"
"""Where the wrapped model keeps its input normalisation (no state-dict keys: its buffers are not persistent)."""


@dataclass
class Rewrite:
    """What :func:`rewrite` returns: everything :class:`casify.model.defended.DefendedModel` is built from."""
    graphs: Dict[bool, fx.Graph]                      # training mode -> rewritten graph
    cas_modules: Dict[str, DefenseModule]             # module key -> defense module, in graph order
    normalize: Optional[nn.Module]
    config: DefenseConfig                                 # resolved
    constants: Dict[str, torch.Tensor] = field(default_factory=dict)


def module_key(name: str, taken: set) -> str:
    """A ``ModuleDict`` key for layer ``name`` (dots and other characters become ``_``), unique among ``taken``."""
    key = re.sub(r"[^0-9a-zA-Z_]", "_", name) or "input"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def defense_options(config: DefenseConfig) -> dict:
    """The options the config's defense is built with, checked against the defense's ``OPTIONS``. CAS's
    ``suppress`` is not one of them: it lives in the placement section (``config.suppress``), in one place only."""
    if config.defense != "cas" and config.suppress is not True:
        raise ValueError(f"suppress=False is CAS's ablation; the {config.defense!r} defense has no such switch")
    return validate_options(config.defense, config.defense_options)


def resolve_layer_options(config: DefenseConfig, names: List[str], options: dict) -> Dict[str, dict]:
    """Per-layer overrides of the defense's options, keyed by resolved layer names; a key that names no wrapped layer
    or an option the defense does not have is refused (a typo must not silently give every layer the default)."""
    unknown = sorted(set(config.layer_options) - set(names))
    if unknown:
        raise LayerError(f"layer_options names {unknown}, which are not among the wrapped layers {names}; key it by "
                         "the layer names as list_layers gives them")
    out = {}
    for name, overrides in config.layer_options.items():
        validate_options(config.defense, {**options, **overrides}, where=f"layer_options[{name!r}]")
        if overrides:  # an empty override is the layer's default: not written (a saved config keeps none)
            out[name] = dict(overrides)
    return out


def rewrite(model: nn.Module, config: DefenseConfig, leaf_modules: Iterable[type] = (),
            autowrap_functions: Iterable = ()) -> Rewrite:
    """Trace ``model`` in eval and train mode and insert what ``config`` asks for into both graphs.

    The model itself is not changed (fx's tensor constants are moved into the result). Layer names are resolved on
    the eval graph; a layer must exist in both modes.
    """
    channel_dims = dict(config.channel_dims or {})
    input_size = tuple(config.input_size or default_input_size(model))
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    graphs = {mode: trace(model, mode, leaf_modules, autowrap_functions) for mode in (False, True)}
    propagate_shapes(model, graphs[False], input_size)

    classes = config.num_classes or output_classes(graphs[False])
    # layers=[] gives normalisation and save/load without CAS
    names = expand_layers(graphs[False], config.layers, classes)
    targets = {}
    probe = lambda name: probe_shape(model, name, input_size, leaf_modules, autowrap_functions)  # noqa: E731
    for name in names:
        node, layer = locate(graphs[False], name, channel_dims, probe)
        if node in [t[0] for t in targets.values()]:
            other = next(n for n, t in targets.items() if t[0] is node)
            raise LayerError(f"layers {other!r} and {name!r} are the same tensor; give only one of them")
        targets[name] = (node, layer)
    order = {node: i for i, node in enumerate(graphs[False].graph.nodes)}
    names = sorted(targets, key=lambda n: order[targets[n][0]])

    if not classes:
        raise LayerError("cannot tell the number of classes from the model's output; pass num_classes=")
    param = next(model.parameters(), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None and param.is_floating_point() else {}
    defense = get_defense(config.defense)
    init = defense.INITS[0] if config.init is None else config.init
    options = defense_options(config)
    layer_options = resolve_layer_options(config, names, options)
    taken: set = set()
    modules: Dict[str, DefenseModule] = {}
    keys: Dict[str, str] = {}
    for name in names:
        layer = targets[name][1]
        layout = layout_of(layer.channel_dim, len(layer.shape))
        if layout not in defense.layouts:
            raise LayerError(f"layer {name!r} is {layout} (shape {tuple(layer.shape)}); the {config.defense!r} defense "
                             f"works on {list(defense.layouts)} activations only: choose another layer")
        key = module_key(name, taken)
        keys[name] = key
        extra = {"suppress": bool(config.suppress)} if config.defense == "cas" else {}
        own = validate_options(config.defense, {**options, **layer_options.get(name, {})}) if name in layer_options \
            else options
        modules[key] = defense.build(layer.channels, classes, layer.channel_dim, len(layer.shape), init, own,
                                     **factory, **extra)

    norm = resolve_normalize(config.normalize, model)
    for mode, traced in graphs.items():
        for name in names:
            node = resolve_node(traced, name)
            if node is None:
                raise LayerError(f"layer {name!r} exists in eval mode but not in {'train' if mode else 'eval'} mode; "
                                 "choose a layer that runs in both")
            with traced.graph.inserting_after(node):
                cas_node = traced.graph.create_node("call_module", f"{CAS_ATTR}.{keys[name]}", (node,), {},
                                                    name=f"cas_{keys[name]}")
            node.replace_all_uses_with(cas_node, delete_user_cb=lambda user, c=cas_node: user is not c)
        if norm is not None:
            placeholder = next(n for n in traced.graph.nodes if n.op == "placeholder")
            with traced.graph.inserting_after(placeholder):
                norm_node = traced.graph.create_node("call_module", NORMALIZE_ATTR, (placeholder,), {},
                                                     name="input_normalize")
            placeholder.replace_all_uses_with(norm_node, delete_user_cb=lambda user, c=norm_node: user is not c)
        traced.graph.lint()

    resolved = config.replace(
        layers=names, suppress=bool(config.suppress), num_classes=int(classes), init=init,
        defense_options=dict(options), layer_options=layer_options,
        channel_dims={n: targets[n][1].channel_dim for n in names},
        channels={n: targets[n][1].channels for n in names}, input_size=input_size, normalize=norm,
        versions=versions(), extra=dict(config.extra))
    normalize_module = InputNormalize(norm["mean"], norm["std"]).to(**factory) if norm is not None else None
    constants = {k: v for g in graphs.values() for k, v in g.constants.items()}
    return Rewrite({mode: g.graph for mode, g in graphs.items()}, modules, normalize_module, resolved, constants)
