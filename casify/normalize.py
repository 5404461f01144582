"""Input normalisation that lives inside the wrapped model, so every input (and every eps) is in pixel space [0, 1]."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NormalizeSpec = Union[None, str, Tuple[Sequence[float], Sequence[float]], dict]


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


def resolve_normalize(spec: NormalizeSpec, model: nn.Module) -> Optional[dict]:
    """Turn a user's normalisation choice into ``{"mean": [...], "std": [...]}`` or None.

    ``"auto"`` takes mean/std from a timm model's ``pretrained_cfg`` and means no normalisation for other models;
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
