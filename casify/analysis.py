"""Channel-wise activation analysis of the paper's Section 3: magnitude (Fig. 1), frequency (Fig. 2) and t-SNE (Fig. 9).

Channel-wise activations are the global average over positions of one layer's activation, one (N, C) row per example.
Layer names are casify's (see :func:`casify.list_layers`): a module name means that module's output, a graph-node name
(``layer4.1.relu_1``) one call site. Names are resolved with casify's own tracer, so they mean exactly what they mean
to :func:`casify.wrap`; a model that torch.fx cannot trace still works for module names, through a forward hook.

The capture point. On a :class:`casify.CASModel` a layer that carries a CAS module is captured, by default, *before*
the channel mask (``cas_side="before"``): the input of the CAS module, which is the layer's own output. A model
without CAS is captured at the same layer's output, so a baseline and its CAS version are compared at the same point
of the network. After the mask (``cas_side="after"``) the activation is scaled
by a signed weight row: a channel whose weight is negative is never "active" there, whatever the layer computed, so
frequencies after the mask measure the mask as much as the features. Every report states its capture point
(``ChannelReport.capture_point``, in the JSON, the markdown and the figures). Every capture runs in eval mode with each
CAS module routed by its own prediction (the test-time protocol), like the attacks.

The statistics are pure functions of (N, C) tensors. :func:`analyze` crafts PGD adversarial examples, captures natural
and adversarial activations, computes the statistics and, given ``out_dir``, writes the figures and a JSON and markdown
report; :func:`run_analysis` adds the t-SNE figure (what ``casify analyze`` runs). Argument parsing lives in
:mod:`casify.cli`.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .attacks import attack_context, pgd, resolve_alpha
from .cas import CASModule, find_cas_modules
from .eps import format_eps
from .model import CAS_ATTR, CASModel
from .serialization import atomic_write
from .discovery import LayerError, Layout, all_names, auto_layer_of, infer_layout, resolve_node
from .tracing import TraceError, closest_names, trace

CAS_SIDES = ("before", "after")
NO_CAS = "layer output (no CAS module)"
NO_CAS_HERE = "layer output (no CAS module at this layer)"
Data = Union[Dataset, DataLoader, Tuple[torch.Tensor, torch.Tensor]]
ArrayLike = Union[torch.Tensor, np.ndarray]


# -- capturing -------------------------------------------------------------------------------------------------------
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
        has_cas = bool(find_cas_modules(model))
        self.capture_point = NO_CAS_HERE if has_cas else NO_CAS  # where, in words; set below at a CAS layer
        self._handles: list = []
        self._store: List[torch.Tensor] = []
        self._graph_module: Optional[fx.GraphModule] = None
        cas = self._cas_module(layer)
        if cas is not None:
            self._hook_cas(*cas)
        elif isinstance(model, CASModel):
            self._graph_module = self._cas_model_graph(layer)
        else:
            try:
                self._graph_module = self._plain_graph(layer)
            except TraceError:
                if layer not in dict(model.named_modules()) or not layer:
                    raise
                self._hook_module(layer)

    # - resolution -
    def _cas_module(self, layer: str) -> Optional[Tuple[str, CASModule]]:
        if isinstance(self.model, CASModel) and layer in self.model.cas_layers:
            return list(self.model.cas_modules.items())[self.model.cas_layers.index(layer)]
        return None

    def _at_cas(self, key: str, cas: CASModule) -> None:
        """Name the capture point at the CAS module ``cas_modules.<key>``."""
        qualified = f"{CAS_ATTR}.{key}"
        if self.cas_side == "after":
            self.capture_point = f"after CAS mask (output of {qualified})"
        else:
            self.capture_point = f"before CAS mask (input of {qualified})"
        if not cas.suppress:
            self.capture_point += "; suppress=False, so no mask is applied"
        if self.channel_dim is None:
            self.channel_dim = cas.channel_dim

    def _hook_cas(self, key: str, cas: CASModule) -> None:
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


# -- statistics ------------------------------------------------------------------------------------------------------
def _check_acts(acts: torch.Tensor) -> torch.Tensor:
    acts = torch.as_tensor(acts).float()
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"expected channel-wise activations of shape (N, C) with N >= 1, got {tuple(acts.shape)}")
    return acts


def channel_magnitude(acts: torch.Tensor) -> torch.Tensor:
    """Mean absolute activation per channel over examples (the paper's Figure 1)."""
    return _check_acts(acts).abs().mean(dim=0)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def magnitude_gap(natural: torch.Tensor, adversarial: torch.Tensor) -> Dict[str, float]:
    """How much adversarial examples boost channel magnitudes: mean over channels of adv - nat, and mean adv / mean
    nat (> 1 means the signal-boosting effect of Section 3). Inputs are per-channel magnitudes."""
    nat, adv = torch.as_tensor(natural).float(), torch.as_tensor(adversarial).float()
    return {"mean_natural": float(nat.mean()), "mean_adversarial": float(adv.mean()),
            "mean_difference": float((adv - nat).mean()), "ratio": _ratio(float(adv.mean()), float(nat.mean()))}


def activation_frequency(acts: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Per channel, the fraction of examples that activate it (the paper's Figure 2).

    A channel is active in an example when its value exceeds ``threshold`` times the example's largest channel value
    (1 % by default, as in the paper). An example whose largest value is not positive activates nothing.
    """
    acts = _check_acts(acts)
    peak = acts.amax(dim=1, keepdim=True).clamp(min=0)
    return (acts > threshold * peak).float().mean(dim=0)


def normalized_entropy(freq: torch.Tensor) -> float:
    """Entropy of the frequencies normalised to sum 1, divided by log C: 1 for a uniform spread over channels, 0 when
    one channel takes everything. NaN when no channel is ever active; 1 for a single channel."""
    f = torch.as_tensor(freq).double().flatten()
    if f.numel() < 2:
        return 1.0
    total = f.sum()
    if total <= 0:
        return float("nan")
    p = f[f > 0] / total
    return float(-(p * p.log()).sum() / math.log(f.numel()))


def gini(freq: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (C - 1) / C when one channel takes everything.
    NaN when all are zero."""
    f = torch.as_tensor(freq).double().flatten().sort().values
    n, total = f.numel(), f.sum()
    if n == 0 or total <= 0:
        return float("nan")
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * f).sum() / (n * total))


def frequency_gap(natural: torch.Tensor, adversarial: torch.Tensor, rare_fraction: float = 0.5) -> Dict[str, float]:
    """How differently adversarial examples use the channels than natural ones.

    ``mean_abs_difference``: mean over channels of |adv - nat|. The rare channels are the ``rare_fraction`` of
    channels natural examples activate least (the right half of Figure 2, ties by channel index);
    ``rare_frequency_adversarial`` is the adversarial frequency there: the paper's observation is that adversarial
    examples activate these non-robust channels far more often than natural ones, and that CAS suppresses it.
    """
    nat, adv = torch.as_tensor(natural).float().flatten(), torch.as_tensor(adversarial).float().flatten()
    if nat.shape != adv.shape:
        raise ValueError(f"natural and adversarial frequencies differ in shape: {tuple(nat.shape)} vs "
                         f"{tuple(adv.shape)}")
    order = torch.sort(nat, descending=True, stable=True).indices
    k = max(1, int(nat.numel() * rare_fraction))
    rare, frequent = order[-k:], order[:-k]
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    return {"mean_abs_difference": float((adv - nat).abs().mean()), "rare_channels": int(k),
            "rare_frequency_natural": mean(nat[rare]), "rare_frequency_adversarial": mean(adv[rare]),
            "frequent_frequency_natural": mean(nat[frequent]), "frequent_frequency_adversarial": mean(adv[frequent])}


def frequency_summary(natural: torch.Tensor, adversarial: torch.Tensor, rare_fraction: float = 0.5) -> Dict[str, float]:
    """Uniformity (normalised entropy, Gini) of both frequency vectors and their gap, in one flat dict."""
    return {"entropy_natural": normalized_entropy(natural), "entropy_adversarial": normalized_entropy(adversarial),
            "gini_natural": gini(natural), "gini_adversarial": gini(adversarial),
            **frequency_gap(natural, adversarial, rare_fraction)}


def class_frequency_summary(natural_acts: torch.Tensor, adversarial_acts: torch.Tensor, labels: torch.Tensor,
                            threshold: float = 0.01, rare_fraction: float = 0.5) -> Dict[str, float]:
    """:func:`frequency_summary` per class (frequencies counted within each class, as in the paper), averaged over the
    classes present; ``classes`` says how many."""
    labels = torch.as_tensor(labels).flatten()
    rows = []
    for c in torch.unique(labels).tolist():
        keep = labels == c
        rows.append(frequency_summary(activation_frequency(natural_acts[keep], threshold),
                                      activation_frequency(adversarial_acts[keep], threshold), rare_fraction))
    if not rows:
        raise ValueError("no examples")
    out = {key: float(np.nanmean([r[key] for r in rows])) if not all(math.isnan(r[key]) for r in rows)
           else float("nan") for key in rows[0]}
    out["classes"] = len(rows)
    return out


# -- data ------------------------------------------------------------------------------------------------------------
def _batches(data: Data, max_examples: Optional[int], batch_size: int,
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


def _device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _objective(model: nn.Module, objective: str) -> str:
    """"auto": the CAS-adaptive objective (CE + beta * auxiliary CE) on a CAS model, plain CE otherwise."""
    if objective == "auto":
        return "cas" if find_cas_modules(model) else "ce"
    return objective


def default_layer(model: nn.Module, input_size: Sequence[int]) -> str:
    """The layer the paper analyses: on a CAS model the last CAS layer, else the last feature stage (the activation
    ``casify.wrap(layers="auto")`` would choose: the penultimate layer before global pooling)."""
    if isinstance(model, CASModel):
        if model.cas_layers:
            return model.cas_layers[-1]
        model = model.base_model
    return auto_layer_of(model, tuple(input_size))


# -- the report ------------------------------------------------------------------------------------------------------
def _json_safe(value):
    """NaN and infinity as null (JSON has neither), tensors and arrays as lists."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, write) -> Path:
    """``write(tmp_path)``, then rename onto ``path``: a reader never sees a half-written file under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: write(Path(tmp)))
    return path


def _write_text_atomic(path: Path, text: str) -> Path:
    return _write_atomic(path, lambda tmp: tmp.write_text(text))


REPORT_JSON, REPORT_MD = "channel_report.json", "channel_report.md"


@dataclass
class ChannelReport:
    """Everything :func:`analyze` measured. Per-channel vectors are in channel order (figures sort them).

    ``capture_point``: where the activation was taken, in words (``"before CAS mask (input of cas_modules.<key>)"``,
    ``"after CAS mask (output of cas_modules.<key>)"`` or ``"layer output (no CAS module)"``); ``captured`` says how.
    ``magnitude``: per-channel mean |activation| of natural and adversarial examples with :func:`magnitude_gap`.
    ``frequency``: the one class of Figure 2 (``class_index``): per-channel frequencies and :func:`frequency_summary`.
    ``frequency_class_mean``: the same summary computed per class and averaged over the classes present.
    ``figures``: the files written, by kind (paths; in the saved JSON, relative to its folder).
    The raw (N, C) activations and labels are kept as attributes, but not written to JSON.
    """
    layer: str
    captured: str
    cas_side: str
    channels: int
    num_examples: int
    threshold: float
    attack: dict
    accuracy: dict
    magnitude: dict
    frequency: dict
    frequency_class_mean: dict
    figures: dict = field(default_factory=dict)
    capture_point: str = ""
    natural_activations: Optional[torch.Tensor] = field(default=None, repr=False)
    adversarial_activations: Optional[torch.Tensor] = field(default=None, repr=False)
    labels: Optional[torch.Tensor] = field(default=None, repr=False)

    def to_dict(self, relative_to: Optional[Union[str, Path]] = None) -> dict:
        """The report as JSON-safe data; figure paths inside ``relative_to`` are given relative to it."""
        keys = ("layer", "capture_point", "captured", "cas_side", "channels", "num_examples", "threshold", "attack",
                "accuracy", "magnitude", "frequency", "frequency_class_mean", "figures")
        d = {k: getattr(self, k) for k in keys}
        if relative_to is not None:
            d["figures"] = {k: _relative(v, Path(relative_to)) for k, v in self.figures.items()}
        return _json_safe(d)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the JSON report to ``path`` (atomically; figure paths relative to its folder)."""
        path = Path(path)
        return _write_text_atomic(path, json.dumps(self.to_dict(relative_to=path.parent), indent=1) + "\n")

    def write(self, out_dir: Union[str, Path]) -> Path:
        """Write ``channel_report.json`` and ``channel_report.md`` into ``out_dir`` (and list them in ``figures``)."""
        out = Path(out_dir)
        self.figures["report"] = str(out / REPORT_JSON)
        self.figures["markdown"] = str(out / REPORT_MD)
        _write_text_atomic(out / REPORT_MD, self.to_markdown(relative_to=out))
        return self.save(out / REPORT_JSON)

    def summary(self) -> dict:
        """The scalars of the report (no per-channel vectors): what ``casify analyze`` prints."""
        full = self.to_dict()
        out = {key: full[key] for key in ("layer", "capture_point", "captured", "num_examples", "accuracy", "figures")}
        for key in ("magnitude", "frequency", "frequency_class_mean"):
            out[key] = {k: v for k, v in full[key].items() if not isinstance(v, list)}
        return out

    def to_markdown(self, relative_to: Optional[Union[str, Path]] = None) -> str:
        d = self.to_dict(relative_to)
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
        num = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
        attack = d["attack"]
        lines = ["# Channel-wise activation analysis", "",
                 f"- layer: `{d['layer']}`",
                 f"- capture point: **{d['capture_point']}**; captured as: {d['captured']}",
                 f"- examples: {d['num_examples']}; channels: {d['channels']}; a channel is active above "
                 f"{100 * d['threshold']:g} % of the example's largest channel",
                 f"- attack: PGD-{attack['steps']}, L-inf eps = {format_eps(attack['eps'])}, objective "
                 f"`{attack['objective']}`, seed {attack['seed']} (eval mode, predicted CAS routing)",
                 f"- accuracy: natural {pct(d['accuracy']['natural'])}, adversarial "
                 f"{pct(d['accuracy']['adversarial'])}",
                 "", "## Magnitude (Figure 1)", "",
                 "| | natural | adversarial |", "|---|---|---|",
                 f"| mean channel magnitude | {num(d['magnitude']['mean_natural'])} | "
                 f"{num(d['magnitude']['mean_adversarial'])} |", "",
                 f"adversarial / natural: {num(d['magnitude']['ratio'])}; mean difference "
                 f"{num(d['magnitude']['mean_difference'])}."]

        def table(f: dict) -> List[str]:
            return ["| statistic | natural | adversarial |", "|---|---|---|",
                    f"| normalised entropy | {num(f['entropy_natural'])} | {num(f['entropy_adversarial'])} |",
                    f"| Gini coefficient | {num(f['gini_natural'])} | {num(f['gini_adversarial'])} |",
                    f"| frequency of the {f['rare_channels']:g} rarely used channels | "
                    f"{num(f['rare_frequency_natural'])} | {num(f['rare_frequency_adversarial'])} |",
                    f"| frequency of the other channels | {num(f['frequent_frequency_natural'])} | "
                    f"{num(f['frequent_frequency_adversarial'])} |", "",
                    f"mean |adversarial - natural| frequency: {num(f['mean_abs_difference'])}."]

        freq = d["frequency"]
        lines += ["", f"## Frequency, class {freq['class_index']} (Figure 2)", ""]
        lines += table(freq) if freq.get("class_examples") else ["No example of this class was analysed."]
        mean = d["frequency_class_mean"]
        lines += ["", f"## Frequency, averaged over {mean['classes']} classes", ""] + table(mean)
        files = {k: v for k, v in d["figures"].items() if k not in ("report", "markdown")}
        if files:
            lines += ["", "## Figures", ""] + [f"- {k}: {v}" for k, v in files.items()]
        return "\n".join(lines) + "\n"


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


# -- figures ---------------------------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 3.6):
    """A figure drawn with Agg without pyplot, so no global backend is switched in the caller's process."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=120)


def _sorted_bars(ax, natural: np.ndarray, adversarial: np.ndarray) -> None:
    order = np.argsort(-natural, kind="stable")
    x = np.arange(len(order))
    ax.bar(x, adversarial[order], width=1.0, color="tab:red", alpha=0.55, label="adversarial", linewidth=0)
    ax.bar(x, natural[order], width=1.0, color="tab:blue", alpha=0.55, label="natural", linewidth=0)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.legend(loc="upper right", frameon=False)


def _where(capture_point: str) -> str:
    """The short form of a capture point for an axis label: ``"before CAS mask"``, ``"layer output"``."""
    return capture_point.split(" (")[0].split(";")[0]


def plot_magnitude(natural: ArrayLike, adversarial: ArrayLike, path: Union[str, Path], title: str = "", *,
                   capture_point: str = "") -> Path:
    """Figure 1: per-channel magnitude, channels sorted by descending natural magnitude. ``capture_point`` (see
    :class:`ChannelReport`) is shown under the title and in the axis label."""
    return _plot_sorted(natural, adversarial, path, "channel (sorted by natural magnitude)", "mean |activation|",
                        title or "channel-wise activation magnitude", capture_point=capture_point)


def plot_frequency(natural: ArrayLike, adversarial: ArrayLike, path: Union[str, Path], title: str = "", *,
                   capture_point: str = "") -> Path:
    """Figure 2: per-channel activation frequency, channels sorted by descending natural frequency."""
    return _plot_sorted(natural, adversarial, path, "channel (sorted by natural frequency)", "activation frequency",
                        title or "channel-wise activation frequency", ylim=(0, 1.05), capture_point=capture_point)


def _plot_sorted(natural: ArrayLike, adversarial: ArrayLike, path: Union[str, Path], xlabel: str, ylabel: str,
                 title: str, ylim=None, capture_point: str = "") -> Path:
    """Natural vs adversarial bars per channel, sorted by the natural values (both figures of Section 3)."""
    fig = _figure()
    ax = fig.add_subplot()
    _sorted_bars(ax, np.asarray(natural, dtype=float), np.asarray(adversarial, dtype=float))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel}\n({_where(capture_point)})" if capture_point else ylabel)
    ax.set_title(f"{title}\ncaptured {capture_point}" if capture_point else title, fontsize=10)
    fig.tight_layout()
    return _write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:] or "png"))


# -- analysis --------------------------------------------------------------------------------------------------------
def analyze(model: nn.Module, data: Data, layer: Optional[str] = None, *, eps: float = 8 / 255, steps: int = 20,
            alpha: Optional[float] = None, attack_objective: str = "auto", class_index: int = 0,
            threshold: float = 0.01, rare_fraction: float = 0.5, cas_side: str = "before",
            channel_dim: Optional[int] = None, max_examples: Optional[int] = 1000, batch_size: int = 128,
            out_dir: Optional[Union[str, Path]] = None, seed: int = 0, device=None) -> ChannelReport:
    """Section 3 of the paper on ``model`` at ``layer``: magnitudes and activation frequencies of natural examples and
    their PGD adversarial examples (L-inf, ``eps``, ``steps`` steps, random start, eval mode, predicted routing).

    Args:
        data: a dataset of (image, label) (a seeded random subset of ``max_examples`` is used), a DataLoader or a
            tuple of tensors (x, y) (their first ``max_examples``). Images as the model takes them (pixels in [0, 1]
            for casify models).
        layer: a module or graph-node name; by default the last CAS layer of a CAS model, else the last feature stage.
        attack_objective: ``"auto"`` is ``"cas"`` (the adaptive attack) on a CAS model and ``"ce"`` otherwise.
        class_index: the class whose frequencies Figure 2 shows; statistics averaged over classes are also reported.
        threshold: a channel is active above this fraction of the example's largest channel value (paper: 1 %).
        rare_fraction: the share of channels, least activated by natural examples, counted as rare.
        cas_side: at a CAS layer, ``"before"`` the mask (the CAS module's input, default: the same point as the
            layer's output in a model without CAS) or ``"after"`` it. The report's ``capture_point`` says which.
        out_dir: where to write ``channel_magnitude.png``, ``channel_frequency.png``, ``channel_report.json`` and
            ``channel_report.md`` (each file atomically; other files in the folder are left alone).
    """
    device = _device(model, device)
    objective = _objective(model, attack_objective)
    batches = _batches(data, max_examples, batch_size, seed)
    first = next(batches, None)
    if first is None:
        raise ValueError("the data holds no examples")
    if layer is None:
        layer = default_layer(model, tuple(first[0].shape[1:]))
    generator = torch.Generator(device=device).manual_seed(seed)
    nat_acts, adv_acts, labels, nat_pred, adv_pred = [], [], [], [], []
    with ActivationProbe(model, layer, cas_side=cas_side, channel_dim=channel_dim) as probe:
        for x, y in _chain(first, batches):
            x, y = x.to(device), y.to(device)
            logits, acts = probe(x)
            x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, objective=objective, generator=generator)
            adv_logits, adv = probe(x_adv)
            nat_acts.append(acts.cpu())
            adv_acts.append(adv.cpu())
            labels.append(y.cpu())
            nat_pred.append(logits.argmax(1).cpu())
            adv_pred.append(adv_logits.argmax(1).cpu())
        captured, capture_point = probe.captured, probe.capture_point
    nat, adv, labels = torch.cat(nat_acts), torch.cat(adv_acts), torch.cat(labels)
    nat_pred, adv_pred = torch.cat(nat_pred), torch.cat(adv_pred)

    nat_mag, adv_mag = channel_magnitude(nat), channel_magnitude(adv)
    keep = labels == class_index
    if bool(keep.any()):
        nat_freq = activation_frequency(nat[keep], threshold)
        adv_freq = activation_frequency(adv[keep], threshold)
        frequency = {"class_index": class_index, "class_examples": int(keep.sum()),
                     "natural": nat_freq, "adversarial": adv_freq,
                     **frequency_summary(nat_freq, adv_freq, rare_fraction)}
    else:
        warnings.warn(f"no example of class {class_index} among the {len(labels)} analysed; the one-class frequency "
                      "statistics and Figure 2 are left out (pass class_index= or more examples)")
        frequency = {"class_index": class_index, "class_examples": 0}
    report = ChannelReport(
        layer=layer, captured=captured, capture_point=capture_point, cas_side=cas_side, channels=int(nat.shape[1]),
        num_examples=int(len(labels)), threshold=float(threshold),
        attack={"name": "pgd", "norm": "linf", "eps": float(eps), "steps": int(steps),
                "alpha": resolve_alpha(eps, steps, alpha),
                "objective": objective, "seed": seed},
        accuracy={"natural": float((nat_pred == labels).float().mean()),
                  "adversarial": float((adv_pred == labels).float().mean())},
        magnitude={"natural": nat_mag, "adversarial": adv_mag, **magnitude_gap(nat_mag, adv_mag)},
        frequency=frequency,
        frequency_class_mean=class_frequency_summary(nat, adv, labels, threshold, rare_fraction),
        natural_activations=nat, adversarial_activations=adv, labels=labels)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = type(model.base_model if isinstance(model, CASModel) else model).__name__
        report.figures["magnitude"] = str(plot_magnitude(
            nat_mag.numpy(), adv_mag.numpy(), out / "channel_magnitude.png",
            f"{name} @ {layer}: magnitude ({len(labels)} examples, PGD-{steps})", capture_point=capture_point))
        if "natural" in frequency:
            report.figures["frequency"] = str(plot_frequency(
                frequency["natural"].numpy(), frequency["adversarial"].numpy(), out / "channel_frequency.png",
                f"{name} @ {layer}: frequency, class {class_index} ({frequency['class_examples']} examples)",
                capture_point=capture_point))
        report.write(out)
    return report


def run_analysis(model: nn.Module, data: Data, layer: Optional[str], out: Union[str, Path], *, tsne: bool = False,
                 tsne_examples: int = 500, eps: float = 8 / 255, steps: int = 20, attack_objective: str = "auto",
                 class_index: int = 0, threshold: float = 0.01, cas_side: str = "before",
                 max_examples: Optional[int] = 1000, batch_size: int = 128, seed: int = 0,
                 device=None) -> ChannelReport:
    """What ``casify analyze`` runs once the model and data are loaded: :func:`analyze` writing its figures and
    reports into ``out``, and with ``tsne`` the t-SNE figure of penultimate features (``tsne.png``, Figure 9) on
    ``tsne_examples`` examples, listed in the report. ``out`` should be a new folder (the command line writes into a
    staging folder that replaces ``--out`` at the end; see :mod:`casify.output_dir`)."""
    out = Path(out)
    report = analyze(model, data, layer, eps=eps, steps=steps, attack_objective=attack_objective,
                     class_index=class_index, threshold=threshold, cas_side=cas_side, max_examples=max_examples,
                     batch_size=batch_size, out_dir=out, seed=seed, device=device)
    if tsne:
        result = tsne_plot(model, data, out / "tsne.png", eps=eps, steps=steps, attack_objective=attack_objective,
                           max_examples=tsne_examples, batch_size=batch_size, seed=seed, device=device)
        report.figures["tsne"] = str(result.path)
        report.write(out)
    return report


def _chain(first, rest):
    yield first
    yield from rest


# -- t-SNE of penultimate features (Figure 9) ------------------------------------------------------------------------
class _ClassifierInputProbe:
    """Captures the input of the last ``nn.Linear`` that runs in a forward, outside CAS modules: the final
    classifier's input, i.e. the penultimate features (timm's ``forward_head(pre_logits=True)``), with the CAS masks
    of a wrapped model applied upstream."""

    def __init__(self, model: nn.Module):
        self.model = model
        inside_cas = {id(m) for cas in find_cas_modules(model) for m in cas.modules()}
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
            if self._last is None and not isinstance(self.model, CASModel) and hasattr(self.model, "forward_head"):
                return pool_channels(self.model.forward_head(self.model.forward_features(x), pre_logits=True), -1)
        if self._last is None:
            raise LayerError("no nn.Linear classifier ran in the forward, so the penultimate features are unknown; "
                             "pass layer= (a module or graph-node name) to t-SNE that layer's channel-wise activation")
        feats = self._last.detach().float()
        return feats if feats.dim() == 2 else pool_channels(feats, -1)  # a per-token head: average the tokens

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class TSNEResult:
    """The 2-D embeddings behind a t-SNE figure (one per panel) and the labels that colour them."""
    path: Path
    labels: np.ndarray
    natural: np.ndarray
    adversarial: Optional[np.ndarray] = None
    capture_point: str = ""


def _class_names(model: nn.Module, data, num_classes: int) -> List[str]:
    names = getattr(data, "classes", None) or getattr(getattr(data, "dataset", None), "classes", None)
    if names is None and isinstance(model, CASModel):
        names = model.casify_config.get("class_names")
    names = list(names) if names else []
    return [str(names[i]) if i < len(names) else str(i) for i in range(num_classes)]


def _embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE
    n = len(features)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 examples, got {n}")
    perplexity = min(float(perplexity), (n - 1) / 3)  # sklearn requires perplexity < n; n / 3 keeps it meaningful
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # With torch loaded, two OpenMP runtimes spin against each other in sklearn's Barnes-Hut loop (seconds become
    # minutes); one OpenMP thread avoids that and is fast enough at t-SNE sizes (500 points: ~3 s).
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(features)


def tsne_plot(model: nn.Module, data: Data, out_path: Union[str, Path], layer: Optional[str] = None, *,
              adversarial: bool = True, eps: float = 8 / 255, steps: int = 20, alpha: Optional[float] = None,
              attack_objective: str = "auto", max_examples: int = 500, perplexity: float = 30.0,
              batch_size: int = 128, cas_side: str = "before", seed: int = 0, device=None) -> TSNEResult:
    """t-SNE of deep features coloured by true class, natural examples and (``adversarial=True``) their PGD
    adversarial examples side by side, as in the paper's Figure 9. Each panel is its own t-SNE run.

    Features are the penultimate ones (the final ``nn.Linear``'s input) unless ``layer`` names another layer, whose
    channel-wise activation is then used. Examples are a seeded random subset of ``max_examples``.
    """
    device = _device(model, device)
    objective = _objective(model, attack_objective)
    generator = torch.Generator(device=device).manual_seed(seed)
    probe = (ActivationProbe(model, layer, cas_side=cas_side) if layer is not None else _ClassifierInputProbe(model))
    capture_point = (f"{layer}: {probe.capture_point}" if layer is not None
                     else "penultimate features (input of the final nn.Linear)")
    nat_feats, adv_feats, labels = [], [], []
    try:
        extract = (lambda x: probe(x)[1]) if layer is not None else probe
        for x, y in _batches(data, max_examples, batch_size, seed):
            x, y = x.to(device), y.to(device)
            nat_feats.append(extract(x).cpu())
            if adversarial:
                x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, objective=objective, generator=generator)
                adv_feats.append(extract(x_adv).cpu())
            labels.append(y.cpu())
    finally:
        probe.close()
    labels_np = torch.cat(labels).numpy()
    panels = [("natural examples", _embed(torch.cat(nat_feats).numpy(), perplexity, seed))]
    if adversarial:
        panels.append((f"PGD-{steps} adversarial examples", _embed(torch.cat(adv_feats).numpy(), perplexity, seed)))

    num_classes = int(labels_np.max()) + 1
    names = _class_names(model, data, num_classes)
    fig = _figure(5.0 * len(panels) + 1.5, 5.0)
    from matplotlib import colormaps
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    for i, (title, emb) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in np.unique(labels_np):
            pts = emb[labels_np == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(int(c) % cmap.N), label=names[int(c)])
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
    if num_classes <= 20:
        fig.axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2)
    fig.suptitle(f"t-SNE of {capture_point}", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    _write_atomic(out_path, lambda tmp: fig.savefig(tmp, format=out_path.suffix[1:] or "png"))
    return TSNEResult(out_path, labels_np, panels[0][1], panels[1][1] if adversarial else None, capture_point)
