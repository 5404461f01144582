"""casify: retrofit Channel-wise Activation Suppressing (CAS, ICLR 2021) onto pretrained PyTorch classifiers."""
from .version import __version__  # noqa: F401

import importlib as _importlib

from . import attacks, losses, models  # models registers the paper's CIFAR models with timm (cifar_resnet18, cifar_wrn34_10, cifar_vgg16)
# the defense family's public names (each defense's module, the registry, find_defense_modules, aux_logits, and the
# compatibility names of code written before the family engine), as casify.defenses lists them
from . import defenses
from .defenses import *  # noqa: F401,F403
from .core.config import DefenseConfig
from .core.discovery import Layer, LayerError, Layout, list_layers
from .model.loading import LoadError, from_pretrained, push_to_hub, save_pretrained, write_hub_folder
from .model.defended import DefendedModel
from .core.normalize import InputNormalize, InputRangeWarning
from .core.routing import route
from .model.surgery import unwrap, wrap
from .core.tracing import TraceError

# 0.1.0's names of the generic wrapper and its config (CHANGELOG.md): any defense, not only CAS
CASModel, CASConfig = DefendedModel, DefenseConfig

# Imported on first access (PEP 562), so `import casify` stays fast: the training loop, the evaluation suite, the
# analysis and the datasets pull in accelerate, matplotlib, scikit-learn and friends.
_LAZY_SUBMODULES = ("analysis", "data", "evaluate", "train")

__all__ = [
    "analysis", "attacks", "data", "defenses", "evaluate", "losses", "models", "train",
    "CASConfig", "CASModel", "DefendedModel", "DefenseConfig", "InputNormalize", "InputRangeWarning", "Layer", "LayerError", "Layout",
    "LoadError", "TraceError", "from_pretrained", "list_layers", "push_to_hub", "route",
    "save_pretrained", "unwrap", "wrap", "write_hub_folder",
    *defenses.__all__,
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
