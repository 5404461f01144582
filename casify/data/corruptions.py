"""Common corruptions in the style of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), generated locally and seeded,
at 5 severities, for ``casify.evaluate.benchmark(threat_model="corruptions")``.

Why not the ``imagecorruptions`` package: it installs here (with OpenCV and scikit-image), but with NumPy 2 and
scikit-image >= 0.19 three of its corruptions fail (``glass_blur`` and ``gaussian_blur`` call ``gaussian(...,
multichannel=...)``, removed from scikit-image; ``fog`` uses ``np.float_``, removed in NumPy 2.0), it draws from
NumPy's global random state (no seed argument) and its severities are ImageNet's. So casify generates its own, in
torch, each image from its own generator (the seed, the corruption, the severity and the image's index), so a
corrupted set is the same whatever the batch size or the order it is read in.

:data:`CORRUPTIONS` are the 10 of CIFAR-10-C's 15 benchmark corruptions that need no image assets or long per-pixel
loops; their severity constants follow CIFAR-10-C's for 32x32 images (blur sizes scale up with a larger image's side;
``motion_blur``'s streak lengths are casify's own). The 5
not generated: ``snow``, ``frost`` (needs CIFAR-10-C's frost photographs), ``fog`` (plasma fractals), ``glass_blur``
and ``elastic_transform``. :data:`EXTRA` adds three of CIFAR-10-C's extra corruptions. The numbers are therefore
CIFAR-10-C-*style*, not CIFAR-10-C's: for a leaderboard number, evaluate on the released CIFAR-10-C arrays
(:func:`load_cifar10c`, ``benchmark(..., corruptions_dir=...)``).
"""
from __future__ import annotations

import io
import math
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SEVERITIES = (1, 2, 3, 4, 5)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    k = k[:, None] * k[None, :]
    return k / k.sum()


def _convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel 2-D convolution of one image (C, H, W) with reflect padding."""
    c = x.shape[0]
    kh, kw = kernel.shape
    padded = F.pad(x[None], (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2), mode="reflect")
    return F.conv2d(padded, kernel.expand(c, 1, kh, kw).to(x.dtype), groups=c)[0]


def _scale(x: torch.Tensor) -> float:
    """Blur sizes are CIFAR-10-C's for 32x32 images, scaled up with a larger image's side; a smaller image keeps
    them (scaled down, a sub-pixel disk would not blur at all)."""
    return max(1.0, x.shape[-1] / 32)


def gaussian_noise(x, severity, g):
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + c * torch.randn(x.shape, generator=g)


def shot_noise(x, severity, g):
    photons = (500, 250, 100, 75, 50)[severity - 1]
    return torch.poisson(x.clamp(0, 1) * photons, generator=g) / photons


def impulse_noise(x, severity, g):
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    out = x.clone()
    hit = u < amount
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def speckle_noise(x, severity, g):
    c = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    return x + x * c * torch.randn(x.shape, generator=g)


def gaussian_blur(x, severity, g):
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1] * _scale(x)
    return _convolve(x, _gaussian_kernel(sigma))


def defocus_blur(x, severity, g):
    """A disk (the lens' circle of confusion) of the given radius, then a slight Gaussian against its aliasing."""
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[severity - 1]
    radius *= _scale(x)
    r = max(1, int(math.ceil(radius)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk[r, r] = 1.0
    out = _convolve(x, disk / disk.sum())
    return _convolve(out, _gaussian_kernel(alias * _scale(x)))


def motion_blur(x, severity, g):
    """A straight streak in a random direction (drawn per image), 3 to 7 pixels long on a 32x32 image (casify's
    lengths: CIFAR-10-C's come from ImageMagick's motion blur, whose radius and sigma do not map to one length)."""
    length = (3.0, 4.0, 5.0, 6.0, 7.0)[severity - 1] * _scale(x)
    angle = float(torch.rand((), generator=g)) * math.pi
    r = int(math.ceil(length / 2))
    kernel = torch.zeros(2 * r + 1, 2 * r + 1)
    for s in torch.linspace(-length / 2, length / 2, 4 * r + 1).tolist():  # splat the line bilinearly
        px, py = r + s * math.cos(angle), r + s * math.sin(angle)
        x0, y0 = int(math.floor(px)), int(math.floor(py))
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi <= 2 * r and 0 <= yi <= 2 * r:
                kernel[yi, xi] += (1 - abs(px - xi)) * (1 - abs(py - yi))
    return _convolve(x, kernel / kernel.sum())


def zoom_blur(x, severity, g):
    """The mean of the image zoomed in by a series of factors about its centre (a zoom during the exposure)."""
    top, step = ((1.06, 0.01), (1.11, 0.01), (1.16, 0.02), (1.21, 0.02), (1.26, 0.03))[severity - 1]
    h, w = x.shape[-2:]
    out = x.clone()
    zooms = np.arange(1.0, top, step)[1:]
    for z in zooms:
        big = F.interpolate(x[None], scale_factor=float(z), mode="bilinear", align_corners=False)[0]
        top_y, left = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
        out = out + big[:, top_y:top_y + h, left:left + w]
    return out / (len(zooms) + 1)


def _value(x):
    return x.amax(dim=0, keepdim=True)


def brightness(x, severity, g):
    """HSV value raised by c, hue and saturation kept."""
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    v = _value(x)
    v_new = (v + c).clamp(0, 1)
    return torch.where(v > 0, x * v_new / v.clamp_min(1e-12), v_new.expand_as(x))


def contrast(x, severity, g):
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = x.mean(dim=(0, 1, 2), keepdim=True)
    return (x - mean) * c + mean


def saturate(x, severity, g):
    """HSV saturation scaled by c1 and shifted by c2, hue and value kept (a grey pixel stays grey)."""
    c1, c2 = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))[severity - 1]
    v = _value(x)
    s = (v - x.amin(dim=0, keepdim=True)) / v.clamp_min(1e-12)
    s_new = (s * c1 + c2).clamp(0, 1)
    return torch.where(s > 0, v - (v - x) * s_new / s.clamp_min(1e-12), x)


def pixelate(x, severity, g):
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x[None], size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")[0]


def jpeg_compression(x, severity, g):
    from PIL import Image
    quality = (80, 65, 58, 50, 40)[severity - 1]
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255
    out = out[..., None] if out.ndim == 2 else out
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
CORRUPTIONS: Dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur, "brightness": brightness,
    "contrast": contrast, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
}
EXTRA: Dict[str, Corruption] = {"speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "saturate": saturate}
ALL: Dict[str, Corruption] = {**CORRUPTIONS, **EXTRA}
NOT_GENERATED = ("snow", "frost", "fog", "glass_blur", "elastic_transform")


def image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The seed of one corrupted image: a function of these four only (zlib.crc32 of the name: stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 101 + severity * 7_919 + index) % (2 ** 63)


def corrupt(x: torch.Tensor, name: str, severity: int, *, seed: int = 0, index: int = 0) -> torch.Tensor:
    """One image (C, H, W) in [0, 1] with corruption ``name`` at ``severity`` (1-5), clipped to [0, 1]."""
    if name not in ALL:
        raise ValueError(f"unknown corruption {name!r}; casify generates {sorted(ALL)} (not generated: "
                         f"{list(NOT_GENERATED)}; see casify.data.corruptions)")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    g = torch.Generator().manual_seed(image_seed(seed, name, severity, index))
    return ALL[name](x.detach().float().cpu(), int(severity), g).clamp(0.0, 1.0)


class CorruptedDataset(Dataset):
    """``dataset`` with every image corrupted by ``name`` at ``severity``, each image seeded by its index."""

    def __init__(self, dataset: Dataset, name: str, severity: int, seed: int = 0):
        corrupt(torch.zeros(3, 8, 8), name, severity)  # refuse an unknown name or severity now, not mid-evaluation
        self.dataset, self.name, self.severity, self.seed = dataset, name, int(severity), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x, y = self.dataset[index]
        return corrupt(torch.as_tensor(x), self.name, self.severity, seed=self.seed, index=index), y


class _Arrays(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.from_numpy(np.array(self.images[i], dtype=np.float32))  # a copy: the arrays are memory-mapped
        return image.permute(2, 0, 1) / 255, int(self.labels[i])


def load_cifar10c(directory: Union[str, Path], name: str, severity: int, n_examples: Optional[int] = None) -> Dataset:
    """The released CIFAR-10-C (or CIFAR-100-C) arrays: ``<directory>/<name>.npy`` holds the 10,000 test images
    at severity 1, then 2, ... 5 (uint8, N x 32 x 32 x 3), ``labels.npy`` their labels; the first ``n_examples`` of
    the given severity."""
    directory = Path(directory)
    images = np.load(directory / f"{name}.npy", mmap_mode="r")
    labels = np.load(directory / "labels.npy")
    per = len(labels) // len(SEVERITIES)
    stop = per if n_examples is None else min(per, int(n_examples))
    lo = (int(severity) - 1) * per
    return _Arrays(images[lo:lo + stop], labels[lo:lo + stop])


def corruption_names(names: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """``names`` checked, or the default set :data:`CORRUPTIONS`."""
    names = tuple(names) if names else tuple(CORRUPTIONS)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; casify generates {sorted(ALL)}")
    return names


__all__ = ["ALL", "CORRUPTIONS", "EXTRA", "NOT_GENERATED", "SEVERITIES", "CorruptedDataset", "corrupt",
           "corruption_names", "image_seed", "load_cifar10c"]
