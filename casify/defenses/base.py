"""What every channel-wise defense inserted after an activation is, and the registry that names them.

A defense module sits on one activation ``f`` (inserted by :func:`casify.wrap`), returns a tensor of ``f``'s shape, and
keeps the auxiliary logits of its last forward (:meth:`DefenseModule.aux_outputs`). What differs between defenses is
declared here once, so that the losses, the attacks, the evaluation and the analysis never ask *which* defense they
hold:

- ``routed``: whether the module picks a class to build its mask (CAS, CIFS): by the true label in training (through
  :func:`casify.route`), by its own prediction at test. Routed modules get the routing-echo diagnostic.
- ``head_names``: its auxiliary heads, in the order of :meth:`aux_outputs` (CAS: one; FSR: three).
- :meth:`aux_targets` / :attr:`aux_weights`: what each head is trained toward (the labels, unless the method says
  otherwise: FSR's non-robust head learns the adversarial prediction) and its weight inside the joint term
  ``final + beta x mean over heads`` (:func:`casify.losses.joint_aux_term`).
- ``attack_heads``: which heads the attack objectives see (all by default; FSR's non-robust head is trained toward
  a wrong class, so pushing it away from the label is no attack and only dilutes the joint objective).
- :meth:`set_adaptive_backward`: the defense's own straight-through / BPDA backward for the step that a plain
  gradient does not see (CAS: the argmax routing; CIFS: the detached probe gradient; FSR: the sharpened mask).
- ``layouts``: the activation layouts it accepts (``"channels-first"``, ``"channels-last"``, ``"tokens"``; and
  ``"features"``, an (N, C) vector such as an MLP head's hidden layer, only for a defense that declares it).
- ``OPTIONS``: the options ``casify.wrap(..., defense=name, **options)`` takes, each with its allowed values; a saved
  config's options are checked against it (:func:`validate_options`) before anything is built.

A new defense is one file in this folder: subclass :class:`DefenseModule` and decorate it with
:func:`register_defense` (the package imports every file here; your own code may register one before ``wrap``). A
defense may have no auxiliary head (``head_names = ()``): the joint terms are then 0. See docs/architecture.md, "How to
add a defense".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

LAYOUTS = ("channels-first", "channels-last", "tokens", "features")
# What a defense accepts unless it says otherwise: activations with positions. "features" (N, C) is opt-in, since a
# module written for maps may pool or convolve over positions that a feature vector does not have.
DEFAULT_LAYOUTS = ("channels-first", "channels-last", "tokens")


@dataclass(frozen=True)
class Option:
    """One option of a defense: its default, a check and the words for what is allowed (shown in errors)."""
    default: Any
    check: Callable[[Any], bool]
    allowed: str


def choice(default: str, values: Sequence[str]) -> Option:
    return Option(default, lambda v: isinstance(v, str) and v in values, f"one of {list(values)}")


def flag(default: bool) -> Option:
    return Option(default, lambda v: isinstance(v, bool), "true or false")


def integer(default: int, lo: int, hi: int) -> Option:
    return Option(default, lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi,
                  f"an integer from {lo} to {hi}")


def number(default: float, lo: float, hi: float) -> Option:
    return Option(default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and lo <= v <= hi, f"a number from {lo} to {hi}")


class DefenseModule(nn.Module):
    """Base of every module a defense inserts after an activation (see the module docstring)."""

    name: ClassVar[str] = ""
    routed: ClassVar[bool] = False
    head_names: ClassVar[Tuple[str, ...]] = ("aux",)
    attack_heads: ClassVar[Optional[Tuple[bool, ...]]] = None  # None: every head
    layouts: ClassVar[Tuple[str, ...]] = DEFAULT_LAYOUTS
    OPTIONS: ClassVar[Dict[str, Option]] = {}
    INITS: ClassVar[Tuple[str, ...]] = ("identity", "paper")

    num_classes: int
    num_channels: int

    @classmethod
    def build(cls, num_channels: int, num_classes: int, channel_dim: int, ndim: int, init: str,
              options: Dict[str, Any], **extra) -> "DefenseModule":
        """The module for one activation (what :func:`casify.core.rewrite.rewrite` calls); ``options`` are checked,
        ``extra`` (device, dtype, CAS's suppress) passed as given."""
        return cls(num_channels, num_classes, channel_dim=channel_dim, ndim=ndim, init=init,
                   **validate_options(cls.name, options), **extra)

    # -- what the losses and attacks read -------------------------------------------------------------------------
    def aux_outputs(self) -> List[torch.Tensor]:
        """The auxiliary logits of the last forward, one (N, num_classes) tensor per head in ``head_names`` order."""
        raise NotImplementedError

    def aux_targets(self, y: torch.Tensor, final_logits: torch.Tensor) -> List[torch.Tensor]:
        """The class each head is trained toward (default: the label for every head)."""
        return [y] * len(self.head_names)

    @property
    def aux_weights(self) -> List[float]:
        """Each head's weight inside the mean over heads of the joint term (default: 1 each)."""
        return [1.0] * len(self.head_names)

    def set_adaptive_backward(self, on: bool) -> bool:
        """Switch the defense's straight-through / BPDA backward on or off; return the previous setting. Defenses
        without a step that gradients miss keep the default (nothing to switch, always False)."""
        return False

    def clear_outputs(self) -> None:
        """Forget the last forward's auxiliary logits (copies and pickles leave them out)."""

    def __getstate__(self):
        """Copies (deepcopy, timm's ModelEmaV3) start with the adaptive backward off: an attack's switch belongs to
        the attacked original."""
        state = super().__getstate__()
        if "adaptive" in state:
            state["adaptive"] = False
        return state

    def options(self) -> Dict[str, Any]:
        """This module's options, as ``casify.wrap`` takes them and a saved config holds them."""
        return {key: getattr(self, key) for key in self.OPTIONS}

    # routing: only routed defenses use it; the state is a plain tuple so torch.compile can guard on it
    def set_route(self, state: Optional[tuple]) -> Optional[tuple]:
        return None


DEFENSES: Dict[str, Type[DefenseModule]] = {}


def register_defense(cls: Type[DefenseModule]) -> Type[DefenseModule]:
    """Class decorator: make ``cls`` available as ``casify.wrap(..., defense=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, DefenseModule)):
        raise TypeError(f"register_defense takes a DefenseModule subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"a defense needs a short identifier as its name, got {cls.name!r}")
    if cls.name in DEFENSES and DEFENSES[cls.name] is not cls:
        raise ValueError(f"a defense named {cls.name!r} is already registered ({DEFENSES[cls.name].__module__})")
    unknown = set(cls.layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"{cls.__name__}.layouts has {sorted(unknown)}; layouts are {list(LAYOUTS)}")
    DEFENSES[cls.name] = cls
    return cls


def get_defense(name: str) -> Type[DefenseModule]:
    if not isinstance(name, str) or name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; registered defenses: {sorted(DEFENSES)}")
    return DEFENSES[name]


def check_options(owner: str, declared: Dict[str, "Option"], options: Optional[Dict[str, Any]],
                  where: str = "options") -> Dict[str, Any]:
    """``options`` over the defaults of ``declared``, each checked: an unknown key or a value outside what its option
    allows is refused with a message naming ``owner`` (e.g. "defense 'cifs'"), the option and what would be right
    (configs are untrusted). Defenses and attack kinds both declare their options this way."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(f"{owner} has no option {unknown[0]!r} (in {where}); its options are "
                         f"{sorted(declared) or 'none'}")
    out = {}
    for key, spec in declared.items():
        value = options.get(key, spec.default)
        if not spec.check(value):
            raise ValueError(f"{owner}: {where}.{key} = {value!r} is not allowed; expected {spec.allowed}")
        out[key] = value
    return out


def validate_options(name: str, options: Optional[Dict[str, Any]], where: str = "options") -> Dict[str, Any]:
    """``options`` of defense ``name`` with defaults filled in (:func:`check_options`)."""
    return check_options(f"defense {name!r}", get_defense(name).OPTIONS, options, where)


def layout_of(channel_dim: int, ndim: int) -> str:
    if ndim == 2:
        return "features"
    if ndim == 3:
        return "tokens"
    return "channels-first" if channel_dim % ndim == 1 else "channels-last"


def routed_modules(model: nn.Module) -> List[DefenseModule]:
    """The defense modules that route by a class (CAS, CIFS): what :func:`casify.route` drives."""
    return [m for m in find_defense_modules(model) if m.routed]


def find_defense_modules(model: nn.Module) -> List[DefenseModule]:
    """Every defense module inside ``model``, whatever wraps it (DDP, Accelerate, torch.compile), in registration
    order (the graph order of the layers they sit on)."""
    return [m for m in model.modules() if isinstance(m, DefenseModule)]


def aux_logits(model: nn.Module) -> List[torch.Tensor]:
    """The auxiliary logits of the last forward: every head of every defense module, modules in graph order."""
    out: List[torch.Tensor] = []
    for module in find_defense_modules(model):
        heads = module.aux_outputs()
        if any(h is None for h in heads):
            raise RuntimeError("no auxiliary logits yet: run a forward through the model first")
        out.extend(heads)
    return out


def attack_aux_logits(model: nn.Module) -> List[torch.Tensor]:
    """The auxiliary logits that attack objectives see: :func:`aux_logits` without the heads a defense marks as not
    an attack target (``attack_heads``); for CAS and CIFS the same list."""
    out: List[torch.Tensor] = []
    for module in find_defense_modules(model):
        heads = module.aux_outputs()
        if any(h is None for h in heads):
            raise RuntimeError("no auxiliary logits yet: run a forward through the model first")
        keep = module.attack_heads or (True,) * len(heads)
        out.extend(h for h, k in zip(heads, keep) if k)
    return out


def attack_head_count(model: nn.Module) -> int:
    """How many auxiliary heads the attacks see (the ``aux:<i>`` rows index them)."""
    return sum(sum(m.attack_heads) if m.attack_heads else len(m.head_names) for m in find_defense_modules(model))
