"""The learning-rate schedule: torch's schedulers stepped once per optimizer step, milestones in (fractional) epochs."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def first_step_of_epoch(epoch: float, steps_per_epoch: int) -> int:
    """The first optimizer step ``s`` with ``s / steps_per_epoch >= epoch``: milestones may be fractional epochs."""
    step = max(0, math.ceil(epoch * steps_per_epoch))
    while step > 0 and (step - 1) / steps_per_epoch >= epoch:  # float rounding of the product, either way
        step -= 1
    while step / steps_per_epoch < epoch:
        step += 1
    return step


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int,
                 total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers for ``config``, stepped once per optimizer step: linear warmup from ``lr / warmup_steps``
    to ``lr``, then multistep (milestones in epochs), cosine to 0 at ``total_steps``, or constant.

    Cosine is a LambdaLR of the closed form: CosineAnnealingLR updates the rate recursively and drifts from it.
    """
    from torch.optim import lr_scheduler as sched
    warmup, steps_per_epoch = config.warmup_steps, max(1, steps_per_epoch)
    if config.schedule == "multistep":  # counted from the end of warmup, as SequentialLR restarts the count there
        main = sched.MultiStepLR(optimizer, [first_step_of_epoch(m, steps_per_epoch) - warmup
                                             for m in config.milestones], gamma=config.gamma)
    elif config.schedule == "cosine":
        length = max(1, total_steps - warmup)
        main = sched.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / length))))
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
