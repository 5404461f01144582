"""A named base model with its weights, and the spec that says where they came from; a pretrained checkpoint (an
ImageNet-1k one, say) loaded into a task-sized timm model the timm way.

:func:`build_named_base` is what a recipe's ``model`` section names: a timm or torchvision architecture, with the
library's pretrained weights or a local checkpoint, returned with its base spec (how to rebuild it, and the model
card's record of its weights: the Hub repo only when the weights came from it, the checkpoint's file and SHA-256 when
they came from a file). The spec is made here, beside the loading, because only the loader knows which it was.

Why: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=10)`` already
keeps every backbone tensor and re-initialises a classifier of another size, but when it drops the classifier it
loads with ``strict=False`` and only logs what was missing: a checkpoint of another architecture, or one with missing
backbone keys, would leave those layers silently random. So the checkpoint's keys and shapes are checked against the
model first (only the classifier named by timm's ``pretrained_cfg`` may differ), and then timm's own loading path
runs, unchanged. What was dropped is returned (:class:`PretrainedLoad`) for the caller to report.

It lives in :mod:`casify.model` (not with the architectures of :mod:`casify.models`) because it builds the spec with
:mod:`casify.core.spec`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.spec import infer_base_spec

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SHOWN = 5  # how many mismatching names an error lists


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not fit the model's backbone; the message names the first mismatches."""


@dataclasses.dataclass(frozen=True)
class PretrainedLoad:
    """What loading a checkpoint did: how many tensors were kept, and which classifier tensors were dropped (their
    checkpoint shapes) because the task has another class count."""
    path: str
    kept: int
    dropped: Dict[str, Tuple[int, ...]]
    num_classes: int
    headless: bool = False  # the checkpoint had no classifier: the model's is new
    sha256: str = ""  # of the checkpoint file: what a model card names as the base's weights
    head_init: str = "zero"  # how a re-initialised classifier started (HEAD_INITS)

    def describe(self) -> str:
        """One line for the log: what was loaded and what was re-initialised."""
        if self.headless:
            return (f"loaded {self.kept} tensors from {self.path}; it has no classifier, so the model's "
                    f"{self.num_classes}-class classifier is newly initialised")
        if not self.dropped:
            return f"loaded {self.kept} tensors from {self.path} (the classifier too: same class count)"
        dropped = ", ".join(f"{k} {tuple(v)}" for k, v in self.dropped.items())
        return (f"loaded {self.kept} tensors from {self.path}; re-initialised the classifier for {self.num_classes} "
                f"classes (dropped {dropped}){'' if self.head_init == 'timm' else '; the new one starts at zero'}")


def _safe_load_kwargs() -> dict:
    """``weights_only=True`` where timm's loader takes it (stated, not left to a default older timm had off)."""
    import inspect

    from timm.models import load_state_dict
    return {"weights_only": True} if "weights_only" in inspect.signature(load_state_dict).parameters else {}


def read_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    """The checkpoint's state dict, read with timm's loader (safetensors, or ``torch.load(weights_only=True)``: no
    pickled code runs). Every failure is a :class:`CheckpointError` naming the file and what would work."""
    from timm.models import load_state_dict
    if not path.exists():
        raise CheckpointError(f"model.checkpoint {path} does not exist; pass the path of a weights file "
                              f"({', '.join(CHECKPOINT_SUFFIXES)})")
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint {path} is not a file; pass a weights file "
                              f"({', '.join(CHECKPOINT_SUFFIXES)}), or a casify folder as model.name")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"model.checkpoint {path} is not a weights file: expected one of "
                              f"{', '.join(CHECKPOINT_SUFFIXES)} (safetensors preferred)")
    try:
        if path.suffix == ".safetensors" or _safe_load_kwargs():
            state = load_state_dict(str(path), use_ema=False, **_safe_load_kwargs())
        else:  # a timm whose loader cannot be told weights_only: torch's own safe load
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # safetensors' and torch's own errors say little about which file or what to do
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a PyTorch state dict (weights only)"
        raise CheckpointError(f"model.checkpoint {path} cannot be read as {kind} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); is it a weights file?") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.checkpoint {path} holds no state dict of tensors")
    return state


def classifier_names(model: nn.Module) -> List[str]:
    """The classifier's tensor names per timm's ``pretrained_cfg['classifier']`` (e.g. ``classifier.weight``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return [f"{head}.{kind}" for head in heads for kind in ("weight", "bias")]


def _first(names: Sequence[str]) -> str:
    shown = ", ".join(list(names)[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_backbone(model: nn.Module, state: Dict[str, torch.Tensor], name: str, path: Path) -> Dict[str, tuple]:
    """Refuse a checkpoint whose keys or shapes differ from ``model``'s anywhere but in its classifier; return the
    classifier tensors that will be dropped (the checkpoint's shapes), empty when they fit as they are."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    head = set(classifier_names(model))
    # BatchNorm fills a missing num_batches_tracked itself (checkpoints saved without torch's metadata omit it)
    missing = [k for k in expected if k not in found and k not in head and not k.endswith(".num_batches_tracked")]
    extra = [k for k in found if k not in expected and k not in head]
    shapes = [f"{k} {found[k]} vs {expected[k]}" for k in expected
              if k in found and k not in head and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of the model's tensors ({_first(missing)})")
    if extra:
        problems.append(f"{len(extra)} tensors the model does not have ({_first(extra)})")
    if shapes:
        problems.append(f"{len(shapes)} tensors of another shape ({_first(shapes)})")
    if problems:
        raise CheckpointError(f"model.checkpoint {path} does not fit {name}'s backbone: {'; '.join(problems)}. Pass a "
                              f"checkpoint of {name} saved under timm's names, or set model.name to its architecture")
    return {k: found[k] for k in sorted(head) if k in found and found[k] != expected.get(k)}


HEAD_INITS = ("zero", "timm")


def create_timm_from_checkpoint(name: str, checkpoint, head_init: str = "zero",
                                **kwargs) -> Tuple[nn.Module, PretrainedLoad]:
    """``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint), **kwargs)`` after
    :func:`check_backbone`: every backbone tensor comes from ``checkpoint``; only a classifier of another class count
    is re-initialised (timm's rule), and the returned record says which tensors that dropped.

    ``head_init``: how a re-initialised classifier starts. ``"zero"`` (default; Kolesnikov et al. 2020, BiT, for
    transfer): logits start at 0, so the first steps neither send large gradients into the pretrained backbone nor
    start from a loss far above chance. ``"timm"``: the architecture's own init, which timm scales by the *new*
    class count: EfficientNet's uniform(+-1/sqrt(10)) for 10 classes gives Lite0's pooled features (norm ~50 on
    64-px CIFAR-10) a first loss of 11.5 (studies/lite0_cifar10/fine_tune_checks.py)."""
    import timm
    if head_init not in HEAD_INITS:
        raise CheckpointError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    path = Path(checkpoint).expanduser()
    state = read_checkpoint(path)
    if not timm.is_model(name):
        raise CheckpointError(f"model.name {name!r} is not a timm architecture (e.g. efficientnet_lite0); "
                              "torchvision models take torchvision:<name>")
    probe = timm.create_model(name, pretrained=False, **kwargs)
    dropped = check_backbone(probe, state, name, path)
    heads = classifier_names(probe)
    # timm drops the classifier when num_classes differs from the *config's*; state the checkpoint's own count so that
    # a checkpoint of, say, 100 classes is judged by its own size, not by ImageNet's 1000.
    ckpt_classes = next((int(state[k].shape[0]) for k in heads if k.endswith(".weight") and k in state), None)
    overlay = {"file": str(path)}
    if ckpt_classes is not None:
        overlay["num_classes"] = ckpt_classes
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    kept = len([k for k in state if k not in dropped])
    headless = bool(heads) and not any(k in state for k in heads) and num_classes > 0
    if head_init == "zero" and (dropped or headless):  # a new classifier, not the checkpoint's
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in heads:
                if key in params:
                    params[key].zero_()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return model, PretrainedLoad(str(path), kept, dropped, num_classes, headless, digest, head_init)


def load_torchvision_checkpoint(model: nn.Module, checkpoint, name: str) -> PretrainedLoad:
    """``checkpoint``'s tensors into a torchvision ``model`` of the same class count, strictly, after
    :func:`check_backbone` (torchvision's builders have no loader that re-initialises a classifier of another size)."""
    path = Path(checkpoint).expanduser()
    state = read_checkpoint(path)
    check_backbone(model, state, name, path)
    model.load_state_dict(state, strict=True)
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]  # the classifier is the last
    num_classes = int(matrices[-1].shape[0]) if matrices else 0
    return PretrainedLoad(str(path), len(state), {}, num_classes, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


@dataclasses.dataclass(frozen=True)
class NamedBase:
    """A base model, what loading a checkpoint did (None without one), and (:attr:`spec`) how to rebuild it."""
    model: nn.Module
    pretrained: bool = False
    loaded: Optional[PretrainedLoad] = None

    @functools.cached_property
    def spec(self) -> dict:
        """The base spec (:func:`casify.core.spec.infer_base_spec`) with the record of its weights: the Hub repo
        (``hf_hub_id``) only when the weights came from it, a checkpoint's file and SHA-256 (``pretrained_weights``)
        when they came from one; the model card must not credit weights to a source they did not come from. Made on
        first use (a torchvision spec builds candidate architectures to find the name)."""
        spec = infer_base_spec(self.model)
        if not self.pretrained or self.loaded is not None:
            spec.pop("hf_hub_id", None)
        if self.loaded is not None:
            spec["pretrained_weights"] = {"file": Path(self.loaded.path).name, "sha256": self.loaded.sha256}
        return spec


def build_named_base(name: str, /, *, pretrained: bool = False, checkpoint=None, **kwargs) -> NamedBase:
    """A timm (``name``) or torchvision (``"torchvision:<name>"``) model, with the library's pretrained weights
    (``pretrained``: timm's Hub weights, torchvision's ``DEFAULT``) or a local ``checkpoint`` (which wins), or freshly
    initialised; ``kwargs`` go to the builder (``num_classes=10``...).

    A timm checkpoint goes through :func:`create_timm_from_checkpoint` (an ImageNet head is dropped for another class
    count); a torchvision one must fit as it is (:func:`load_torchvision_checkpoint`). ``.spec`` says where the weights
    came from."""
    if not name:
        raise ValueError("model.name is required (a timm name, 'torchvision:<name>', or a casify folder)")
    loaded = None
    if name.startswith("torchvision:"):
        import torchvision.models as tvm
        arch = name.split(":", 1)[1]
        model = tvm.get_model(arch, weights="DEFAULT" if pretrained and not checkpoint else None, **kwargs)
        if checkpoint:
            loaded = load_torchvision_checkpoint(model, checkpoint, name)
    elif checkpoint:
        model, loaded = create_timm_from_checkpoint(name, checkpoint, **kwargs)
    else:
        import timm
        model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    return NamedBase(model, bool(pretrained), loaded)


__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointError", "HEAD_INITS", "NamedBase", "PretrainedLoad", "build_named_base",
           "check_backbone", "classifier_names", "create_timm_from_checkpoint", "load_torchvision_checkpoint",
           "read_checkpoint"]
