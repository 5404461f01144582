"""The CAS names at their historical place: the module now lives in :mod:`casify.defenses.cas`, one defense of the
family (:mod:`casify.defenses`). ``find_cas_modules`` and ``aux_logits`` cover every registered defense."""
from __future__ import annotations

from .defenses.base import aux_logits, find_defense_modules
from .defenses.cas import INITS, CASModule
from .defenses.routed import CASRoutingWarning

find_cas_modules = find_defense_modules

__all__ = ["INITS", "CASModule", "CASRoutingWarning", "aux_logits", "find_cas_modules", "find_defense_modules"]
