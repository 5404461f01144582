"""casify: retrofit Channel-wise Activation Suppressing (CAS, ICLR 2021) onto pretrained PyTorch classifiers."""
__version__ = "0.1.0"

from . import attacks, losses, models  # models registers the paper's CIFAR models with timm (cifar_resnet18, cifar_wrn34_10, cifar_vgg16)
from .cas import CASModule, CASRoutingWarning, aux_logits, find_cas_modules
from .hub import LoadError, from_pretrained, push_to_hub, save_pretrained, write_hub_folder
from .model import CASModel
from .normalize import InputNormalize
from .routing import route
from .surgery import Layer, LayerError, list_layers, unwrap, wrap
from .tracing import TraceError

__all__ = [
    "attacks", "losses", "models",
    "CASModel", "CASModule", "CASRoutingWarning", "InputNormalize", "Layer", "LayerError", "LoadError", "TraceError",
    "aux_logits", "find_cas_modules", "from_pretrained", "list_layers", "push_to_hub", "route", "save_pretrained", "unwrap",
    "wrap", "write_hub_folder",
]
