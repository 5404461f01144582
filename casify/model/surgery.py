"""The two entry points of model surgery: ``wrap`` (original -> wrapped model) and ``unwrap`` (and back).

``wrap`` is two steps, each in its own layer: :func:`casify.core.rewrite.rewrite` turns the original and a
:class:`~casify.core.config.DefenseConfig` into rewritten graphs, CAS modules and the resolved config, and
:class:`casify.model.defended.DefendedModel` is built from them. Layer discovery (``list_layers``, ``Layer``, ``LayerError``,
``default_input_size``) lives in :mod:`casify.core.discovery` and is re-exported here for old imports.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Union

from torch import nn

from ..core.config import DefenseConfig, as_config
from ..defenses import validate_options
from ..core.discovery import (Layer, LayerError, LayerSpec, Layout, default_input_size,  # noqa: F401  (re-exported)
                        list_layers)
from .defended import DefendedModel
from ..core.rewrite import rewrite

__all__ = ["wrap", "unwrap", "list_layers", "Layer", "LayerError", "Layout", "default_input_size"]


def wrap(model: nn.Module, layers: Union[LayerSpec, DefenseConfig] = "auto", *, num_classes: Optional[int] = None,
         init: Optional[str] = None, suppress: bool = True, normalize="auto",
         input_size: Optional[Sequence[int]] = None, channel_dims: Optional[Dict[str, int]] = None,
         leaf_modules: Iterable[type] = (), autowrap_functions: Iterable = (), base_spec: Optional[dict] = None,
         class_names: Optional[Sequence[str]] = None, defense: str = "cas",
         layer_options: Optional[Dict[str, Dict[str, Any]]] = None, **options) -> DefendedModel:
    """Insert a defense module (CAS by default) after each of ``layers`` in ``model`` and return the wrapped model.

    Args:
        model: any classifier that torch.fx can trace (timm's leaf modules are used automatically).
        layers: module names (their output), graph-node names (a call site), ``"re:<regex>"`` or compiled patterns
            (full match, module names first), or ``"auto"`` (the last feature stage). See :func:`list_layers`.
            An empty list gives a model without CAS that still has normalisation inside and casify's save/load
            (the plain-AT baseline of a comparison). Or a :class:`~casify.core.config.DefenseConfig` holding every setting
            below except ``leaf_modules`` / ``autowrap_functions`` (then pass none of the others):
            ``casify.wrap(model, DefenseConfig(layers=["layer4"], init="paper"))``; ``from_pretrained`` takes this path
            with the saved config.
        num_classes: classes of the auxiliary classifiers; by default the model's own output width.
        init: ``"identity"`` (the wrapped model computes what the original did at insertion) or ``"paper"``
            (PyTorch's default init, as in the paper); None: the defense's default (CAS and FSR: identity; CIFS:
            paper, the authors' form).
        suppress: False keeps the auxiliary classifiers but applies no mask (CAS's Table 2 ablation).
        normalize: ``"auto"`` (timm's pretrained mean/std when present), ``"imagenet"``, ``(mean, std)`` or None.
            With normalisation inside, inputs are pixels in [0, 1].
        input_size: (C, H, W) of the dummy input used to find shapes; by default timm's pretrained input size or 224.
        channel_dims: per-layer channel axis, for layouts casify cannot tell from the shape.
        leaf_modules / autowrap_functions: extra module classes / functions torch.fx should not trace into.
        base_spec: how to rebuild the original (``{"source": "timm", "name": ..., "kwargs": {...}}``) for saving;
            inferred for timm and torchvision models.
        class_names: optional names of the classes, stored in the saved config.
        defense: a registered defense (:data:`casify.defenses.DEFENSES`): ``"cas"`` (default), ``"cifs"``,
            ``"fsr"``, or one registered with :func:`casify.defenses.register_defense`.
        layer_options: per-layer overrides of ``options``, keyed by layer name, e.g. CIFS as its authors built it:
            ``layer_options={"layer4.0": {"probe": "mlp"}}`` with ``probe="linear"`` for the others.
        **options: the defense's options (e.g. ``top_k=1`` for CIFS, ``tau=0.1`` for FSR); unknown ones and
            values outside what the defense allows are refused.
    """
    if isinstance(model, DefendedModel):
        raise ValueError("the model is already wrapped by casify; unwrap it first or list all layers in one wrap call")
    if isinstance(layers, DefenseConfig):
        given = {"num_classes": num_classes is not None, "init": init is not None, "suppress": suppress is not True,
                 "defense": defense != "cas", "options": bool(options), "layer_options": bool(layer_options),
                 "normalize": not (isinstance(normalize, str) and normalize == "auto"),
                 "input_size": input_size is not None, "channel_dims": channel_dims is not None,
                 "base_spec": base_spec is not None, "class_names": class_names is not None}
        clash = sorted(k for k, v in given.items() if v)
        if clash:
            raise TypeError(f"casify.wrap got a DefenseConfig and also {clash}; set them in the config "
                            "(config.replace(...)) instead")
        config = layers
    else:
        validate_options(defense, {k: v for k, v in options.items()}, where="wrap options")
        config = as_config(layers, num_classes=num_classes, init=init, suppress=suppress, normalize=normalize,
                           input_size=input_size, channel_dims=channel_dims, base_spec=base_spec,
                           class_names=class_names, defense=defense, defense_options=options,
                           layer_options=layer_options or {})
    rewritten = rewrite(model, config, leaf_modules, autowrap_functions)
    return DefendedModel.from_rewrite(model, rewritten)


def unwrap(model: nn.Module) -> nn.Module:
    """The original model, without CAS, holding the wrapped model's current (trained) weights and mode.

    The result shares its modules and parameters with ``model``; ``copy.deepcopy`` it for an independent copy.
    """
    if not isinstance(model, DefendedModel):
        raise TypeError(f"casify.unwrap expects a model returned by casify.wrap, got {type(model).__name__}")
    base = model.base_model
    for name in base._modules:
        base._modules[name] = model._modules[name]
    for name in base._parameters:
        base._parameters[name] = model._parameters[name]
    for name in base._buffers:
        base._buffers[name] = model._buffers[name]
    base.train(model.training)
    return base
