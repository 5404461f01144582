"""The defended model: :class:`~casify.model.defended.DefendedModel` (the wrapper that owns the traced graphs, the
defense modules and ``save_pretrained`` / ``push_to_hub``), :func:`~casify.model.surgery.wrap` / ``unwrap`` (the
rewrite of :mod:`casify.core` plus the class), :func:`~casify.model.loading.from_pretrained`, which checks a saved
folder or Hub repo and rebuilds it through ``wrap``, and the base before it is wrapped:
:func:`~casify.model.pretrained_weights.build_named_base` (a timm or torchvision model with its weights, from the Hub or
a checked checkpoint, and the spec that records which). It may import :mod:`casify.io` (a model saves itself there),
:mod:`casify.core` and below; training, evaluation and the commands import it, never the other way round.
"""
from .defended import DefendedModel

__all__ = ["DefendedModel"]
