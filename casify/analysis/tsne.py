"""t-SNE of deep features, natural next to adversarial (the paper's Figure 9): how far PGD moves examples out of
their class clusters. Each panel is its own t-SNE run; scikit-learn is imported only when a plot is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

from ..attacks import pgd
from ..model.defended import DefendedModel
from .capture import (ActivationProbe, ClassifierInputProbe, Data, example_batches, resolve_device,
                      resolve_objective)
from .figures import new_figure
from .files import write_atomic


@dataclass
class TSNEResult:
    """The 2-D embeddings behind a t-SNE figure (one per panel) and the labels that colour them."""
    path: Path
    labels: np.ndarray
    natural: np.ndarray
    adversarial: Optional[np.ndarray] = None
    capture_point: str = ""


def _class_names(model: nn.Module, data, num_classes: int) -> List[str]:
    names = getattr(data, "classes", None) or getattr(getattr(data, "dataset", None), "classes", None)
    if names is None and isinstance(model, DefendedModel):
        names = model.casify_config.get("class_names")
    names = list(names) if names else []
    return [str(names[i]) if i < len(names) else str(i) for i in range(num_classes)]


def _embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE
    n = len(features)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 examples, got {n}")
    perplexity = min(float(perplexity), (n - 1) / 3)  # sklearn requires perplexity < n; n / 3 keeps it meaningful
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # With torch loaded, two OpenMP runtimes spin against each other in sklearn's Barnes-Hut loop (seconds become
    # minutes); one OpenMP thread avoids that and is fast enough at t-SNE sizes (500 points: ~3 s).
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(features)


def tsne_plot(model: nn.Module, data: Data, out_path: Union[str, Path], layer: Optional[str] = None, *,
              adversarial: bool = True, eps: float = 8 / 255, steps: int = 20, alpha: Optional[float] = None,
              attack_objective: str = "auto", max_examples: int = 500, perplexity: float = 30.0,
              batch_size: int = 128, cas_side: str = "before", seed: int = 0, device=None) -> TSNEResult:
    """t-SNE of deep features coloured by true class, natural examples and (``adversarial=True``) their PGD
    adversarial examples side by side, as in the paper's Figure 9. Each panel is its own t-SNE run.

    Features are the penultimate ones (the final ``nn.Linear``'s input) unless ``layer`` names another layer, whose
    channel-wise activation is then used. Examples are a seeded random subset of ``max_examples``.
    """
    device = resolve_device(model, device)
    objective = resolve_objective(model, attack_objective)
    generator = torch.Generator(device=device).manual_seed(seed)
    probe = (ActivationProbe(model, layer, cas_side=cas_side) if layer is not None else ClassifierInputProbe(model))
    capture_point = (f"{layer}: {probe.capture_point}" if layer is not None
                     else "penultimate features (input of the final nn.Linear)")
    nat_feats, adv_feats, labels = [], [], []
    try:
        extract = (lambda x: probe(x)[1]) if layer is not None else probe
        for x, y in example_batches(data, max_examples, batch_size, seed):
            x, y = x.to(device), y.to(device)
            nat_feats.append(extract(x).cpu())
            if adversarial:
                x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, objective=objective, generator=generator)
                adv_feats.append(extract(x_adv).cpu())
            labels.append(y.cpu())
    finally:
        probe.close()
    labels_np = torch.cat(labels).numpy()
    panels = [("natural examples", _embed(torch.cat(nat_feats).numpy(), perplexity, seed))]
    if adversarial:
        panels.append((f"PGD-{steps} adversarial examples", _embed(torch.cat(adv_feats).numpy(), perplexity, seed)))

    num_classes = int(labels_np.max()) + 1
    names = _class_names(model, data, num_classes)
    fig = new_figure(5.0 * len(panels) + 1.5, 5.0)
    from matplotlib import colormaps
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    for i, (title, emb) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in np.unique(labels_np):
            pts = emb[labels_np == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(int(c) % cmap.N), label=names[int(c)])
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
    if num_classes <= 20:
        fig.axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2)
    fig.suptitle(f"t-SNE of {capture_point}", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    write_atomic(out_path, lambda tmp: fig.savefig(tmp, format=out_path.suffix[1:] or "png"))
    return TSNEResult(out_path, labels_np, panels[0][1], panels[1][1] if adversarial else None, capture_point)
