"""What an attack is given, checked once at its entry: images, labels and radius.

Why a module of its own: these are the silent mistakes a newcomer makes first (0..255 pixels, ``eps=8``, a label
past the last class), and ``casify.route`` and the attacks must report them alike. Every check here is free of host
syncs where reading a value back would make a GPU wait (:func:`casify.core.host_sync.host_reads_free`): there it runs as
a device-side assertion, and the same inputs on CPU give the readable error.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..defenses import find_defense_modules
from .eps import parse_eps
from .host_sync import host_reads_free
from .normalize import PIXEL_RANGE_TOLERANCE, range_message

ASYNC_ASSERT_DEVICES = ("cuda", "cpu")
"""Device types with a kernel for ``torch._assert_async`` (MPS and XPU lack one in the torch versions casify supports;
values there are checked on the host, one sync per check)."""

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _on_device_assert(device: torch.device) -> bool:
    return not host_reads_free(device) and device.type in ASYNC_ASSERT_DEVICES


def check_labels(labels: torch.Tensor, num_classes: Optional[int]) -> torch.Tensor:
    """Class indices (N,) in ``[0, num_classes)`` as int64, or soft routing weights (N, num_classes) as given.

    ``num_classes=None`` (a model whose class count is unknown) checks only the dtype, the shape and the sign."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() == 1:
        if labels.dtype not in INTEGER_DTYPES:
            raise TypeError(f"class labels must be an integer tensor of shape (N,), got dtype {labels.dtype}")
        if not labels.numel():
            return labels.long()
        top = num_classes if num_classes is not None else None
        where = f"[0, {top - 1}] (the model has {top} classes)" if top is not None else "[0, number of classes)"
        if _on_device_assert(labels.device):
            # On a GPU the host does not wait for this check; a bad label stops the run with a device-side assertion
            # (CUDA's context is lost) instead of the ValueError below: run the same data on CPU to see the values.
            ok = labels >= 0 if top is None else (labels >= 0) & (labels < top)
            torch._assert_async(ok.all(), f"labels must lie in {where}")
        else:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or (top is not None and high >= top):
                raise ValueError(f"labels must lie in {where}, got values in [{low}, {high}]")
        return labels.long()
    if labels.dim() == 2 and labels.is_floating_point():
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(f"soft routing weights must have shape (N, {num_classes}), got {tuple(labels.shape)}")
        return labels
    raise ValueError(f"labels must be class indices of shape (N,) or soft routing weights of shape (N, {num_classes}), "
                     f"got shape {tuple(labels.shape)} and dtype {labels.dtype}")


def check_images(x: torch.Tensor, readable: bool = False) -> None:
    """Refuse what cannot be pixels in [0, 1]: integer images (0..255), NaN / inf values and float values clearly
    outside [0, 1] (every comparison with NaN is False, so NaN is tested for itself).

    Clamping such inputs to [0, 1] inside an attack would return images at a distance of up to 254 from the input,
    every eps meaningless; so it is an error, never a warning. ``readable``: read the values on the host and raise
    the readable error even where a device-side assertion would otherwise do (a one-off check of a few images)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"images have dtype {x.dtype}; attacks take float pixels in [0, 1]: divide by 255, "
                        "x.float() / 255 (torchvision's ToTensor() does this)")
    if not x.numel():
        return
    low_ok, high_ok = -PIXEL_RANGE_TOLERANCE, 1 + PIXEL_RANGE_TOLERANCE
    if _on_device_assert(x.device) and not readable:
        low, high = x.detach().aminmax()  # a NaN anywhere makes both NaN, which fails the comparisons below
        torch._assert_async((low >= low_ok) & (high <= high_ok),
                            "attack inputs must be finite pixels in [0, 1] (0..255 pixels: divide by 255; normalised "
                            "data: drop the Normalize transform, the wrapped model normalises; NaN / inf: fix the data)")
        return
    finite = torch.isfinite(x.detach())
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(dim=1).sum()) if x.dim() > 1 else int((~finite).sum())
        raise ValueError(f"images contain NaN or inf values ({bad} of {x.shape[0]} images): attacks and accuracy "
                         "need finite pixels in [0, 1]; fix or drop those images")
    low, high = (float(v) for v in x.detach().aminmax())
    if low < low_ok or high > high_ok:
        raise ValueError(range_message(low, high, "attacks clamp to [0, 1] and eps is in pixel units")
                         .replace(" Warned once per model.", ""))


def read_radius(value: Union[str, float, int], name: str = "eps") -> float:
    """A non-negative number, written as one or as a fraction (``"8/255"``, ``"0.5"``), without a range check."""
    if isinstance(value, bool):
        raise ValueError(f"cannot read {name} {value!r}; write it like 8/255 or 0.031")
    try:
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            num, _, den = str(value).strip().partition("/")
            number = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read {name} {value!r}; write it like 8/255 or 0.031") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_eps(eps: Union[str, float, int], name: str = "eps", norm: str = "linf") -> float:
    """A radius in pixel units: ``"8/255"`` or ``0.031``. L-inf radii go through the one parser of configs and the CLI
    (:func:`casify.core.eps.parse_eps`), so ``eps=8`` is an error that suggests ``8/255``; L2 radii may exceed 1."""
    if norm != "linf":
        return read_radius(eps, name)
    try:
        return parse_eps(eps)
    except ValueError as e:
        raise ValueError(str(e).replace("eps", name) if name != "eps" else str(e)) from None


def model_num_classes(model: nn.Module) -> Optional[int]:
    """The class count a model states about itself (its CAS modules', or a timm-style ``num_classes``), else None."""
    modules = find_defense_modules(model)
    if modules:
        return int(modules[0].num_classes)
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_attack_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        eps: Union[str, float, int], norm: str = "linf") -> float:
    """Everything an attack checks at its entry; returns eps as a float."""
    eps = check_eps(eps, norm=norm)
    check_images(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        raise ValueError(f"attack labels must be class indices of shape (N,), got {getattr(y, 'shape', y)!r}")
    check_labels(y, model_num_classes(model))
    return eps
