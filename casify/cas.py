"""The CAS names at their historical place, re-exported for code written before the family engine: the module and its
compatibility alias ``find_cas_modules`` live in :mod:`casify.defenses.cas`, one defense of the family
(:mod:`casify.defenses`). ``find_cas_modules`` and ``aux_logits`` cover every registered defense."""
from __future__ import annotations

from .defenses.base import aux_logits, find_defense_modules
from .defenses.cas import INITS, CASModule, find_cas_modules
from .defenses.routed import CASRoutingWarning

__all__ = ["INITS", "CASModule", "CASRoutingWarning", "aux_logits", "find_cas_modules", "find_defense_modules"]
