"""From per-example flags to the report's numbers: each row's result, the per-example worst case, the cascade's
accounting (what each row newly fooled, in the order the rows ran) and the per-family worst case the summary shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .plan import Plan
from .report import AttackResult
from .runner import Flags


@dataclass
class Tally:
    """``results``: one per job of the plan (rows, then sweep, then check-only attacks); ``worst_case``: the
    per-example worst over the rows that enter it; ``cascade``: per such row, in the order it ran, ``attacked`` /
    ``newly_fooled`` / ``robust_after``; ``families``: per family, its rows and their joint accuracy (a family whose
    rows ran only on survivors is left out; one with some such rows is marked ``upper_bound``); ``per_example``:
    per job, the correct flags in dataset order (None where a cascade skipped the example), and ``worst_case``."""
    results: List[AttackResult]
    worst_case: dict
    cascade: List[dict]
    families: Dict[str, dict]
    per_example: Dict[str, List[Optional[bool]]]


def tally(plan: Plan, flags: Flags) -> Tally:
    jobs, all_jobs = plan.rows, plan.all
    correct, every = flags.correct, flags.every
    n = correct.shape[0]
    results = []
    for i, job in enumerate(all_jobs):
        whole = bool(every[i])
        c = int(correct[:, i].sum())
        last = int(flags.correct_last[:, i].sum()) / n if (job.iterative and n and whole) else None
        results.append(AttackResult(job.name, job.kind, (c / n if n else 0.0) if whole else None, c if whole else None,
                                    n, round(job.seconds, 4), job.eps, job.settings, job.notes, job.in_worst_case,
                                    family=job.family or job.name, objective=job.objective,
                                    last_iterate_accuracy=last, attacked=int(flags.ran[:, i].sum()),
                                    nonfinite=int(flags.nonfinite[:, i].sum()) if flags.nonfinite is not None else 0))
    worst_idx = [i for i, job in enumerate(jobs) if job.in_worst_case]
    worst_flags = correct[:, worst_idx].all(dim=1) if n else torch.zeros(0, dtype=torch.bool)
    worst = {"accuracy": int(worst_flags.sum()) / n if n else 0.0, "n_correct": int(worst_flags.sum()),
             "n": n, "attacks": [jobs[i].name for i in worst_idx]}
    # the cascade accounting, in the order the rows ran (the same numbers in both modes)
    cascade = []
    alive = torch.ones(n, dtype=torch.bool)
    for i in flags.order[:len(jobs)]:
        if not jobs[i].in_worst_case:
            continue
        newly = int((alive & ~correct[:, i]).sum())
        alive &= correct[:, i]
        results[i].newly_fooled, results[i].robust_after = newly, int(alive.sum())
        cascade.append({"row": jobs[i].name, "attacked": results[i].attacked, "newly_fooled": newly,
                        "robust_after": int(alive.sum()), "every_example": bool(every[i])})
    families: Dict[str, dict] = {}
    for i in worst_idx:
        if jobs[i].kind == "noise":
            continue
        f = families.setdefault(jobs[i].family or jobs[i].name, {"rows": [], "cols": [], "survivors_only": []})
        if bool(every[i]):
            f["rows"].append(jobs[i].name)
            f["cols"].append(i)
        else:
            f["survivors_only"].append(jobs[i].name)
    for name in list(families):
        f = families[name]
        if not f["rows"]:  # no row of this family ran on every example: it has no accuracy here
            del families[name]
            continue
        fam = correct[:, f.pop("cols")].all(dim=1) if n else torch.zeros(0, dtype=torch.bool)
        f["accuracy"] = int(fam.sum()) / n if n else 0.0
        f["n_correct"] = int(fam.sum())
        if f["survivors_only"]:
            f["upper_bound"] = True
        else:
            del f["survivors_only"]
    per_example = {}
    for i, job in enumerate(all_jobs):
        col, ran_i = correct[:, i].tolist(), flags.ran[:, i].tolist()
        per_example[job.name] = col if bool(every[i]) else [c if r else None for c, r in zip(col, ran_i)]
    per_example["worst_case"] = worst_flags.tolist()
    return Tally(results, worst, cascade, families, per_example)


__all__ = ["Tally", "tally"]
