"""Capturing channel-wise activations: run a model and read one layer's output, pooled to one (N, C) row per example.

Channel-wise activations are the global average over positions of one layer's activation, one (N, C) row per example.
Layer names are casify's (see :func:`casify.list_layers`): a module name means that module's output, a graph-node name
(``layer4.1.relu_1``) one call site. Names are resolved with casify's own tracer, so they mean exactly what they mean
to :func:`casify.wrap`; a model that torch.fx cannot trace still works for module names, through a forward hook.

The capture point. On a :class:`casify.DefendedModel` a layer that carries a CAS module is captured, by default, *before*
the channel mask (``cas_side="before"``): the input of the CAS module, which is the layer's own output. A model
without CAS is captured at the same layer's output, so a baseline and its CAS version are compared at the same point
of the network. After the mask (``cas_side="after"``) the activation is scaled
by a signed weight row: a channel whose weight is negative is never "active" there, whatever the layer computed, so
frequencies after the mask measure the mask as much as the features. Every report states its capture point
(``ChannelReport.capture_point``, in the JSON, the markdown and the figures). Every capture runs in eval mode with each
CAS module routed by its own prediction (the test-time protocol), like the attacks.

The helpers that decide what a probe is fed (the examples, the device, the attack objective, the default layer) live
here too, because :func:`casify.analysis.analyze` and :func:`casify.analysis.tsne_plot` both need them.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..attacks import attack_context
from ..defenses import DefenseModule, find_defense_modules
from ..core.discovery import LayerError, Layout, all_names, auto_layer_of, infer_layout, resolve_node
from ..model.defended import CAS_ATTR, DefendedModel
from ..core.tracing import TraceError, closest_names, trace

CAS_SIDES = ("before", "after")
NO_CAS = "layer output (no CAS module)"
NO_CAS_HERE = "layer output (no CAS module at this layer)"
Data = Union[Dataset, DataLoader, Tuple[torch.Tensor, torch.Tensor]]


# -- channel-wise activations at one layer ---------------------------------------------------------------------------
def pool_channels(activation: torch.Tensor, channel_dim: Optional[int] = None) -> torch.Tensor:
    """Global average over positions: (N, C, H, W), (N, H, W, C) or (N, tokens, C) -> (N, C) float32.

    A 2-D activation is already channel-wise. Without ``channel_dim`` the axis is judged from the shape as
    :func:`casify.wrap` does; square maps with as many channels as rows (C == H == W) need ``channel_dim``.
    """
    act = activation.detach().float()
    if act.dim() == 2:
        return act
    if act.dim() not in (3, 4):
        raise LayerError(f"expected a 2-D, 3-D or 4-D activation, got shape {tuple(act.shape)}")
    dim = channel_dim
    if dim is None:
        dim, layout = infer_layout(tuple(act.shape))
        if dim is None:
            raise LayerError(f"cannot tell which axis of an activation of shape {tuple(act.shape)} holds the channels "
                             f"({layout}); pass channel_dim=1 (channels-first) or -1 (channels-last)")
    dim %= act.dim()
    if dim == 0:
        raise LayerError("channel_dim cannot be the batch axis (0)")
    return act.mean(dim=[d for d in range(1, act.dim()) if d != dim])


def _output_tensor(value, where: str) -> torch.Tensor:
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise LayerError(f"{where} is a {type(value).__name__}, not a tensor; choose a layer that outputs one tensor")
    return value


def _first_tensor(value):
    """The first tensor of a (possibly nested) model output: the logits of models that return extras."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class ActivationProbe:
    """Runs a model and returns its logits with the channel-wise (pooled) activation at one layer.

    Use as a context manager (hooks are removed on exit) or call :meth:`close`. See the module docstring for how names
    are resolved and what is captured at a CAS layer.

    Args:
        model: any classifier, wrapped by casify or not (inputs as the model takes them: pixels in [0, 1] for casify
            models, which normalise inside).
        layer: a module or graph-node name (:func:`casify.list_layers`).
        cas_side: at a layer carrying a CAS module, ``"before"`` the channel mask (the CAS module's input, default) or
            ``"after"`` it (the masked activation the next layer receives).
        channel_dim: the channel axis, for layouts the shape does not tell.

    Attributes:
        capture_point: where the activation is taken, in words: ``"before CAS mask (input of cas_modules.<key>)"``,
            ``"after CAS mask (output of cas_modules.<key>)"`` or ``"layer output (no CAS module)"``.
        captured: how it is taken (module output, graph node, forward hook, CAS module input or output).
    """

    def __init__(self, model: nn.Module, layer: str, *, cas_side: str = "before", channel_dim: Optional[int] = None):
        if cas_side not in CAS_SIDES:
            raise ValueError(f"cas_side must be one of {CAS_SIDES}, got {cas_side!r}")
        self.model, self.layer, self.cas_side, self.channel_dim = model, layer, cas_side, channel_dim
        self.captured = ""  # how it is captured, in words (also in the report)
        defended = bool(find_defense_modules(model))
        self.capture_point = NO_CAS_HERE if defended else NO_CAS  # where, in words; set below at a CAS layer
        self._handles: list = []
        self._store: List[torch.Tensor] = []
        self._graph_module: Optional[fx.GraphModule] = None
        cas = self._cas_module(layer)
        if cas is not None:
            self._hook_cas(*cas)
        elif isinstance(model, DefendedModel):
            self._graph_module = self._cas_model_graph(layer)
        else:
            try:
                self._graph_module = self._plain_graph(layer)
            except TraceError:
                if layer not in dict(model.named_modules()) or not layer:
                    raise
                self._hook_module(layer)

    # - resolution -
    def _cas_module(self, layer: str) -> Optional[Tuple[str, DefenseModule]]:
        if isinstance(self.model, DefendedModel) and layer in self.model.cas_layers:
            return list(self.model.cas_modules.items())[self.model.cas_layers.index(layer)]
        return None

    def _at_cas(self, key: str, cas: DefenseModule) -> None:
        """Name the capture point at the CAS module ``cas_modules.<key>``."""
        qualified = f"{CAS_ATTR}.{key}"
        if self.cas_side == "after":
            self.capture_point = f"after CAS mask (output of {qualified})"
        else:
            self.capture_point = f"before CAS mask (input of {qualified})"
        if not getattr(cas, "suppress", True):
            self.capture_point += "; suppress=False, so no mask is applied"
        if self.channel_dim is None:
            self.channel_dim = cas.channel_dim

    def _hook_cas(self, key: str, cas: DefenseModule) -> None:
        self._at_cas(key, cas)
        if self.cas_side == "after":
            self.captured = "CAS module output (after the channel mask)"
            self._handles.append(cas.register_forward_hook(lambda m, args, out: self._store.append(out)))
        else:
            self.captured = "CAS module input (the layer's output before the channel mask)"
            self._handles.append(cas.register_forward_pre_hook(lambda m, args: self._store.append(args[0])))

    def _hook_module(self, layer: str) -> None:
        self.captured = "module output (forward hook; the model could not be traced)"
        module = self.model.get_submodule(layer)
        self._handles.append(module.register_forward_hook(
            lambda m, args, out: self._store.append(_output_tensor(out, f"the output of {layer!r}"))))

    def _unknown(self, traced, layer: str) -> LayerError:
        close = closest_names(layer, all_names(traced))
        return LayerError(f"no module or graph node named {layer!r}; closest names: {close} "
                          "(casify.list_layers(model) lists every candidate)")

    def _plain_graph(self, layer: str) -> fx.GraphModule:
        """The model's eval graph with the layer's value as a second output."""
        traced = trace(self.model, training=False)
        node = resolve_node(traced, layer)
        if node is None or node.op in ("placeholder", "output"):
            raise self._unknown(traced, layer)
        out = next(n for n in traced.graph.nodes if n.op == "output")
        out.args = ((out.args[0], node),)
        self.captured = "graph node output" if layer not in traced.module_outputs else "module output"
        self.model.__dict__.update(traced.constants)  # fx's tensor constants, visible only while the module is built
        try:
            return fx.GraphModule(self.model, traced.graph)
        finally:
            for name in traced.constants:
                self.model.__dict__.pop(name, None)

    def _cas_model_graph(self, layer: str) -> fx.GraphModule:
        """The wrapped model's eval graph (CAS masks included) with the layer's value as a second output.

        The name is resolved on a fresh trace of the original model, whose fx node names are those the wrapped graph
        was built from; at a node feeding a CAS module, ``cas_side="before"`` takes that node (the module's input)
        and ``cas_side="after"`` the module's output. If the
        original no longer traces on its own (it was wrapped with extra leaf modules), a leaf module's name is looked
        up among the wrapped graph's module calls instead.
        """
        model = self.model
        try:
            traced = trace(model.base_model, training=False)
        except TraceError:
            calls = [n for n in model.eval_graph.nodes if n.op == "call_module" and n.target == layer]
            if not calls:
                raise
            base_node, is_module = calls[0], True
        else:
            base_node, is_module = resolve_node(traced, layer), layer in traced.module_outputs
            if base_node is None or base_node.op in ("placeholder", "output"):
                raise self._unknown(traced, layer)
        graph = fx.Graph()
        val_map: Dict[fx.Node, fx.Node] = {}
        logits = graph.graph_copy(model.eval_graph, val_map)
        match = [n for n in val_map
                 if n.name == base_node.name and n.op == base_node.op and n.target == base_node.target]
        if len(match) != 1:
            raise LayerError(f"could not find layer {layer!r} in the wrapped model's graph (was it wrapped with "
                             "leaf_modules= or autowrap_functions=?); capture at a leaf module's name instead")
        node = match[0]
        self.captured = "module output" if is_module else "graph node output"
        cas_users = [u for u in node.users if u.op == "call_module" and str(u.target).startswith(CAS_ATTR + ".")]
        if cas_users:
            target = str(cas_users[0].target)
            if self.cas_side == "after":
                node = cas_users[0]
                self.captured = "CAS module output (after the channel mask)"
            else:
                self.captured = "CAS module input (the layer's output before the channel mask)"
            self._at_cas(target[len(CAS_ATTR) + 1:], model.get_submodule(target))
        graph.output((logits, val_map[node]))
        return fx.GraphModule(model, graph)

    # - running -
    def _run(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self._store.clear()
        with attack_context(self.model):
            if self._graph_module is not None:
                logits, act = self._graph_module(x)
                act = _output_tensor(act, f"layer {self.layer!r}")
            else:
                logits = self.model(x)
                if len(self._store) != 1:
                    raise LayerError(f"layer {self.layer!r} ran {len(self._store)} times in one forward; name one call "
                                     "site (see casify.list_layers(model))")
                act = self._store[0]
        self._store.clear()
        return _first_tensor(logits), act

    def _find_channel_dim(self, act: torch.Tensor, x: torch.Tensor) -> Optional[int]:
        """The channel axis from the shape; for a square map with C == H == W, from a second run on the input
        upsampled 2x: the axis whose length does not change holds the channels (as casify.wrap probes it)."""
        dim, layout = infer_layout(tuple(act.shape))
        if dim is not None or layout != Layout.AMBIGUOUS or x.dim() != 4:
            return dim
        try:
            bigger = self._run(torch.nn.functional.interpolate(x[:1].float(), scale_factor=2).to(x.dtype))[1]
        except Exception:  # a model with a fixed input size: the caller must say
            return None
        same = [d for d in range(1, act.dim()) if bigger.dim() == act.dim() and bigger.shape[d] == act.shape[d]]
        return same[0] if len(same) == 1 else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, (N, C) float32 channel-wise activations) in eval mode with predicted CAS routing."""
        logits, act = self._run(x)
        if self.channel_dim is None and act.dim() > 2:
            self.channel_dim = self._find_channel_dim(act, x)  # fixed per layer: found once
        return logits, pool_channels(act, self.channel_dim)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "ActivationProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def channel_activations(model: nn.Module, x: torch.Tensor, layer: str, *, cas_side: str = "before",
                        channel_dim: Optional[int] = None, batch_size: int = 256) -> torch.Tensor:
    """The (N, C) channel-wise activations of ``x`` at ``layer`` (float32, on the model's device)."""
    with ActivationProbe(model, layer, cas_side=cas_side, channel_dim=channel_dim) as probe:
        return torch.cat([probe(x[i:i + batch_size])[1] for i in range(0, len(x), batch_size)])



# -- penultimate features (what t-SNE embeds by default) -------------------------------------------------------------
class ClassifierInputProbe:
    """Captures the input of the last ``nn.Linear`` that runs in a forward, outside CAS modules: the final
    classifier's input, i.e. the penultimate features (timm's ``forward_head(pre_logits=True)``), with the CAS masks
    of a wrapped model applied upstream."""

    def __init__(self, model: nn.Module):
        self.model = model
        inside_cas = {id(m) for cas in find_defense_modules(model) for m in cas.modules()}
        self._last: Optional[torch.Tensor] = None
        self._handles = [m.register_forward_hook(self._record) for m in model.modules()
                         if isinstance(m, nn.Linear) and id(m) not in inside_cas]

    def _record(self, module, args, out) -> None:
        self._last = args[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._last = None
        with attack_context(self.model):
            self.model(x)
            if self._last is None and not isinstance(self.model, DefendedModel) and hasattr(self.model, "forward_head"):
                return pool_channels(self.model.forward_head(self.model.forward_features(x), pre_logits=True), -1)
        if self._last is None:
            raise LayerError("no nn.Linear classifier ran in the forward, so the penultimate features are unknown; "
                             "pass layer= (a module or graph-node name) to t-SNE that layer's channel-wise activation")
        feats = self._last.detach().float()
        return feats if feats.dim() == 2 else pool_channels(feats, -1)  # a per-token head: average the tokens

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()



# -- what a probe is fed: examples, device, attack objective, layer --------------------------------------------------
def example_batches(data: Data, max_examples: Optional[int], batch_size: int,
                    seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of at most ``max_examples`` examples. From a dataset, a seeded random subset is taken (an image
    folder stored in class order would otherwise give one class); a loader or tensors (x, y) are read in order."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data[0][:max_examples], torch.as_tensor(data[1])[:max_examples]
        data = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    if isinstance(data, DataLoader):
        loader = data
    else:
        n = len(data)
        if max_examples is not None and max_examples < n:
            g = torch.Generator().manual_seed(seed)
            data = Subset(data, torch.randperm(n, generator=g)[:max_examples].sort().values.tolist())
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    seen = 0
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1])
        if max_examples is not None:
            x, y = x[:max_examples - seen], y[:max_examples - seen]
        if len(x):
            yield x, y
        seen += len(x)
        if max_examples is not None and seen >= max_examples:
            return


def resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def resolve_objective(model: nn.Module, objective: str) -> str:
    """"auto": the CAS-adaptive objective (CE + beta * auxiliary CE) on a CAS model, plain CE otherwise."""
    if objective == "auto":
        return "cas" if find_defense_modules(model) else "ce"
    return objective


def default_layer(model: nn.Module, input_size: Sequence[int]) -> str:
    """The layer the paper analyses: on a CAS model the last CAS layer, else the last feature stage (the activation
    ``casify.wrap(layers="auto")`` would choose: the penultimate layer before global pooling)."""
    if isinstance(model, DefendedModel):
        if model.cas_layers:
            return model.cas_layers[-1]
        model = model.base_model
    return auto_layer_of(model, tuple(input_size))

