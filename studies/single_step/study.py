"""Robustness at half the cost? Single-step adversarial training (N-FGSM, FGSM-RS) against PGD-3 AT (issue 31, part 3).

Two protocols, every arm at one commit, 3 seeds each, the model of each run its last step:

- **claims**: the claims protocol of ``studies.channel_defenses`` (CIFAR ResNet-18 of width 1/8, the first 5,000
  training images, 12 epochs, lr drops at 9 and 11, batch 128, eps 8/255 in pixel space, test846), plain AT;
- **lite0**: the real-network recipe of ``studies.lite0_cifar10`` (ImageNet-pretrained EfficientNet-Lite0 at 64 px,
  10,000 training images, 2 epochs, cosine), plain AT.

Arms per protocol: PGD-3 (step 2.5 eps / 3), N-FGSM (de Jorge et al. 2022: noise of 2 eps, one step of eps, no
projection to the eps-ball), FGSM-RS (Wong et al. 2020: uniform start, one step of 1.25 eps, projected). Each run is
scored by the adaptive union; the Trainer's catastrophic-overfitting guard records any collapse (``val_fgsm`` beside
``val_pgd``). A collapse sweep trains N-FGSM and FGSM-RS at eps 12/255 and 16/255 (claims protocol, seed 0, scored at
their own eps) to say at which eps each collapses.

The goal, written before the first run: a single-step arm **meets it** on a protocol when (a) the crossed seed rule
(:data:`casify.evaluate.compare.CROSSED_SEED_RULE`, Holm over the family below) does not call it worse than PGD-3 AND
the lower end of its t interval is above -2 points of worst-case accuracy (the non-inferiority margin), and (b) its
mean training seconds, without the held-out validation every arm pays alike, are at most 0.6 of PGD-3's (the same
workers, one torch thread each). Otherwise it fails, and
the report says which part failed.

    python -m studies.single_step.study --init
    OMP_NUM_THREADS=1 python -m studies.single_step.study --work --data-dir ../shared/data/cifar10   # one or two
    python -m studies.single_step.study --report --data-dir ../shared/data/cifar10
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from studies import _protocol as protocol
from studies._protocol import Arm, Study
from studies._records import read_json
from studies._report import interval, pct
from studies._scoring import EPS
from studies.channel_defenses import study as claims
from studies.lite0_cifar10 import study as lite0

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = HERE / "models"
ATTACKS = ("pgd", "n_fgsm", "fgsm_rs")
SWEEP_EPS = {"eps12": 12 / 255, "eps16": 16 / 255}
# name: (protocol, training attack, eps); plain AT in every arm
RUNS = {f"{p}_{a}": (p, a, EPS) for p in ("claims", "lite0") for a in ATTACKS}
RUNS.update({f"claims_{a}_{tag}": ("claims", a, eps) for a in ("n_fgsm", "fgsm_rs") for tag, eps in SWEEP_EPS.items()})
ARMS = {name: Arm("at", init="paper" if p == "claims" else None) for name, (p, _, _) in RUNS.items()}
SEEDS = (0, 1, 2)
# the cheaper protocol first, seed-major; the collapse sweep after the claims seeds; Lite0 last (its runs cost ~6x)
SCHEDULE = ([(f"claims_{a}", s) for s in SEEDS for a in ATTACKS]
            + [(name, 0) for name in RUNS if name.endswith(tuple(SWEEP_EPS))]
            + [(f"lite0_{a}", s) for s in SEEDS for a in ATTACKS])
COMPARISONS = {f"{p}_{a}_vs_{p}_pgd": (f"{p}_{a}", f"{p}_pgd") for p in ("claims", "lite0") for a in ATTACKS[1:]}
MARGIN = 0.02  # non-inferiority: the t interval's lower end must lie above -2 points
TIME_RATIO = 0.6


def build_model(name: str, arm: Arm, seed: int, checkpoint: str, runs_dir: Path):
    if RUNS[name][0] == "claims":
        return claims.build_model(arm, seed)
    return lite0.build_model(arm, seed, checkpoint, runs_dir)


def prepare(name: str, arm: Arm, seed: int, out: Path, data, checkpoint: str, runs_dir: Path) -> None:
    """The Lite0 protocol's runs start from their seed's natural base, as in ``studies.lite0_cifar10``."""
    if RUNS[name][0] == "lite0":
        lite0.prepare(name, arm, seed, out, data, checkpoint, runs_dir)


def train_config(name: str, arm: Arm, seed: int, out: Path):
    source, attack, eps = RUNS[name]
    base = (claims if source == "claims" else lite0).train_config(name, arm, seed, out)
    if attack == "pgd":
        return dataclasses.replace(base, eps=eps, attack_alpha=2.5 * eps / base.attack_steps)
    return dataclasses.replace(base, eps=eps, attack=attack, attack_steps=None, attack_alpha=None)


def study(args) -> Study:
    if getattr(args, "work", False) and not (args.only and all(RUNS[n][0] == "claims" for n in args.only)):
        lite0.check_not_paused(read_json(lite0.RESULTS / "study.json"))  # its Lite0 arms use that protocol
    data_dir = Path(args.data_dir)
    data = {"claims": lambda: claims.datasets(data_dir), "lite0": lambda: lite0.datasets(data_dir)}
    tests = {"claims": lambda: claims.test_set(data_dir), "lite0": lambda: lite0.test_set(data_dir)}
    return Study(
        name="single_step", arms=ARMS, schedule=SCHEDULE,
        build_model=lambda name, arm, seed: build_model(name, arm, seed, args.checkpoint, Path(args.runs_dir)),
        prepare=lambda name, arm, seed, out, data: prepare(name, arm, seed, out, data, args.checkpoint,
                                                           Path(args.runs_dir)),
        datasets=lambda name: data[RUNS[name][0]](), test_set=lambda name: tests[RUNS[name][0]](),
        train_config=train_config, eps=lambda name: RUNS[name][2], data_key=lambda name: RUNS[name][0],
        extras={"saturation.json": lambda name, seed: seed == 0 and not name.endswith(tuple(SWEEP_EPS))})


def decision_rule() -> dict:
    from casify.evaluate.compare import CROSSED_SEED_RULE
    return {"rule": CROSSED_SEED_RULE,
            "goal": f"a single-step arm meets the goal on a protocol when the rule does not call it worse than PGD-3 "
                    f"(Holm over the family) AND the lower end of its t interval is above -{100 * MARGIN:.0f} points "
                    f"of worst-case accuracy, AND its mean training seconds without the held-out validation (the same "
                    f"for every arm) are at most {TIME_RATIO} of PGD-3's",
            "metric": "per-example worst case over the adaptive union, test846, at the run's training eps (L-inf, "
                      "pixel space); the model of each run is its last step",
            "family": {k: {"A": a, "B": b} for k, (a, b) in COMPARISONS.items()},
            "collapse_sweep": {name: {"attack": a, "eps_255": round(eps * 255, 3)} for name, (p, a, eps) in RUNS.items()
                               if name.endswith(tuple(SWEEP_EPS))},
            "protocols": {"claims": claims.PROTOCOL, "lite0": lite0.PROTOCOL},
            "runs": {k: {"protocol": p, "attack": a, "eps_255": round(e * 255, 3)} for k, (p, a, e) in RUNS.items()},
            "schedule": SCHEDULE}


def annotate(run_dir: Path, run: dict) -> None:
    """The catastrophic-overfitting guard's record of the run (None: no collapse) and its training eps."""
    config = read_json(run_dir / "final" / "config.json") or {}
    run["overfitting"] = (config.get("training") or {}).get("overfitting")
    run["eps_255"] = round(RUNS[run["arm"]][2] * 255, 3)


def goal(record: dict, runs: dict) -> list:
    """The goal of the module docstring, per single-step arm and protocol; markdown lines for the README."""
    lines = ["## The goal: not worse than PGD-3 (margin 2 points) at <= 0.6x its training time", "",
             "| arm | vs PGD-3 (worst case) | verdict (Holm) | t lower end > -2 | training time / PGD-3's | goal |",
             "|---|---|---|---|---|---|"]
    record["goal"] = {}
    for name, c in record["comparisons"].items():
        a, b = c["A"], c["B"]
        # the optimizer steps' seconds: training minus the held-out validation, which every arm pays alike
        seconds = {arm: [r["train_seconds"] - (r.get("validation_seconds") or 0.0) for (n, _), r in runs.items()
                         if n == arm] for arm in (a, b)}
        ratio = (sum(seconds[a]) / len(seconds[a])) / (sum(seconds[b]) / len(seconds[b])) \
            if seconds[a] and seconds[b] else None
        if "t_ci95" not in c:
            outcome = c.get("verdict", "not judged")
            margin_ok = None
        else:
            margin_ok = c["t_ci95"][0] > -MARGIN
            fast = ratio is not None and ratio <= TIME_RATIO
            failed = [why for ok, why in ((c["verdict"] != "A worse", "worse than PGD-3"),
                                          (margin_ok, "the margin"), (fast, "the time")) if not ok]
            outcome = "met" if not failed else "failed: " + ", ".join(failed)
        record["goal"][name] = {"time_ratio": ratio, "margin_ok": margin_ok, "outcome": outcome}
        lines.append(f"| {a} | {interval(c)} | {c.get('verdict')} | {margin_ok} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | **{outcome}** |")
    collapses = {f"{r['arm']}/s{r['seed']}": r.get("overfitting") for r in runs.values() if r.get("overfitting")}
    record["collapses"] = collapses
    lines += ["", "Catastrophic overfitting (the Trainer's guard): "
              + (", ".join(f"{k} (eps {runs[(k.split('/s')[0], int(k.split('/s')[1]))]['eps_255']}/255)"
                           for k in collapses) if collapses else "none of the runs so far collapsed") + "."]
    return lines + collapse_sweep(record, runs)


def collapse_sweep(record: dict, runs: dict) -> list:
    """At which eps each single-step method collapses: seed 0 of the claims protocol at 8/255 and the sweep's runs at
    12 and 16/255, each trained and scored at its own eps. A collapse is what the guard records; the largest gap of
    held-out FGSM over PGD-10 accuracy and the last validation show what it saw."""
    arms = [a for a in ("claims_pgd", "claims_n_fgsm", "claims_fgsm_rs") if (a, 0) in runs]
    arms += [name for name in RUNS if name.endswith(tuple(SWEEP_EPS)) and (name, 0) in runs]
    if not any(name.endswith(tuple(SWEEP_EPS)) for name in arms):
        record.pop("collapse_sweep", None)
        return []
    lines = ["", "## The collapse sweep (claims protocol, seed 0, each run at its own eps)", "",
             "The sweep's runs (`_eps12`, `_eps16`) are trained and scored at their own eps: in the runs table below, "
             "their worst case is at that eps, not at 8/255; they are in no comparison.", "",
             "| run | attack | eps (pixels) | natural | worst case | last held-out PGD-10 / FGSM | largest FGSM - PGD "
             "| guard |", "|---|---|---|---|---|---|---|---|"]
    record["collapse_sweep"] = {}
    for name in arms:
        r = runs[(name, 0)]
        history = [h for h in r["history"] if h.get("val_fgsm") is not None]
        gap = max((h["val_fgsm"] - h["val_pgd"] for h in history), default=None)
        last = r["history"][-1] if r["history"] else {}
        fired = r.get("overfitting")
        record["collapse_sweep"][name] = {"attack": RUNS[name][1], "eps_255": r["eps_255"], "natural": r["natural"],
                                          "worst_case": r["worst_case"], "last_val_pgd": last.get("val_pgd"),
                                          "last_val_fgsm": last.get("val_fgsm"), "largest_fgsm_minus_pgd": gap,
                                          "guard": fired}
        guard = ("no collapse" if not fired else f"**{fired.get('trigger', 'collapse')}** at step {fired.get('step')}"
                 if isinstance(fired, dict) else "unreadable record")
        lines.append(f"| {name} | {RUNS[name][1]} | {r['eps_255']:g}/255 | {pct(r['natural'])} | {pct(r['worst_case'])} "
                     f"| {pct(last.get('val_pgd'))} / {pct(last.get('val_fgsm'))} "
                     f"| {'-' if gap is None else f'{100 * gap:+.1f}'} | {guard} |")
    return lines


def main(argv=None):
    protocol.cli(argv, __doc__.splitlines()[0], study, decision_rule, results=RESULTS, models=MODELS,
                 comparisons=COMPARISONS, module="studies.single_step.study", runs_dir="outputs/single_step",
                 title="Single-step adversarial training (N-FGSM, FGSM-RS) against PGD-3 AT",
                 extra_args=[("--checkpoint", {"default": "../shared/models/efficientnet_lite0_imagenet.safetensors",
                                               "help": "the Lite0 protocol's ImageNet-1k weights"})],
                 annotate=annotate, extend=goal)


if __name__ == "__main__":
    main()
