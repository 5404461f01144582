"""Does a longer budget close CIFS's and FSR's natural-accuracy gap to AT? A held-out pilot (issue 28, part 2).

Why: at the study's budget (12 epochs, the same for every arm) CIFS and FSR end 6.4 and 5.2 points below AT in
natural accuracy on test846, and a reviewer may read that as under-training. The study gives no arm a budget of its
own (the rule: the same budget for every arm), so the question is whether a longer budget *for every arm* would
close the gap. This pilot trains AT, CIFS and FSR of the study (same arms, same protocol) for ``--epochs`` epochs
(milestones at the study's fractions: 3/4 and 11/12 of the epochs) and reads only the 500 held-out training images
(45,000 on) that every run validates on: natural and PGD-10 accuracy after each epoch. The test set is never read;
nothing here is a verdict: one run's held-out accuracy has a standard error of about 2 points (500 images), so a gap
is read over seeds. The pilot runs at the commit checked out (run it from a pinned worktree); its report keeps runs
of different commits apart, so the study's archived 12-epoch runs (at the study's pin) are context, not a pairing.

    OMP_NUM_THREADS=1 python -m studies.channel_defenses.budget_pilot --jobs at_cifs:0 at:0 \\
        --data-dir ../shared/data/cifar10 --runs-dir outputs/budget_pilot
    python -m studies.channel_defenses.budget_pilot --report   # results/budget_pilot.json, from the run folders
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from studies._protocol import train_run
from studies._records import read_json, write_json
from studies.channel_defenses import study as channel

RESULTS = channel.RESULTS / "budget_pilot.json"


def milestones(epochs: int) -> tuple:
    """The study's lr drops (9 and 11 of 12 epochs) at the same fractions of another budget (epochs may be
    fractional: the schedule drops at the step that fraction reaches)."""
    return (epochs * 9 / 12, epochs * 11 / 12)


def train(arm_name: str, seed: int, epochs: int, data_dir: Path, runs_dir: Path) -> Path:
    """One pilot run: the study's own run (:func:`studies._protocol.train_run`, which resumes from its checkpoints and
    writes ``train_record.json``) with the budget replaced."""
    def longer(name, arm, s, out):
        return dataclasses.replace(channel.train_config(name, arm, s, out), epochs=epochs,
                                   milestones=milestones(epochs))
    study = dataclasses.replace(channel.study(argparse.Namespace(data_dir=data_dir)), train_config=longer)
    budget_dir = runs_dir / f"e{epochs}"
    train_run(study, budget_dir, arm_name, seed, channel.datasets(data_dir))
    return study.run_dir(budget_dir, arm_name, seed)


def summary(record: dict) -> dict:
    """What the pilot reports of one run: held-out natural and PGD-10 after each epoch and at the end."""
    history = record["history"]
    return {"arm": record["arm"], "seed": record["seed"], "epochs": record["config"]["epochs"],
            "milestones": record["config"]["milestones"], "commit": record["code"]["commit"],
            "dirty": record["code"]["dirty"], "train_seconds": record["seconds"],
            "validation_seconds": record["validation_seconds"], "held_out_images": history[-1]["val_count"],
            "held_out_natural": [h["val_natural"] for h in history], "held_out_pgd10": [h["val_pgd"] for h in history],
            "final_natural": history[-1]["val_natural"], "final_pgd10": history[-1]["val_pgd"]}


def report(runs_dir: Path, baseline_records: Path) -> dict:
    """The pilot's runs beside the study's own 12-epoch runs of the same seeds (their held-out history), and the
    held-out natural gap to AT at each budget."""
    runs = [{**summary(read_json(p)), "source": "pilot"}
            for p in sorted(runs_dir.glob("e*/*_s*/train_record.json"))]
    seeds = sorted({r["seed"] for r in runs})
    for arm in channel.ARMS:
        for seed in seeds:
            study_record = read_json(baseline_records / f"{arm}_s{seed}" / "train_record.json")
            if study_record and arm in {r["arm"] for r in runs}:
                runs.append({**summary(study_record), "source": "the study's run (archived)"})
    gaps = {}  # within one budget, one commit and one source: a gap never pairs runs of two code versions
    for group in sorted({(r["epochs"], r["commit"] or "untracked", r["source"]) for r in runs}):
        members = [r for r in runs if (r["epochs"], r["commit"] or "untracked", r["source"]) == group]
        at = {r["seed"]: r["final_natural"] for r in members if r["arm"] == "at"}
        for r in members:
            if r["arm"] != "at" and r["seed"] in at:
                key = f"e{group[0]} at {group[1][:10]} ({group[2]})"
                gaps.setdefault(key, {})[f"{r['arm']}_s{r['seed']}"] = round(r["final_natural"] - at[r["seed"]], 4)
    return {"question": __doc__.split("\n")[0], "data": "the 500 held-out training images (45,000 on); the test set "
            "is never read", "runs": runs, "natural_gap_to_at": gaps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", nargs="*", default=[], help="arm:seed pairs to train, in order (arms: "
                   + ", ".join(channel.ARMS) + ")")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/cifar10"))
    p.add_argument("--runs-dir", type=Path, default=Path("outputs/budget_pilot"))
    p.add_argument("--report", action="store_true", help="write results/budget_pilot.json from --runs-dir")
    args = p.parse_args(argv)
    for job in args.jobs:
        arm, _, seed = job.partition(":")
        if arm not in channel.ARMS or not seed.isdigit():
            p.error(f"--jobs takes arm:seed with an arm of {sorted(channel.ARMS)}, got {job!r}")
        train(arm, int(seed), args.epochs, args.data_dir, args.runs_dir)
    if args.report:
        write_json(RESULTS, report(args.runs_dir, channel.HERE / "runs"))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
