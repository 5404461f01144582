"""What a defense is and where it goes in a model, before any model class or file exists: the defense config
(:class:`~casify.core.config.DefenseConfig`, the validation of a ``config.json`` read as data, the base-model spec),
tracing and layer discovery (layouts, shapes, ``"auto"``), the fx rewrite that puts defense modules into a traced copy,
input normalisation and range checks, routing, eps budgets, host-sync counting and the code version a run records.
It may import :mod:`casify.defenses`, :mod:`casify.models` and :mod:`casify.version` only: writing folders lives in
:mod:`casify.io`, the wrapped model class in :mod:`casify.model.defended`.
"""
