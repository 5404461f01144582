"""Finding insertion points and rewriting a model with torch.fx: ``wrap``, ``list_layers``, ``unwrap``."""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .cas import CASModule
from .model import CAS_ATTR, NORMALIZE_ATTR, CASModel
from .normalize import InputNormalize, resolve_normalize
from .tracing import TracedGraph, closest_names, trace

LayerSpec = Union[str, "re.Pattern", Sequence[Union[str, "re.Pattern"]]]


class LayerError(ValueError):
    """A requested layer does not exist or cannot carry a CAS module."""


@dataclass(frozen=True)
class Layer:
    """A place CAS can go: a module's output (``kind="module"``) or a graph node's output (``kind="node"``)."""
    name: str
    kind: str
    shape: Tuple[int, ...]
    channel_dim: Optional[int]
    layout: str

    @property
    def channels(self) -> Optional[int]:
        return None if self.channel_dim is None else self.shape[self.channel_dim]


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The size of the dummy input used to find shapes: timm's pretrained config (corrected by a patch embedding's
    actual image size, which ``img_size=`` overrides), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        size = (size[0],) + tuple(img_size)
    return size


def _layout(shape: Tuple[int, ...]) -> Tuple[Optional[int], str]:
    """Which axis holds the channels, judged from a propagated shape (the batch is axis 0)."""
    if len(shape) == 3:
        return (2, "NLC") if shape[1] > 1 else (None, "none")
    if len(shape) == 4:
        _, a, b, c = shape
        if b * c > 1 and b == c and a != b:
            return 1, "NCHW"
        if a * b > 1 and a == b and c != b:
            return 3, "NHWC"
        if b * c > 1 and a != b and a != c:
            return 1, "NCHW"  # non-square map after a channels-first op: the first non-batch axis differs from both
        return None, "ambiguous" if b * c > 1 else "none"
    return None, "none"


def _tensor_shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def _propagate_shapes(model: nn.Module, traced: TracedGraph, input_size) -> None:
    model.__dict__.update(traced.constants)  # visible to the temporary GraphModule only while it is built
    try:
        gm = fx.GraphModule(model, traced.graph)
    finally:
        for name in traced.constants:
            model.__dict__.pop(name, None)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand((2,) + tuple(input_size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    modes = {m: m.training for m in model.modules()}
    gm.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(x)
    except Exception as exc:
        raise LayerError(f"running {type(model).__name__} on a dummy input of size {tuple(input_size)} failed "
                         f"({type(exc).__name__}: {exc}); pass input_size=(C, H, W) that the model accepts") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
        traced.graph.owning_module = None  # the temporary GraphModule lets go of the graph, so it can be rewritten


def _candidates(traced: TracedGraph) -> Dict[str, Layer]:
    """Every module output and graph node with a channel axis, by name (module names first)."""
    layers: Dict[str, Layer] = {}
    for name, nodes in traced.module_outputs.items():
        if len(nodes) != 1:
            continue
        shape = _tensor_shape(nodes[0])
        if shape is None or len(shape) < 3:
            continue
        dim, layout = _layout(shape)
        layers[name] = Layer(name, "module", shape, dim, layout)
    for node, name in traced.qualnames.items():
        if node.op in ("placeholder", "output", "get_attr") or name in layers:
            continue
        shape = _tensor_shape(node)
        if shape is None or len(shape) < 3:
            continue
        dim, layout = _layout(shape)
        layers[name] = Layer(name, "node", shape, dim, layout)
    return layers


def _resolve_node(traced: TracedGraph, name: str) -> Optional[fx.Node]:
    nodes = traced.module_outputs.get(name)
    if nodes is not None:
        if len(nodes) == 1:
            return nodes[0]
        if name in traced.nodes_by_name:
            return traced.nodes_by_name[name]
        sites = [traced.qualnames[n] for n in nodes]
        raise LayerError(f"module {name!r} is called {len(nodes)} times; name one call site: {sites}")
    return traced.nodes_by_name.get(name)


def _all_names(traced: TracedGraph) -> List[str]:
    return list(traced.module_outputs) + [n for n in traced.nodes_by_name if n not in traced.module_outputs]


def _auto_layer(traced: TracedGraph, num_classes: Optional[int]) -> str:
    """The last feature stage: the outermost module (else the node) that outputs the last activation with positions.

    Maps with one channel per class (SqueezeNet's classifier conv) are class scores, not features, and are skipped.
    """
    best = None
    for node in traced.graph.nodes:
        shape = _tensor_shape(node)
        if node.op in ("placeholder", "output", "get_attr") or shape is None or len(shape) < 3:
            continue
        dim = _layout(shape)[0]
        if dim is not None and shape[dim] != num_classes:
            best = node
    if best is None:
        raise LayerError("layers='auto' found no activation with a channel axis and more than one position; "
                         "name the layer yourself (see casify.list_layers(model))")
    owners = [name for name, nodes in traced.module_outputs.items() if nodes == [best]]
    if owners:
        return min(owners, key=lambda n: (n.count("."), len(n)))
    return traced.qualnames[best]


def _expand(traced: TracedGraph, layers: LayerSpec, num_classes: Optional[int]) -> List[str]:
    if isinstance(layers, (str, re.Pattern)):
        layers = [layers]
    names: List[str] = []
    candidates = _candidates(traced)
    for spec in layers:
        if isinstance(spec, str) and spec == "auto":
            names.append(_auto_layer(traced, num_classes))
            continue
        if isinstance(spec, re.Pattern) or (isinstance(spec, str) and spec.startswith("re:")):
            pattern = spec if isinstance(spec, re.Pattern) else re.compile(spec[3:])
            modules = [n for n, l in candidates.items() if l.kind == "module" and pattern.fullmatch(n)]
            matched = modules or [n for n, l in candidates.items() if l.kind == "node" and pattern.fullmatch(n)]
            if not matched:
                raise LayerError(f"the pattern {pattern.pattern!r} fully matches no layer with a channel axis; "
                                 f"candidates look like: {list(candidates)[:8]} (see casify.list_layers(model))")
            names.extend(matched)
            continue
        if not isinstance(spec, str):
            raise TypeError(f"layers must be names, 're:<regex>' strings, compiled patterns or 'auto', got {spec!r}")
        names.append(spec)
    return names


def _probe_channel_dim(model: nn.Module, name: str, input_size, trace_kwargs) -> Optional[Tuple[int, ...]]:
    """The layer's output shape at twice the input size; used to resolve an ambiguous layout (C == H == W): the axis
    whose length does not change is the channel axis."""
    probe = trace(model, training=False, **trace_kwargs)
    bigger = (input_size[0],) + tuple(2 * int(s) for s in input_size[1:])
    try:
        _propagate_shapes(model, probe, bigger)
    except LayerError:
        return None
    node = _resolve_node(probe, name)
    return _tensor_shape(node) if node is not None else None


def _target(traced: TracedGraph, name: str, channel_dims: Dict[str, int], probe=None) -> Tuple[fx.Node, Layer]:
    node = _resolve_node(traced, name)
    if node is None:
        close = closest_names(name, _all_names(traced))
        raise LayerError(f"no module or graph node named {name!r}; closest names: {close} "
                         "(casify.list_layers(model) lists every candidate with its shape)")
    shape = _tensor_shape(node)
    if shape is None or len(shape) not in (3, 4):
        got = "a non-tensor value" if shape is None else f"shape {shape}"
        raise LayerError(f"layer {name!r} outputs {got}; CAS needs an activation with a channel axis and positions: "
                         "(N, C, H, W), (N, H, W, C) or (N, tokens, C)")
    if name in channel_dims:
        dim, layout = channel_dims[name] % len(shape), "given"
    else:
        dim, layout = _layout(shape)
    if dim is None and layout == "ambiguous" and probe is not None:
        other = probe(name)
        if other is not None and len(other) == len(shape):
            same = [d for d in range(1, len(shape)) if other[d] == shape[d]]
            if len(same) == 1:
                dim, layout = same[0], "probed"
    if dim is None:
        raise LayerError(f"cannot tell which axis of layer {name!r} (shape {shape}) holds the channels; pass "
                         f"channel_dims={{{name!r}: 1}} for channels-first or -1 for channels-last")
    kind = "module" if name in traced.module_outputs else "node"
    return node, Layer(name, kind, shape, dim, layout)


def list_layers(model: nn.Module, input_size: Optional[Sequence[int]] = None, modules_only: bool = False,
                leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = ()) -> List[Layer]:
    """Every place CAS can go in ``model``, in graph order, with its output shape and channel layout.

    Names follow torchvision's feature-extraction naming: module names mean the module's output, node names a call site.
    """
    base = model._base if isinstance(model, CASModel) else model
    traced = trace(base, training=False, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    _propagate_shapes(base, traced, input_size or default_input_size(base))
    layers = [l for l in _candidates(traced).values() if l.channel_dim is not None or l.layout == "ambiguous"]
    if modules_only:
        layers = [l for l in layers if l.kind == "module"]
    return layers


def _output_classes(traced: TracedGraph) -> Optional[int]:
    out = next(n for n in traced.graph.nodes if n.op == "output")
    arg = out.args[0]
    if isinstance(arg, fx.Node):
        shape = _tensor_shape(arg)
        if shape is not None and len(shape) == 2:
            return shape[1]
    return None


def _module_key(name: str, taken: set) -> str:
    key = re.sub(r"[^0-9a-zA-Z_]", "_", name) or "input"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def wrap(model: nn.Module, layers: LayerSpec = "auto", *, num_classes: Optional[int] = None, init: str = "identity",
         suppress: bool = True, normalize="auto", input_size: Optional[Sequence[int]] = None, channel_dims: Optional[Dict[str, int]] = None,
         leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = (), base_spec: Optional[dict] = None,
         class_names: Optional[Sequence[str]] = None) -> CASModel:
    """Insert a CAS module after each of ``layers`` in ``model`` and return the wrapped model.

    Args:
        model: any classifier that torch.fx can trace (timm's leaf modules are used automatically).
        layers: module names (their output), graph-node names (a call site), ``"re:<regex>"`` or compiled patterns
            (full match, module names first), or ``"auto"`` (the last feature stage). See :func:`list_layers`.
            An empty list gives a model without CAS that still has normalisation inside and casify's save/load
            (the plain-AT baseline of a comparison).
        num_classes: classes of the auxiliary classifiers; by default the model's own output width.
        init: ``"identity"`` (default: the wrapped model computes exactly what the original did at insertion) or
            ``"paper"`` (PyTorch's default Linear init, as in the paper).
        suppress: False keeps the auxiliary classifiers but applies no mask (the paper's Table 2 ablation).
        normalize: ``"auto"`` (timm's pretrained mean/std when present), ``"imagenet"``, ``(mean, std)`` or None.
            With normalisation inside, inputs are pixels in [0, 1].
        input_size: (C, H, W) of the dummy input used to find shapes; by default timm's pretrained input size or 224.
        channel_dims: per-layer channel axis, for layouts casify cannot tell from the shape.
        leaf_modules / autowrap_functions: extra module classes / functions torch.fx should not trace into.
        base_spec: how to rebuild the original (``{"source": "timm", "name": ..., "kwargs": {...}}``) for saving;
            inferred for timm and torchvision models.
        class_names: optional names of the classes, stored in the saved config.
    """
    if isinstance(model, CASModel):
        raise ValueError("the model is already wrapped by casify; unwrap it first or list all layers in one wrap call")
    channel_dims = dict(channel_dims or {})
    input_size = tuple(input_size or default_input_size(model))
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    graphs = {mode: trace(model, mode, leaf_modules, autowrap_functions) for mode in (False, True)}
    _propagate_shapes(model, graphs[False], input_size)

    classes = num_classes or _output_classes(graphs[False])
    names = _expand(graphs[False], layers, classes)  # layers=[] gives normalisation and save/load without CAS
    targets = {}
    trace_kwargs = {"leaf_modules": leaf_modules, "autowrap_functions": autowrap_functions}
    probe = lambda name: _probe_channel_dim(model, name, input_size, trace_kwargs)  # noqa: E731
    for name in names:
        node, layer = _target(graphs[False], name, channel_dims, probe)
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
    taken: set = set()
    modules: Dict[str, CASModule] = {}
    keys: Dict[str, str] = {}
    for name in names:
        layer = targets[name][1]
        key = _module_key(name, taken)
        keys[name] = key
        modules[key] = CASModule(layer.channels, classes, layer.channel_dim, len(layer.shape), init=init,
                                 suppress=suppress, **factory)

    norm = resolve_normalize(normalize, model)
    for mode, traced in graphs.items():
        for name in names:
            node = _resolve_node(traced, name)
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

    from .spec import versions
    config = {
        "base_model": base_spec,  # None: inferred when saving
        "cas": {"layers": names, "init": init, "suppress": bool(suppress), "num_classes": int(classes),
                "channel_dims": {n: targets[n][1].channel_dim for n in names},
                "channels": {n: targets[n][1].channels for n in names},
                "input_size": list(input_size)},
        "normalize": norm,
        "class_names": list(class_names) if class_names is not None else None,
        "versions": versions(),
    }
    normalize_module = InputNormalize(norm["mean"], norm["std"]).to(**factory) if norm is not None else None
    constants = {k: v for g in graphs.values() for k, v in g.constants.items()}
    return CASModel(model, {mode: g.graph for mode, g in graphs.items()}, modules, normalize_module, config, constants)


def unwrap(model: nn.Module) -> nn.Module:
    """The original model, without CAS, holding the wrapped model's current (trained) weights and mode.

    The result shares its modules and parameters with ``model``; ``copy.deepcopy`` it for an independent copy.
    """
    if not isinstance(model, CASModel):
        raise TypeError(f"casify.unwrap expects a model returned by casify.wrap, got {type(model).__name__}")
    base = model._base
    for name in base._modules:
        base._modules[name] = model._modules[name]
    for name in base._parameters:
        base._parameters[name] = model._parameters[name]
    for name in base._buffers:
        base._buffers[name] = model._buffers[name]
    base.train(model.training)
    return base
