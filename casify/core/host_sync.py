"""Count the operations that make a GPU wait for the host, on any device, CPU included.

Why: on a GPU every ``bool(t)``, ``t.item()``, ``float(t)``, boolean-mask index or ``nonzero`` blocks the host until
the device has caught up, so the host can no longer queue the next kernels while the current ones run. A hot loop
(an attack step, a training step) should make none. ``torch.cuda.set_sync_debug_mode`` reports them only on a GPU;
this counter sees the same operations at the dispatcher, so CPU tests and benchmarks can keep the loops sync-free.
Written here because no library counts them off-GPU.

    with HostSyncCounter() as syncs:
        pgd(model, x, y, steps=10)
    syncs.count, syncs.by_op   # {"aten._local_scalar_dense.default": 2, ...}
"""
from __future__ import annotations

from collections import Counter
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_FREE_DEVICES = ("cpu",)
"""Device types where reading a tensor's value back costs nothing; elsewhere it waits for the device, so casify's hot
loops never do it there (tests empty this tuple to run the accelerator paths on CPU)."""


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on ``device`` back to Python costs nothing (no wait for the device)."""
    return device.type in SYNC_FREE_DEVICES


# Operations whose result the host must read (a Python scalar) or whose output shape depends on tensor values.
_ALWAYS = frozenset({
    "aten._local_scalar_dense.default",  # .item(), bool(t), float(t), int(t), `if t:`
    "aten.nonzero.default", "aten.masked_select.default", "aten.equal.default", "aten.bincount.default",
    "aten._unique.default", "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
})


def _is_sync(func, args, kwargs) -> bool:
    name = str(func)
    if name in _ALWAYS:
        return True
    if name in ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"):
        # t[mask] / t[mask] = v with a boolean mask: the number of selected rows is read on the host
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name == "aten.repeat_interleave.Tensor":  # the output size is read on the host unless it is given
        return (kwargs or {}).get("output_size") is None
    if name == "aten._to_copy.default":  # t.cpu(), t.tolist() of a GPU tensor: a device -> host copy
        target = (kwargs or {}).get("device")
        return args[0].device.type not in ("cpu", "meta") and target is not None and torch.device(target).type == "cpu"
    if name == "aten.copy_.default":  # cpu_tensor.copy_(gpu_tensor)
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type not in ("cpu", "meta")
    return False


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts host-synchronising operations run inside it (``count``, ``by_op``)."""

    def __init__(self):
        super().__init__()
        self.by_op: Dict[str, int] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args, kwargs):
            self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))
