"""Layer discovery: where CAS can go in a model, and which axis of each activation holds the channels.

One job: given a traced graph (:mod:`casify.core.tracing`), run a dummy input through it to learn every node's shape, infer
each activation's :class:`Layout`, list the candidates (:func:`list_layers`), resolve the names a user gives (module
names, call sites, ``"re:<regex>"`` patterns, ``"auto"``) to graph nodes, and say how many classes the model outputs.
Nothing here rewrites a graph or knows the wrapped model class: :mod:`casify.core.rewrite` consumes these answers.
"""
from __future__ import annotations

import contextlib
import enum
import io
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .tracing import TracedGraph, closest_names, trace

LayerSpec = Union[str, "re.Pattern", Sequence[Union[str, "re.Pattern"]]]
SKIPPED_OPS = ("placeholder", "output", "get_attr")


class LayerError(ValueError):
    """A requested layer does not exist or cannot carry a CAS module."""


class Layout(str, enum.Enum):
    """How an activation's axes are laid out (after timm's ``timm.layers.Format``), or how its channel axis was found.

    A ``str`` enum: ``Layout.NCHW == "NCHW"``, and it is written to JSON as its value. ``GIVEN`` (the caller's
    ``channel_dims``) and ``PROBED`` (settled by a second shape propagation at twice the input size) describe where
    the channel axis came from when the shape alone could not tell.
    """
    NCHW = "NCHW"
    NHWC = "NHWC"
    NLC = "NLC"
    NC = "NC"  # a feature vector (an MLP's hidden layer): channels, no positions
    AMBIGUOUS = "ambiguous"
    NONE = "none"
    GIVEN = "given"
    PROBED = "probed"

    def __str__(self) -> str:
        return self.value

    @property
    def channel_dim(self) -> Optional[int]:
        """The channel axis this layout implies, or None where it implies none (AMBIGUOUS, NONE, GIVEN, PROBED)."""
        return {"NCHW": 1, "NHWC": 3, "NLC": 2}.get(self.value)


@dataclass(frozen=True)
class Layer:
    """A place CAS can go: a module's output (``kind="module"``) or a graph node's output (``kind="node"``)."""
    name: str
    kind: str
    shape: Tuple[int, ...]
    channel_dim: Optional[int]
    layout: Layout

    @property
    def channels(self) -> Optional[int]:
        return None if self.channel_dim is None else self.shape[self.channel_dim]


def base_of(model: nn.Module) -> nn.Module:
    """The model to trace: a wrapped model's original (its public ``base_model``), any other model itself."""
    if getattr(model, "casify_config", None) is not None and isinstance(getattr(model, "base_model", None), nn.Module):
        return model.base_model
    return model


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The size of the dummy input used to find shapes: timm's pretrained config (corrected by a patch embedding's
    actual image size, which ``img_size=`` overrides), else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        size = (size[0],) + tuple(img_size)
    return size


def infer_layout(shape: Sequence[int]) -> Tuple[Optional[int], Layout]:
    """Which axis holds the channels, judged from a propagated shape (the batch is axis 0), and the layout."""
    shape = tuple(shape)
    if len(shape) == 2:
        return 1, Layout.NC
    if len(shape) == 3:
        return (2, Layout.NLC) if shape[1] > 1 else (None, Layout.NONE)
    if len(shape) == 4:
        _, a, b, c = shape
        if b * c > 1 and b == c and a != b:
            return 1, Layout.NCHW
        if a * b > 1 and a == b and c != b:
            return 3, Layout.NHWC
        if b * c > 1 and a != b and a != c:
            # non-square map after a channels-first op: the first non-batch axis differs from both
            return 1, Layout.NCHW
        return None, Layout.AMBIGUOUS if b * c > 1 else Layout.NONE
    return None, Layout.NONE


def tensor_shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    """The shape shape propagation recorded for ``node``, or None for a non-tensor value."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def propagate_shapes(model: nn.Module, traced: TracedGraph, input_size) -> None:
    """Run a seeded dummy batch of ``input_size`` through ``traced`` (eval mode, no grad) and record every node's
    shape in its ``meta``. The model's modes are restored and the graph is left free to be rewritten."""
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


def model_output(traced: TracedGraph) -> Optional[fx.Node]:
    """The node whose value the model returns (its logits), or None when it returns something else (a tuple, a dict)."""
    out = next(n for n in traced.graph.nodes if n.op == "output")
    return out.args[0] if out.args and isinstance(out.args[0], fx.Node) else None


def logits_node(traced: TracedGraph) -> Optional[fx.Node]:
    """The model's output when it is (N, classes) logits: no place for a defense. A headless backbone's last feature
    map is its output too, and stays a candidate (``wrap(..., num_classes=)`` is how such a model is wrapped)."""
    return model_output(traced) if output_classes(traced) is not None else None


def candidates(traced: TracedGraph, features: bool = False) -> Dict[str, Layer]:
    """Every module output and graph node with a channel axis, by name (module names first); with ``features``, (N, C)
    vectors too (patterns and ``"auto"`` never pick those: a vector is a head's, and only CAS accepts it)."""
    smallest = 2 if features else 3
    logits = logits_node(traced)  # locate refuses it
    layers: Dict[str, Layer] = {}
    for name, nodes in traced.module_outputs.items():
        if len(nodes) != 1 or nodes[0] is logits:
            continue
        shape = tensor_shape(nodes[0])
        if shape is None or len(shape) < smallest:
            continue
        dim, layout = infer_layout(shape)
        layers[name] = Layer(name, "module", shape, dim, layout)
    for node, name in traced.qualnames.items():
        if node.op in SKIPPED_OPS or name in layers or node is logits:
            continue
        shape = tensor_shape(node)
        if shape is None or len(shape) < smallest:
            continue
        dim, layout = infer_layout(shape)
        layers[name] = Layer(name, "node", shape, dim, layout)
    return layers


def resolve_node(traced: TracedGraph, name: str) -> Optional[fx.Node]:
    """The node a layer name means: a module's (single) output, or a call site; None when nothing has that name."""
    nodes = traced.module_outputs.get(name)
    if nodes is not None:
        if len(nodes) == 1:
            return nodes[0]
        if name in traced.nodes_by_name:
            return traced.nodes_by_name[name]
        sites = [traced.qualnames[n] for n in nodes]
        raise LayerError(f"module {name!r} is called {len(nodes)} times; name one call site: {sites}")
    return traced.nodes_by_name.get(name)


def all_names(traced: TracedGraph) -> List[str]:
    """Every name a layer may be given: module names, then node names that are not also module names."""
    return list(traced.module_outputs) + [n for n in traced.nodes_by_name if n not in traced.module_outputs]


def auto_layer(traced: TracedGraph, num_classes: Optional[int]) -> str:
    """The last feature stage: the outermost module (else the node) that outputs the last activation with positions.

    Maps with one channel per class (SqueezeNet's classifier conv) are class scores, not features, and are skipped.
    """
    best = None
    for node in traced.graph.nodes:
        shape = tensor_shape(node)
        if node.op in SKIPPED_OPS or shape is None or len(shape) < 3:
            continue
        dim = infer_layout(shape)[0]
        if dim is not None and shape[dim] != num_classes:
            best = node
    if best is None:
        raise LayerError("layers='auto' found no activation with a channel axis and more than one position; "
                         "name the layer yourself (see casify.list_layers(model))")
    owners = [name for name, nodes in traced.module_outputs.items() if nodes == [best]]
    if owners:
        return min(owners, key=lambda n: (n.count("."), len(n)))
    return traced.qualnames[best]


def output_classes(traced: TracedGraph) -> Optional[int]:
    """The width of the model's (N, classes) output after shape propagation, or None when it is not a 2-D tensor."""
    arg = model_output(traced)
    shape = tensor_shape(arg) if arg is not None else None
    return shape[1] if shape is not None and len(shape) == 2 else None


def expand_layers(traced: TracedGraph, layers: LayerSpec, num_classes: Optional[int]) -> List[str]:
    """Names for a layer spec: ``"auto"`` and patterns are resolved, plain names are passed through unchecked."""
    if isinstance(layers, (str, re.Pattern)):
        layers = [layers]
    names: List[str] = []
    found = candidates(traced)
    for spec in layers:
        if isinstance(spec, str) and spec == "auto":
            names.append(auto_layer(traced, num_classes))
            continue
        if isinstance(spec, re.Pattern) or (isinstance(spec, str) and spec.startswith("re:")):
            pattern = spec if isinstance(spec, re.Pattern) else re.compile(spec[3:])
            modules = [n for n, l in found.items() if l.kind == "module" and pattern.fullmatch(n)]
            matched = modules or [n for n, l in found.items() if l.kind == "node" and pattern.fullmatch(n)]
            if not matched:
                raise LayerError(f"the pattern {pattern.pattern!r} fully matches no layer with a channel axis; "
                                 f"candidates look like: {list(found)[:8]} (see casify.list_layers(model))")
            names.extend(matched)
            continue
        if not isinstance(spec, str):
            raise TypeError(f"layers must be names, 're:<regex>' strings, compiled patterns or 'auto', got {spec!r}")
        names.append(spec)
    return names


def probe_shape(model: nn.Module, name: str, input_size, leaf_modules=(),
                autowrap_functions=()) -> Optional[Tuple[int, ...]]:
    """The layer's output shape at twice the input size; used to resolve an ambiguous layout (C == H == W): the axis
    whose length does not change is the channel axis. None when the model does not run at that size."""
    probe = trace(model, training=False, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    bigger = (input_size[0],) + tuple(2 * int(s) for s in input_size[1:])
    try:
        propagate_shapes(model, probe, bigger)
    except LayerError:
        return None
    node = resolve_node(probe, name)
    return tensor_shape(node) if node is not None else None


def locate(traced: TracedGraph, name: str, channel_dims: Dict[str, int],
           probe: Optional[Callable[[str], Optional[Tuple[int, ...]]]] = None) -> Tuple[fx.Node, Layer]:
    """The node of layer ``name`` and its :class:`Layer` (shape, channel axis), or a :class:`LayerError` that says
    what is wrong and what would be right."""
    node = resolve_node(traced, name)
    if node is None:
        close = closest_names(name, all_names(traced))
        raise LayerError(f"no module or graph node named {name!r}; closest names: {close} "
                         "(casify.list_layers(model) lists every candidate with its shape)")
    shape = tensor_shape(node)
    if node is logits_node(traced):
        raise LayerError(f"layer {name!r} is the model's output (its logits, shape {shape}); CAS goes on features "
                         "before the classifier: a stage's output, or an MLP head's hidden layer "
                         "(casify.list_layers(model, features=True))")
    if shape is None or len(shape) not in (2, 3, 4):
        got = "a non-tensor value" if shape is None else f"shape {shape}"
        raise LayerError(f"layer {name!r} outputs {got}; CAS needs an activation with a channel axis: "
                         "(N, C, H, W), (N, H, W, C), (N, tokens, C) or (N, C) features")
    if name in channel_dims:
        dim, layout = channel_dims[name] % len(shape), Layout.GIVEN
    else:
        dim, layout = infer_layout(shape)
    if dim is None and layout == Layout.AMBIGUOUS and probe is not None:
        other = probe(name)
        if other is not None and len(other) == len(shape):
            same = [d for d in range(1, len(shape)) if other[d] == shape[d]]
            if len(same) == 1:
                dim, layout = same[0], Layout.PROBED
    if dim is None:
        raise LayerError(f"cannot tell which axis of layer {name!r} (shape {shape}) holds the channels; pass "
                         f"channel_dims={{{name!r}: 1}} for channels-first or -1 for channels-last")
    kind = "module" if name in traced.module_outputs else "node"
    return node, Layer(name, kind, shape, dim, layout)


def list_layers(model: nn.Module, input_size: Optional[Sequence[int]] = None, modules_only: bool = False,
                leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = (),
                features: bool = False) -> List[Layer]:
    """Every place CAS can go in ``model``, in graph order, with its output shape and channel layout.

    Names follow torchvision's feature-extraction naming: module names mean the module's output, node names a call site.
    A wrapped model is read through its original, so its names are the ones ``wrap`` accepts. ``features=True`` also
    lists (N, C) vectors (layout ``NC``: an MLP head's hidden layer, where only CAS goes; name them explicitly).
    """
    base = base_of(model)
    traced = trace(base, training=False, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    propagate_shapes(base, traced, input_size or default_input_size(base))
    layers = [l for l in candidates(traced, features).values()
              if l.channel_dim is not None or l.layout == Layout.AMBIGUOUS]
    if modules_only:
        layers = [l for l in layers if l.kind == "module"]
    return layers


def traced_with_shapes(model: nn.Module, input_size: Optional[Sequence[int]] = None, training: bool = False,
                       leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = ()) -> TracedGraph:
    """``model`` (a wrapped model: its original) traced in one mode, with shapes propagated at ``input_size``."""
    base = base_of(model)
    traced = trace(base, training=training, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    propagate_shapes(base, traced, tuple(input_size or default_input_size(base)))
    return traced


def auto_layer_of(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> str:
    """The name ``layers="auto"`` chooses in ``model`` (a wrapped model: in its original)."""
    traced = traced_with_shapes(model, input_size)
    return auto_layer(traced, output_classes(traced))
