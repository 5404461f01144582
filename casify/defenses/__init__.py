"""Channel-wise activation defenses, one file each, behind one registry (:func:`register_defense`).

- ``base.py``: :class:`DefenseModule` (what every defense declares), the registry, option checks, and the helpers the
  rest of casify uses (:func:`find_defense_modules`, :func:`aux_logits`);
- ``routed.py``: the routing state of defenses that pick a class (:class:`RoutedDefense`);
- ``cas.py``: CAS (Bai et al., ICLR 2021); ``cifs.py``: CIFS (Yan et al., ICML 2021); ``fsr.py``: FSR (Kim et al.,
  CVPR 2023).

``casify.wrap(model, layers, defense="cifs", **options)`` builds any of them. Every module of this folder is imported
with the package (:func:`import_defense_files`), so a new defense is one file here and no other edit.
"""
from .base import (DEFENSES, LAYOUTS, DefenseModule, Option, attack_aux_logits, attack_head_count, aux_logits, find_defense_modules, get_defense,
                   layout_of, register_defense, routed_modules, validate_options)
from .cas import CASModule, find_cas_modules
from .cifs import CIFSModule
from .fsr import FSRModule
from .routed import CASRoutingWarning, RoutedDefense


def import_defense_files() -> None:
    """Import every module of this folder, so that a file holding a new defense registers it with no import to add
    here (the defenses above are imported by name only because they are public names of the package)."""
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


import_defense_files()

__all__ = ["DEFENSES", "LAYOUTS", "CASModule", "CASRoutingWarning", "CIFSModule", "DefenseModule", "FSRModule",
           "Option", "RoutedDefense", "attack_aux_logits", "attack_head_count", "aux_logits", "find_cas_modules",
           "find_defense_modules", "get_defense", "layout_of", "register_defense", "routed_modules",
           "validate_options"]
