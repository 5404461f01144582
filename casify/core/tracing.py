"""Symbolic tracing with readable node names, in both train and eval mode.

Node names follow torchvision's feature-extraction convention: a node is named by the qualified name of the module whose
forward created it plus the operation (``layer4.1.relu_1`` is the second call of ``layer4.1.relu``). The tracer also
records which node each module returned, so a module name can mean that module's output. timm's own leaf modules and
autowrapped functions are used, so models that plain ``symbolic_trace`` cannot handle still trace.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List

import torch
from torch import fx, nn


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message says where and what to do."""


def _timm_notrace():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm missing or too old
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class LeafModuleTracer(fx.Tracer):
    """An fx tracer that does not trace into timm's no-trace modules and functions or the caller's extra ones (the
    job of torchvision's ``LeafModuleAwareTracer``)."""

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = ()):
        timm_leaves, timm_functions = _timm_notrace()
        functions = tuple(f for f in list(timm_functions) + list(autowrap_functions) if callable(f))
        super().__init__(autowrap_functions=functions)
        self.leaf_types = tuple(set(timm_leaves) | set(leaf_modules))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class NamingTracer(LeafModuleTracer):
    """Names nodes by module path, remembers each module's output node, and which module a failure happened in
    (the job of torchvision's ``NodePathTracer``)."""

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = ()):
        super().__init__(leaf_modules, autowrap_functions)
        self.casify_scope = ""
        self.error_scope = None
        self.qualnames: Dict[fx.Node, str] = {}
        self.module_outputs: Dict[str, List[fx.Node]] = defaultdict(list)
        self._counts: Counter = Counter()

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        outer, self.casify_scope = self.casify_scope, qualname
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.error_scope is None:  # the innermost module that failed
                self.error_scope = (qualname, type(m).__name__)
            raise
        finally:
            self.casify_scope = outer
        if isinstance(out, fx.Proxy) and qualname:
            self.module_outputs[qualname].append(out.node)
        return out

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *a, **k):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *a, **k)
        node = proxy.node
        if node.op == "call_module":
            base = node.target
        elif node.op in ("placeholder", "output", "get_attr"):
            base = node.name if node.op != "get_attr" else node.target
        else:
            op = re.sub(r"_\d+$", "", node.name)
            base = f"{self.casify_scope}.{op}" if self.casify_scope else op
        count = self._counts[base]
        self._counts[base] += 1
        self.qualnames[node] = base if count == 0 else f"{base}_{count}"
        return proxy


@dataclass
class TracedGraph:
    """One traced graph with its readable names."""
    graph: fx.Graph
    qualnames: Dict[fx.Node, str]
    module_outputs: Dict[str, List[fx.Node]]
    constants: Dict[str, torch.Tensor] = field(default_factory=dict)
    nodes_by_name: Dict[str, fx.Node] = field(default_factory=dict)

    def __post_init__(self):
        self.nodes_by_name = {name: node for node, name in self.qualnames.items() if node.graph is self.graph}


def trace(model: nn.Module, training: bool, leaf_modules=(), autowrap_functions=()) -> TracedGraph:
    """Trace ``model`` as it behaves in training (``training=True``) or eval mode; the model's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    tracer = NamingTracer(leaf_modules, autowrap_functions)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds of errors; translate them into one that says what to do
        where = "{!r} ({})".format(*tracer.error_scope) if tracer.error_scope else "its own forward"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} in {'train' if training else 'eval'} mode "
            f"(inside {where}): {type(exc).__name__}: {exc}\n"
            "Data-dependent Python control flow cannot be traced. Mark the offending submodule's class as a leaf with "
            "casify.wrap(..., leaf_modules=[ThatClass]) (CAS can then go after it but not inside it), or a helper "
            "function with autowrap_functions=[fn]; timm models can also use timm.layers.register_notrace_module."
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    constants = _take_constants(model, graph, prefix=f"_casify_const_{'train' if training else 'eval'}_")
    return TracedGraph(graph, dict(tracer.qualnames), dict(tracer.module_outputs), constants)


def _take_constants(model: nn.Module, graph: fx.Graph, prefix: str) -> Dict[str, torch.Tensor]:
    """fx stores tensors created during tracing as ``_tensor_constant<i>`` attributes of the traced model. Move them
    off the user's model and rename them, so each graph owns its constants and the original stays untouched."""
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target.startswith("_tensor_constant") and "." not in node.target:
            value = model.__dict__.get(node.target)
            if not isinstance(value, torch.Tensor):
                continue
            new_name = prefix + node.target[len("_tensor_constant"):]
            constants[new_name] = value
            node.target = new_name
    for node in graph.nodes:
        if node.op == "get_attr" and node.target.startswith(prefix):
            old = "_tensor_constant" + node.target[len(prefix):]
            model.__dict__.pop(old, None)
    return constants


def closest_names(name: str, candidates: Iterable[str], n: int = 5) -> List[str]:
    import difflib
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(close) < n:
        close += [c for c in candidates if (c.startswith(name) or name.startswith(c)) and c not in close][: n - len(close)]
    return close
