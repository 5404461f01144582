"""Input normalisation that lives inside the wrapped model, so every input (and every eps) is in pixel space [0, 1]."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .host_sync import host_reads_free

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NormalizeSpec = Union[None, str, Tuple[Sequence[float], Sequence[float]], dict]

PIXEL_RANGE_TOLERANCE = 1e-3
"""Inputs in [-tol, 1 + tol] count as pixels: float rounding in a data pipeline or an attack overshoots slightly."""

CHECKED_DEVICES = ("cpu", "cuda", "mps", "xpu")
"""Device types where the range check runs at all (on XLA-like devices a read-back would force the lazy graph)."""


class InputRangeWarning(UserWarning):
    """A model that expects pixels in [0, 1] got inputs clearly outside that range.

    The usual causes are 0..255 pixels or a data pipeline that normalises with the ImageNet mean/std although the
    normalisation already lives inside the wrapped model; both make the model silently wrong and every eps meaningless.
    """


class InputRangeCheck:
    """Warn once (per model) when inputs are clearly not pixels in [0, 1].

    Cheap: one min/max of the input. On CPU every forward is checked until it warns. On an accelerator reading the two
    numbers back waits for the device, so only the first forward in each mode (training, evaluation) is checked: a
    data pipeline changes with the mode, and neither an attack's loop nor adversarial training, which switches modes
    every step, waits for it (:meth:`rearm` checks again). Skipped under torch.compile, fx / jit tracing and CUDA-graph
    capture, where a read-back is impossible or would break the capture.
    """

    def __init__(self, reason: str):
        self.reason = reason
        self.warned = False
        self.checked_modes: set = set()  # on accelerators: the modes (training or not) already checked

    def rearm(self) -> None:
        """Check the next input of each mode again (a new data source)."""
        self.checked_modes.clear()

    def __call__(self, x, training: bool, stacklevel: int = 2) -> None:
        if self.warned or not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        device = x.device.type
        if device not in CHECKED_DEVICES or _capturing_or_compiling(device):
            return
        if not host_reads_free(x.device):
            if training in self.checked_modes:
                return
            self.checked_modes.add(training)
        try:
            low, high = (float(v) for v in x.detach().aminmax())
        except RuntimeError:  # functorch transforms, fake tensors, dtypes without min/max: the check is advisory
            return
        if low < -PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
            self.warned = True
            warnings.warn(range_message(low, high, self.reason), InputRangeWarning, stacklevel=stacklevel)


def _capturing_or_compiling(device: str) -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return device == "cuda" and torch.cuda.is_current_stream_capturing()


def range_message(low: float, high: float, reason: str) -> str:
    """What was seen, what is expected and the likely fix."""
    if high > 2.0 and low >= -PIXEL_RANGE_TOLERANCE:
        hint = "these look like 0..255 pixels: divide by 255 (torchvision's ToTensor() does)"
    elif low < -PIXEL_RANGE_TOLERANCE:
        hint = ("these look already normalised (mean/std applied in the data pipeline): drop the Normalize transform, "
                "or build timm's transform from the wrapped model, timm.data.resolve_data_config(model=wrapped), "
                "whose mean is 0 and std 1")
    else:
        hint = "scale the inputs to [0, 1]"
    return (f"the casify model got inputs in [{low:.4g}, {high:.4g}] but expects pixels in [0, 1] ({reason}); {hint}. "
            "Warned once per model.")


class InputNormalize(nn.Module):
    """(x - mean) / std over the channel axis of an NCHW image batch. Buffers are not persistent: the state dict of the
    wrapped model keeps exactly the original's keys plus the CAS parameters; mean and std are stored in config.json."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"input normalisation expects (N, {self.mean.shape[1]}, H, W) pixels in [0, 1], "
                             f"got shape {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.as_dict()['mean']}, std={self.as_dict()['std']}"

    def as_dict(self) -> dict:
        return {"mean": [round(v, 6) for v in self.mean.flatten().tolist()],
                "std": [round(v, 6) for v in self.std.flatten().tolist()]}


class NormalizeAutoWarning(UserWarning):
    """``normalize="auto"`` found nothing to resolve from and added no normalisation."""


def torchvision_weights_normalize(model: nn.Module) -> Optional[dict]:
    """The mean/std of the published weights of a torchvision classifier's architecture (the ``DEFAULT`` weights'
    ``transforms()`` of every builder of its class), when they all agree; None for other models."""
    if not type(model).__module__.startswith("torchvision.models"):
        return None
    import inspect

    import torchvision.models as tvm
    found = set()
    for name in tvm.list_models(module=tvm):
        builder = tvm.get_model_builder(name)
        if inspect.signature(builder).return_annotation not in (type(model), type(model).__name__):
            continue
        transforms = tvm.get_model_weights(name).DEFAULT.transforms()  # the classification weights, not VGG's features
        if hasattr(transforms, "mean") and hasattr(transforms, "std"):
            found.add((tuple(float(v) for v in transforms.mean), tuple(float(v) for v in transforms.std)))
    if len(found) != 1:
        return None
    mean, std = found.pop()
    return {"mean": list(mean), "std": list(std)}


def resolve_normalize(spec: NormalizeSpec, model: nn.Module) -> Optional[dict]:
    """Turn a user's normalisation choice into ``{"mean": [...], "std": [...]}`` or None.

    ``"auto"`` takes mean/std from a timm model's ``pretrained_cfg``, else from the published weights of a torchvision
    architecture; for other models it adds none and says so (:class:`NormalizeAutoWarning`);
    ``"imagenet"`` is the usual ImageNet statistics; a ``(mean, std)`` pair or a dict is used as given; None is none.
    """
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        if spec == "auto":
            cfg = getattr(model, "pretrained_cfg", None) or {}
            if "mean" in cfg and "std" in cfg:
                mean, std = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
                if all(m == 0 for m in mean) and all(s == 1 for s in std):
                    return None  # models trained on raw [0, 1] pixels (casify's CIFAR models) need no module
                return {"mean": mean, "std": std}
            found = torchvision_weights_normalize(model)
            if found is not None:
                return found
            warnings.warn(f'normalize="auto" found no mean/std for {type(model).__name__} (neither a timm '
                          "pretrained_cfg nor torchvision weights metadata), so no normalisation was added: the model "
                          "gets pixels in [0, 1] as they are. If it was trained on normalised inputs, pass "
                          'normalize="imagenet" or normalize=(mean, std); normalize=None silences this.',
                          NormalizeAutoWarning, stacklevel=4)
            return None
        if spec == "imagenet":
            return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        raise ValueError(f"normalize must be 'auto', 'imagenet', None, a (mean, std) pair or a dict, got {spec!r}")
    if isinstance(spec, dict):
        if set(spec) != {"mean", "std"}:
            raise ValueError(f"a normalize dict needs exactly the keys 'mean' and 'std', got {sorted(spec)}")
        return {"mean": [float(v) for v in spec["mean"]], "std": [float(v) for v in spec["std"]]}
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return {"mean": [float(v) for v in spec[0]], "std": [float(v) for v in spec[1]]}
    raise ValueError(f"normalize must be 'auto', 'imagenet', None, a (mean, std) pair or a dict, got {spec!r}")
