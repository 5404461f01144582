"""Running a plan over the data: every row on every example (``per_attack=True``), or the cascade, where the rows after
the first group run only on the examples every earlier row left correct, as AutoAttack does.

Each example's random draws come from its own seed (the row's seed and the example's dataset index), so what an
example's result is does not depend on the batch size, the other examples of its batch or the number of processes;
per-example flags are gathered across processes with Accelerate's ``gather_for_metrics``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.eps import format_eps
from ..attacks.threat_model import check_norm, distance
from ..core.inputs import check_images
from .deployed import deployed_scores, zero_input_gradient
from .examples import example_digests
from .plan import CASCADE_RANKS, Job, Plan


def example_seed(job_seed: int, index: int) -> int:
    """The seed of one example's random draws in one row: a function of the row's seed and the example's position in
    the dataset only, so results do not depend on the batch size, the batch's other examples or the process count."""
    return (job_seed * 1_000_003 + index) % (2 ** 63)


class IndexedDataset(Dataset):
    """``(image, label, index)``: the evaluation seeds each example's random starts by its index. ``indices``: only
    these examples of ``data`` (a cascade's survivors), still labelled by their index in ``data``."""

    def __init__(self, data: Dataset, indices: Optional[List[int]] = None):
        self.data = data
        self.indices = indices

    def __len__(self) -> int:
        return len(self.data) if self.indices is None else len(self.indices)

    def __getitem__(self, i):
        i = i if self.indices is None else self.indices[i]
        x, y = self.data[i]
        return x, y, i


@dataclass
class Flags:
    """Per example (rows, dataset order) and job (columns, the plan's order): ``correct`` on the deployed model,
    ``ran`` (False where the cascade skipped the example), ``correct_last`` / ``correct_best`` (the last and the best
    iterate as the attack scored them, for iterative rows; else ``correct``), ``zero_grad`` per example (the
    gradient probe). ``order``: the order the rows ran; ``every[i]``: job ``i`` ran on every example; ``digests``:
    (N, 32) uint8, each example's SHA-256 (:func:`casify.evaluate.examples.example_digests`); ``nonfinite``: per
    example and job, whether the deployed model's logits held a NaN or inf (then ``correct`` is False)."""
    correct: torch.Tensor
    ran: torch.Tensor
    correct_last: torch.Tensor
    correct_best: torch.Tensor
    zero_grad: torch.Tensor
    order: List[int]
    every: List[bool]
    digests: Optional[torch.Tensor] = None
    nonfinite: Optional[torch.Tensor] = None


def check_threat_model(job: Job, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    """Refuse a result whose examples leave the eps-ball (in the job's norm) or [0, 1]: the worst case must stay one
    threat model."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"attack {job.name!r} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    norm = check_norm(job.settings.get("norm", "linf"))
    if x.numel() and not bool(torch.isfinite(x_adv).all()):
        raise RuntimeError(f"attack {job.name!r} returned NaN or inf pixels: it left the threat model (a finite "
                           "image in the eps-ball)")
    dist = float(distance(x_adv, x, norm).max()) if x.numel() else 0.0
    slack = 1e-5 if norm == "linf" else 1e-4 * max(1.0, job.eps)  # L2: float32 rounding of a sum over every pixel
    low, high = (float(x_adv.min()), float(x_adv.max())) if x.numel() else (0.0, 1.0)
    if not (dist <= job.eps + slack and low >= -1e-6 and high <= 1 + 1e-6):  # "not <=": NaN never passes
        raise RuntimeError(f"attack {job.name!r} left the threat model: {norm} distance {dist:.5f} vs eps "
                           f"{job.eps:.5f}, range [{float(x_adv.min()):.4f}, {float(x_adv.max()):.4f}]")


def _gather(accelerator, t: torch.Tensor) -> torch.Tensor:
    if accelerator is None:
        return t
    if t.dtype == torch.bool:
        return accelerator.gather_for_metrics(t.to(torch.uint8)).bool()
    return accelerator.gather_for_metrics(t)


def run_plan(model: nn.Module, target: nn.Module, plan: Plan, data: Dataset, *, batch_size: int, device,
             per_attack: bool, probe: bool, accelerator=None, progress: bool = True, eps: float = 0.0) -> Flags:
    """Run ``plan``'s jobs on ``data``: first the rows that run on every example (all of them when ``per_attack``;
    else the cascade's rank-0 rows), the eps sweep and the check-only attacks; then each remaining row, in the
    cascade's order, on the examples still robust. ``probe``: also record which clean examples have a zero input
    gradient. Every module's train/eval mode is restored afterwards."""
    jobs, all_jobs = plan.rows, plan.all
    process = accelerator.process_index if accelerator is not None else 0
    generators = [torch.Generator().manual_seed(job.seed + 7919 * process) for job in all_jobs]
    # The cascade's order; the sweep and the check-only attacks run on every example, after the rows.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].rank, i)) + list(range(len(jobs), len(all_jobs)))
    every = [per_attack or i >= len(jobs) or job.rank == CASCADE_RANKS["every example"]
             for i, job in enumerate(all_jobs)]
    n = len(data)
    correct = torch.zeros(n, len(all_jobs), dtype=torch.bool)
    flags_all = Flags(correct, correct.clone(), correct.clone(), correct.clone(), torch.zeros(n, dtype=torch.bool),
                      order, every, torch.zeros(n, 32, dtype=torch.uint8), correct.clone())
    worst_cols = [i for i, job in enumerate(jobs) if job.in_worst_case]
    main_process = accelerator is None or accelerator.is_main_process
    modes = [(m, m.training) for m in model.modules()]

    def run(cols: List[int], indices: Optional[List[int]], desc: str, with_probe: bool = False,
            alive_before: Optional[torch.Tensor] = None) -> None:
        """The jobs ``cols`` on the examples ``indices`` (None: all), in batches of ``batch_size`` (a cascade's
        survivors are batched afresh, so a row on few survivors still runs full batches), into ``flags_all``."""
        from ..io.progress import progress_bar
        loader = DataLoader(IndexedDataset(data, indices), batch_size=batch_size, shuffle=False)
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
        bar = progress_bar(loader, desc=desc, disable=not (progress and main_process), leave=False)
        col_index = torch.tensor(cols, dtype=torch.long)
        for x, y, index in bar:
            check_images(x)  # uint8 / 0..255 images ("divide by 255"), NaN or inf pixels: one clear error
            digests = example_digests(x, y) if indices is None else None  # the first pass covers every example
            x = x.to(device).float()
            y = torch.as_tensor(y).to(device).long()
            index = torch.as_tensor(index).to(device)
            idx = index.tolist()
            flags = torch.zeros(x.shape[0], len(cols), dtype=torch.bool, device=x.device)
            last_flags, best_flags, broken = flags.clone(), flags.clone(), flags.clone()
            for c, i in enumerate(cols):
                job = all_jobs[i]
                t0 = time.perf_counter()
                generator = generators[i]
                if job.per_example_seed:  # each example's random draws from its own seed: batch-size independent
                    generator = [torch.Generator().manual_seed(example_seed(job.seed, k)) for k in idx]
                out = job.craft(x, y, {"index": idx}, generator)
                x_adv, info = out if isinstance(out, tuple) else (out, None)
                check_threat_model(job, x, x_adv)
                correct_now, finite = deployed_scores(model, x_adv, y)
                flags[:, c] = correct_now
                broken[:, c] = ~finite
                # last- and best-iterate correctness, where the attack scored its iterates on this model
                scored = info is not None and job.iterative
                last_flags[:, c] = (~info.fooled_last & finite) if scored else correct_now
                best_flags[:, c] = (~info.fooled_any & finite) if scored else correct_now
                job.seconds += time.perf_counter() - t0
            pos = _gather(accelerator, index).cpu().long()
            rows_at = (pos.unsqueeze(1), col_index.unsqueeze(0))
            flags_all.correct[rows_at] = _gather(accelerator, flags).cpu()
            flags_all.ran[rows_at] = True
            flags_all.correct_last[rows_at] = _gather(accelerator, last_flags).cpu()
            flags_all.correct_best[rows_at] = _gather(accelerator, best_flags).cpu()
            flags_all.nonfinite[rows_at] = _gather(accelerator, broken).cpu()
            if digests is not None:
                flags_all.digests[pos] = _gather(accelerator, digests.to(x.device)).cpu()
            if with_probe:
                flags_all.zero_grad[pos] = _gather(accelerator, zero_input_gradient(target, x, y)).cpu()
            if progress and main_process:
                bar.set_postfix(worst_case=running_worst_case(flags_all, cols, worst_cols, alive_before))

    try:
        run([i for i in order if every[i]], None, f"eval {format_eps(eps)}", with_probe=probe)
        alive = correct[:, [i for i in worst_cols if every[i]]].all(dim=1)
        for i in order:
            if every[i]:
                continue
            # the cascade: only the examples that every earlier row left correct
            survivors = alive.nonzero().squeeze(1).tolist()
            if survivors:
                run([i], survivors, f"{all_jobs[i].name} on {len(survivors)}", alive_before=alive)
            if i in worst_cols:
                alive &= correct[:, i]
    finally:
        for module, training in modes:
            module.training = training
    return flags_all


def running_worst_case(flags: Flags, cols: List[int], worst_cols: List[int], alive: Optional[torch.Tensor]) -> str:
    """The worst case so far, for a progress bar. First pass (``alive`` None): over the examples attacked so far.
    A cascade row (``alive``: the examples every earlier row left correct): over all examples, the survivors this row
    has not reached yet still counting as robust, so the number falls towards the final worst case instead of
    showing the share of survivors that are still robust (which reads 100 % on a strong model's last rows)."""
    rows = [i for i in worst_cols if i in cols]
    if alive is None:
        done = flags.ran[:, cols[0]]
        robust = flags.correct[done][:, rows].all(dim=1)
    else:
        robust = alive.clone()
        for i in rows:
            robust &= ~flags.ran[:, i] | flags.correct[:, i]
    return f"{100 * float(robust.float().mean()):.1f}%"


__all__ = ["Flags", "IndexedDataset", "check_threat_model", "example_seed", "run_plan", "running_worst_case"]
