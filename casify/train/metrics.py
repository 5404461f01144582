"""Step metrics averaged on the device between two logs (one host read per log), and their tracker tags."""
from __future__ import annotations

from typing import List, Optional

import torch


class MetricWindow:
    """Means of the step metrics since the last log. The sums stay on the device: reading them back (a host sync,
    and a collective across processes) happens at a log step only, so the host never waits for the device in
    between (casify.core.host_sync; tests/test_host_syncs.py)."""

    def __init__(self):
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.count = 0
        self.other: dict = {}

    def add(self, values: dict) -> None:
        tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
        self.other.update({k: v for k, v in values.items() if not torch.is_tensor(v)})
        names = sorted(tensors)
        device = tensors["loss"].device if "loss" in tensors else tensors[names[0]].device
        stacked = torch.stack([tensors[k].detach().float().reshape(()).to(device) for k in names])
        if self.sums is None or names != self.names:
            self.names, self.sums, self.count = names, torch.zeros_like(stacked), 0
        self.sums += stacked
        self.count += 1

    def flush(self, accelerator) -> dict:
        """The means over the steps since the last flush and over processes; empties the window."""
        if self.sums is None:
            return dict(self.other)
        means = accelerator.gather(self.sums[None] / self.count).mean(dim=0).tolist()
        out = {**self.other, **dict(zip(self.names, means))}
        self.sums, self.count, self.other = None, 0, {}
        return out


def grouped_tags(values: dict, group: str) -> dict:
    """``values`` as tracker tags in one group: ``loss`` -> ``train/loss``, ``val_pgd`` -> ``val/pgd``. TensorBoard
    (and W&B) file scalars by the part of the tag before the ``/``, so training and validation curves sit in two
    sections instead of one flat list; ``step`` is the x axis, not a scalar."""
    prefix = group + "_"
    return {f"{group}/{k[len(prefix):] if k.startswith(prefix) else k}": v for k, v in values.items() if k != "step"}
