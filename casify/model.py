"""The wrapped model: the original's modules and parameters under their own names, CAS modules beside them, and a
forward compiled from the rewritten fx graph of the current mode (train or eval)."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import fx, nn

from .cas import CASModule
from .normalize import InputRangeCheck

CAS_ATTR = "cas_modules"
NORMALIZE_ATTR = "input_normalize"
DATA_CFG_ATTRS = ("pretrained_cfg", "default_cfg")
"""The attributes timm's data helpers (``resolve_data_config``, ``resolve_model_data_config``) read from a model."""


def compile_graph(graph: fx.Graph) -> Callable:
    """Python code for ``graph`` whose ``self`` is the wrapped model, compiled once."""
    code = graph.python_code(root_module="self")
    namespace: Dict[str, Any] = dict(code.globals)
    exec(compile(code.src, "<casify graph>", "exec"), namespace)
    return namespace["forward"]


class CASModel(nn.Module):
    """A classifier with CAS modules inserted after chosen activations.

    ``forward(x)`` returns logits only, like the original. The auxiliary logits of the last forward are in
    :attr:`cas_outputs` (a dict from layer name to (N, num_classes) logits). The state dict holds the original's keys
    unchanged plus ``cas_modules.*``. Train/eval-dependent behaviour of the original (dropout, drop-path, batch norm and
    any ``self.training`` branch) is kept by tracing both modes: each mode runs its own graph.
    """

    def __init__(self, base: nn.Module, graphs: Dict[bool, fx.Graph], cas_modules: Dict[str, CASModule],
                 normalize: Optional[nn.Module], config: dict, constants: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        reserved = {CAS_ATTR, NORMALIZE_ATTR}
        clash = reserved & (set(base._modules) | set(base._parameters) | set(base._buffers) | set(vars(base)))
        if clash:
            raise ValueError(f"the model already has attributes named {sorted(clash)}, which casify needs for its own "
                             "modules; rename them in your model")
        for name, child in base._modules.items():
            self.add_module(name, child)
        for name, param in base._parameters.items():
            self.register_parameter(name, param)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        for name, value in (constants or {}).items():  # tensors fx captured while tracing
            self.register_buffer(name, value, persistent=False)
        self.cas_modules = nn.ModuleDict(cas_modules)
        if normalize is not None:
            self.input_normalize = normalize
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_graphs", graphs)
        object.__setattr__(self, "_forwards", {mode: compile_graph(g) for mode, g in graphs.items()})
        object.__setattr__(self, "casify_config", config)
        object.__setattr__(self, "_range_check", self._new_range_check())
        self.train(base.training)

    # -- running ------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._range_check is not None:
            self._range_check(args[0] if args else next(iter(kwargs.values()), None), self.training)
        return self._forwards[self.training](self, *args, **kwargs)

    def _new_range_check(self) -> Optional[InputRangeCheck]:
        """A check for models whose input is pixels in [0, 1]: normalisation inside, or an original that says so."""
        if NORMALIZE_ATTR in self._modules:
            return InputRangeCheck("its input normalisation lives inside the model")
        cfg = getattr(self._base, "pretrained_cfg", None)
        if isinstance(cfg, Mapping) and _is_unit(cfg.get("mean"), 0.0) and _is_unit(cfg.get("std"), 1.0):
            return InputRangeCheck("its pretrained config says mean 0, std 1")
        return None

    @property
    def graph(self) -> fx.Graph:
        """The rewritten graph that the current mode runs."""
        return self._graphs[self.training]

    @property
    def cas_layers(self) -> List[str]:
        """Names of the layers that carry a CAS module, in graph order."""
        return list(self.casify_config["cas"]["layers"])

    @property
    def cas_outputs(self) -> Dict[str, torch.Tensor]:
        """Auxiliary logits of the last forward, by layer name (the side channel beside the logits)."""
        names = self.cas_layers
        outs = {}
        for name, module in zip(names, self.cas_modules.values()):
            if module.last_aux_logits is None:
                raise RuntimeError("no auxiliary logits yet: run a forward through the model first")
            outs[name] = module.last_aux_logits
        return outs

    @property
    def num_classes(self) -> int:
        return int(self.casify_config["cas"]["num_classes"])

    @property
    def base_model(self) -> nn.Module:
        """The original model object. It shares its modules with this one; see :func:`casify.unwrap`."""
        return self._base

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is not None and not name.startswith("_"):
                value = getattr(base, name, _MISSING)
                # Metadata (timm's pretrained_cfg, num_features, ...) passes through; methods of the original would
                # run without CAS, so they do not.
                if value is not _MISSING and not callable(value):
                    if name in DATA_CFG_ATTRS:
                        return self._pixel_data_cfg(value)
                    return value
            raise

    def _pixel_data_cfg(self, cfg):
        """The original's data config, describing this model's real input.

        With normalisation inside, the model takes pixels in [0, 1]: mean 0 and std 1, so that
        ``timm.data.create_transform(**timm.data.resolve_data_config(model=wrapped))`` does not normalise a second
        time. Input size, interpolation and crop are the original's. A fresh copy: the original's config is untouched.
        """
        norm = self._modules.get(NORMALIZE_ATTR)
        if norm is None or cfg is None:
            return cfg
        channels = int(norm.mean.shape[1])
        pixels = {"mean": (0.0,) * channels, "std": (1.0,) * channels}
        if isinstance(cfg, Mapping):
            return {**cfg, **pixels}
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            return dataclasses.replace(cfg, **pixels)
        return cfg

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("_forwards", "_range_check"):
                continue
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        object.__setattr__(new, "_forwards", {mode: compile_graph(g) for mode, g in new._graphs.items()})
        object.__setattr__(new, "_range_check", new._new_range_check())  # a new model warns on its own
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError("casify models are not pickled (pickles run code on load); save with model.save_pretrained(dir) "
                        "and load with casify.from_pretrained(dir)")

    # -- saving -------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        """Write ``config.json`` and ``model.safetensors`` to ``save_directory`` (see :func:`casify.save_pretrained`)."""
        from .hub import save_pretrained
        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the folder of :meth:`save_pretrained` with a model card (see :func:`casify.push_to_hub`)."""
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, **kwargs)


_MISSING = object()


def _is_unit(values, target: float) -> bool:
    try:
        return len(values) > 0 and all(float(v) == target for v in values)
    except TypeError:
        return False
