"""The historical module of CAS's names, for code written before the family engine: what it offered, re-exported
from :mod:`casify.defenses` (CAS itself is ``casify/defenses/cas.py``, one defense of the family)."""
from __future__ import annotations

from .defenses.base import aux_logits, find_defense_modules
from .defenses.cas import *  # noqa: F401,F403  (the module, its inits and the compatibility alias)
from .defenses.cas import __all__ as _CAS_NAMES
from .defenses.routed import CASRoutingWarning

__all__ = [*_CAS_NAMES, "CASRoutingWarning", "aux_logits", "find_defense_modules"]
