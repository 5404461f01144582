"""Figures 1 and 2 of the paper: natural vs adversarial bars per channel, sorted by the natural values, with the
capture point in the title and axis label so a figure cannot be mistaken for one taken elsewhere in the network.

Matplotlib is imported inside the functions and drawn without pyplot, so importing casify.analysis stays cheap and no
global backend is switched in the caller's process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from .files import write_atomic

ArrayLike = Union[torch.Tensor, np.ndarray]


def new_figure(width: float = 7.0, height: float = 3.6):
    """A figure drawn with Agg without pyplot, so no global backend is switched in the caller's process."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=120)


def _sorted_bars(ax, natural: np.ndarray, adversarial: np.ndarray) -> None:
    order = np.argsort(-natural, kind="stable")
    x = np.arange(len(order))
    ax.bar(x, adversarial[order], width=1.0, color="tab:red", alpha=0.55, label="adversarial", linewidth=0)
    ax.bar(x, natural[order], width=1.0, color="tab:blue", alpha=0.55, label="natural", linewidth=0)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.legend(loc="upper right", frameon=False)


def _where(capture_point: str) -> str:
    """The short form of a capture point for an axis label: ``"before CAS mask"``, ``"layer output"``."""
    return capture_point.split(" (")[0].split(";")[0]


def plot_magnitude(natural: ArrayLike, adversarial: ArrayLike, path: Union[str, Path], title: str = "", *,
                   capture_point: str = "") -> Path:
    """Figure 1: per-channel magnitude, channels sorted by descending natural magnitude. ``capture_point`` (see
    :class:`ChannelReport`) is shown under the title and in the axis label."""
    return _plot_sorted(natural, adversarial, path, "channel (sorted by natural magnitude)", "mean |activation|",
                        title or "channel-wise activation magnitude", capture_point=capture_point)


def plot_frequency(natural: ArrayLike, adversarial: ArrayLike, path: Union[str, Path], title: str = "", *,
                   capture_point: str = "") -> Path:
    """Figure 2: per-channel activation frequency, channels sorted by descending natural frequency."""
    return _plot_sorted(natural, adversarial, path, "channel (sorted by natural frequency)", "activation frequency",
                        title or "channel-wise activation frequency", ylim=(0, 1.05), capture_point=capture_point)


def _plot_sorted(natural: ArrayLike, adversarial: ArrayLike, path: Union[str, Path], xlabel: str, ylabel: str,
                 title: str, ylim=None, capture_point: str = "") -> Path:
    """Natural vs adversarial bars per channel, sorted by the natural values (both figures of Section 3)."""
    fig = new_figure()
    ax = fig.add_subplot()
    _sorted_bars(ax, np.asarray(natural, dtype=float), np.asarray(adversarial, dtype=float))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel}\n({_where(capture_point)})" if capture_point else ylabel)
    ax.set_title(f"{title}\ncaptured {capture_point}" if capture_point else title, fontsize=10)
    fig.tight_layout()
    return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:] or "png"))

