"""Full-scale AT vs AT+CAS on CIFAR-10 (the paper's ResNet-18 setting, shortened schedule), resumable across
10-minute GPU commands.

    python -m studies.reproduce_gpu.study --runs-dir runs/gpu --seeds 0 --budget-minutes 8     # repeat until done
    python -m studies.reproduce_gpu.study --smoke --runs-dir /tmp/repro_smoke --budget-minutes 0.1   # CPU pipeline test
    python -m studies.reproduce_gpu.study --arms at_pgd3 at_n_fgsm at_fgsm_rs --runs-dir runs/gpu_fast --seeds 0 1 2 \
        --budget-minutes 8                              # single-step AT (N-FGSM, FGSM-RS) vs PGD-3 AT, same schedule

What runs (per seed, in this order; each invocation continues where the last one stopped):

1. train AT        (``recipes/configs/cifar10_resnet18_at.yaml``: full-width ``cifar_resnet18``, no CAS)
2. train AT+CAS    (``recipes/configs/cifar10_resnet18_at_cas.yaml``: CAS after ``layer4.0`` and ``layer4.1``,
                    ``init="paper"``, beta 2, adaptive PGD-10 training attack on CE + beta * mean aux CE)
3. score AT, 4. score AT+CAS with ``casify.evaluate.evaluate(..., attacks="standard", eps=8/255, checks=True)``
   (the default cascade; adaptive ``[cas]`` rows, each head alone, fixed routings, PGD-100, CW-20, the
   gradient-masking checks; ``--autoattack`` adds AutoAttack when the package is installed)
5. write ``studies/reproduce_gpu/results/reproduce_gpu.json`` + ``.md``: per run natural / worst case / per family, train
   minutes, device; the paired comparison AT+CAS vs AT on the same test images (difference with a 95 % CI, McNemar z).

ARMS (``--arms``, default ``at at_cas``, the two above). The single-step arms train the AT recipe with another training
attack, everything else equal: ``at_pgd3`` (PGD-3, step 2.5 eps / 3: the cheap multi-step reference),
``at_n_fgsm`` (``train.attack: n_fgsm``: noise of 2 eps, one step of eps, no projection to the eps-ball) and
``at_fgsm_rs`` (``train.attack: fgsm_rs``: a uniform start, one step of 1.25 eps). With them the results add, per
single-step arm and seed, the paired comparison against ``at_pgd3`` (worst case and natural) and the ratio of their
training minutes on the same device (the issue's goal: not worse than PGD-3 AT at <= 0.6x its training time), and each
run's catastrophic-overfitting record (``casify.train.overfit_guard``) when the guard fired.

Both arms use the paper's protocol as the recipes encode it (shared/docs/cas-reference.md): inputs in [0, 1] without
normalisation, pad-4 crop + flip, batch 128, SGD momentum 0.9, lr 0.1, weight decay 2e-4, PGD-10 at eps 8/255 with
step 2/255 and a random start, adversarial examples crafted in eval mode (CAS routed by its own prediction), the
update in training mode routed by the true labels. Data: ``--data`` (default ``../shared/data/cifar10/train.npz``);
its last 10 % (5,000 images) are held out by ``casify.data.build_dataset`` and select the checkpoint (robust accuracy
under PGD-10 on 1,000 of them, every epoch); the test set is ``--test`` (default ``test846.npz``, 846 official test
images) and is never used for selection. bf16 autocast and channels_last on CUDA; ``--compile`` adds torch.compile
(recompiled in every invocation: ~1-3 minutes per invocation, so it pays only with long budgets).

SCHEDULE (shortened). The paper trains 100 epochs with lr 0.1 divided by 10 at epochs 75 and 90 (cas-reference.md,
"Training") and reports the last epoch. Here: ``--epochs 30`` with the same *shape* of schedule, the milestones scaled
to the same fractions of training (0.75 and 0.90: lr 0.1 until epoch 22.5, 0.01 until 27, 0.001 to 30), so each phase
gets the paper's share of the steps and the final low-lr phase -- where most of the robust accuracy is gained --
is kept. ~30 % of the paper's compute; absolute accuracies are expected a little below Table 5 (shorter training), the
comparison is between arms trained on an identical schedule and seeds. ``--schedule cosine`` uses a cosine decay to 0
over the same epochs instead. The model scored is the one selected on the held-out split (``--select best``, casify's
convention and the honest one) or the last epoch's (``--select final``, the paper's Table 5 convention).

RESUME. ``--budget-minutes B``: a Trainer callback sets ``trainer.stop`` once B minutes of this invocation's wall clock
are used; the Trainer then leaves a checkpoint, and the next invocation of the SAME command resumes bit-exactly (the
Trainer refuses a run folder holding a different run). A checkpoint is also written every ``--checkpoint-minutes``
(default 2) of training, so a killed command loses at most that. A scoring pass cannot be split: it starts only when
it is predicted to fit the remaining budget (from earlier scoring times in this runs dir) or is the first unit of work
of the invocation. ``<runs-dir>/state.json`` records the settings, what is trained and scored, and the device
(``torch.cuda.get_device_name``) of each invocation. Every invocation ends by printing what remains and the command
that continues.

``--smoke``: the whole pipeline on CPU in about a minute or two (width 0.125, 512 training images, 2 epochs of
batch 64, PGD-2 training attack, 64 test images, the ``quick`` suite with the checks); results go to
``<runs-dir>/results/`` only, never to the study's ``results/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
AT_CONFIG = REPO / "recipes/configs/cifar10_resnet18_at.yaml"
CONFIGS = {"at": AT_CONFIG, "at_cas": REPO / "recipes/configs/cifar10_resnet18_at_cas.yaml",
           "at_pgd3": AT_CONFIG, "at_n_fgsm": AT_CONFIG, "at_fgsm_rs": AT_CONFIG}
# what each arm changes in its recipe (after --smoke's settings, before --set); the single-step attacks take their
# paper's step (attack_alpha null) and one step
ARM_OVERRIDES = {"at": [], "at_cas": [],
                 "at_pgd3": ["train.attack=pgd", "train.attack_steps=3", f"train.attack_alpha={2.5 * 8 / 255 / 3}"],
                 "at_n_fgsm": ["train.attack=n_fgsm", "train.attack_steps=1", "train.attack_alpha=null"],
                 "at_fgsm_rs": ["train.attack=fgsm_rs", "train.attack_steps=1", "train.attack_alpha=null"]}
ARMS = tuple(CONFIGS)
DEFAULT_ARMS = ("at", "at_cas")
SINGLE_STEP_ARMS = ("at_n_fgsm", "at_fgsm_rs")
SINGLE_STEP_REFERENCE = "at_pgd3"
LABEL = {"at": "AT", "at_cas": "AT+CAS", "at_pgd3": "PGD-3 AT", "at_n_fgsm": "N-FGSM AT", "at_fgsm_rs": "FGSM-RS AT"}
STATE = "state.json"


# -- settings ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10/train.npz",
                   help="training .npz (its last 10 %% is the held-out selection split)")
    p.add_argument("--test", default="../shared/data/cifar10/test846.npz", help="test .npz (never used for selection)")
    p.add_argument("--runs-dir", default="runs/gpu", help="run folders + state.json live here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS),
                   help="which arms to train and score (default: at at_cas; single-step: at_pgd3 at_n_fgsm at_fgsm_rs)")
    p.add_argument("--epochs", type=float, default=None, help="default 30 (smoke: 2)")
    p.add_argument("--schedule", choices=("multistep", "cosine"), default="multistep",
                   help="multistep: lr /10 at 0.75 and 0.90 of the epochs (the paper's 75/90 of 100, scaled)")
    p.add_argument("--select", choices=("best", "final"), default="best",
                   help="score the checkpoint selected on the held-out split (best) or the last epoch's (final)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="stop cleanly after this much wall clock (resume with the same command)")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0, help="also checkpoint every N minutes of training")
    p.add_argument("--compile", action="store_true", help="torch.compile the update and attack forwards")
    p.add_argument("--autoattack", action="store_true", help="add AutoAttack to the scoring (needs the package)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 512 on CUDA, 128 on CPU")
    p.add_argument("--max-test", type=int, default=None, help="score only the first N test images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe-style override for both arms, e.g. --set model.kwargs.width=0.5 --set train.lr=0.05")
    p.add_argument("--results-dir", default=None,
                   help="default studies/reproduce_gpu/results (full runs); smoke runs always write <runs-dir>/results")
    p.add_argument("--device", default=None, help="default cuda if available (smoke: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (smoke default 1)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline (tests resume too)")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with status 3 while work remains (for `until python ...; do :; done` loops)")
    return p.parse_args(argv)


def settings_of(args) -> dict:
    """What decides the results (a runs dir holds one setting; seeds may be added)."""
    settings = {"data": os.path.abspath(args.data), "test": os.path.abspath(args.test), "epochs": args.epochs,
                "schedule": args.schedule, "select": args.select, "compile": bool(args.compile),
                "autoattack": bool(args.autoattack), "max_test": args.max_test, "set": list(args.set),
                "smoke": bool(args.smoke)}
    if tuple(args.arms) != DEFAULT_ARMS:  # recorded only when not the default: runs dirs written before --arms match
        settings["arms"] = list(args.arms)
    return settings


def arm_config(args, arm: str, seed: int, device: str):
    """The arm's recipe (a typed :class:`casify.recipe.Recipe`) with this run's seed, schedule and data."""
    from casify.recipe import CommandLine, load_recipe
    overrides = [f"train.seed={seed}", f"train.epochs={args.epochs}", f"train.schedule={args.schedule}",
                 f"data.name={args.data}", f"data.test={args.test}", "train.progress=false",
                 f"train.compile={'true' if args.compile else 'false'}"]
    if args.schedule == "multistep":
        overrides.append(f"train.milestones=[{0.75 * args.epochs}, {0.90 * args.epochs}]")
    cuda = device.startswith("cuda")
    overrides += [f"train.mixed_precision={'bf16' if cuda else 'no'}", "train.channels_last=true"]
    if args.smoke:
        overrides += ["model.kwargs.width=0.125", "train.batch_size=64", "train.attack_steps=2",
                      "train.attack_alpha=4/255", "train.val_max_examples=64", "train.val_attack_steps=2"]
    overrides += ARM_OVERRIDES[arm]
    overrides += list(args.set)
    return load_recipe(str(CONFIGS[arm]), CommandLine(overrides=overrides, method="at"))


# -- state ------------------------------------------------------------------------------------------------------------
def load_state(runs_dir: Path, settings: dict) -> dict:
    path = runs_dir / STATE
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("settings") != settings:
            old = state.get("settings", {})
            diff = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)]
            raise SystemExit(f"{runs_dir} holds runs with other settings ({'; '.join(diff)}); use another --runs-dir "
                             f"or the same settings")
        return state
    return {"settings": settings, "runs": {}, "invocations": []}


def save_state(runs_dir: Path, state: dict) -> None:
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = runs_dir / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, runs_dir / STATE)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


def plan(args) -> list:
    """The units of work in order: (kind, arm, seed)."""
    units = []
    for seed in args.seeds:
        units += [("train", arm, seed) for arm in args.arms]
        units += [("score", arm, seed) for arm in args.arms]
    return units


def done(state: dict, unit) -> bool:
    kind, arm, seed = unit
    run = state["runs"].get(f"{arm}/s{seed}", {})
    return bool(run.get("trained" if kind == "train" else "scored"))


# -- training ---------------------------------------------------------------------------------------------------------
class BudgetCallback:
    """Stops the Trainer once the invocation's deadline passes (it then checkpoints), and checkpoints every
    ``every`` seconds of training so that a killed command loses little."""

    def __init__(self, deadline, every: float):
        self.deadline, self.every, self.last = deadline, every, time.monotonic()
        self.stopped_by_budget = False

    def __call__(self, trainer) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            trainer.stop = True
            self.stopped_by_budget = True
            return
        if now - self.last >= self.every:
            trainer.save_checkpoint()
            self.last = now


def train_unit(args, state, arm: str, seed: int, device: str, deadline, runs_dir: Path) -> None:
    from accelerate.utils import set_seed
    from torch.utils.data import Subset

    from casify.recipe import build_datasets, build_model
    from casify.train import Trainer

    key = f"{arm}/s{seed}"
    run = state["runs"].setdefault(key, {"arm": arm, "seed": seed, "trained": False, "scored": False,
                                         "train_seconds": 0.0, "train_invocations": 0, "train_devices": []})
    recipe = arm_config(args, arm, seed, device)
    out = runs_dir / f"{arm}_s{seed}"
    tcfg = dataclasses.replace(recipe.train, output_dir=str(out), checkpoint_every_steps=None)
    set_seed(tcfg.seed)  # before the model is built: the paper init and CAS heads are the seed's
    model = build_model(recipe.model, recipe.defense)
    train_set, val_set, _ = build_datasets(recipe.data)
    if args.smoke:
        train_set = Subset(train_set, range(512))
    identity = {**recipe.identity(), "smoke_train_subset": args.smoke}
    callback = BudgetCallback(deadline, 60 * args.checkpoint_minutes)
    trainer = Trainer(model, train_set, val_set, tcfg, identity=identity, callbacks=[callback])
    # fallback checkpoints about every epoch as well (not part of the run's identity)
    trainer.config.checkpoint_every_steps = max(1, trainer.steps_per_epoch)
    start_step = 0
    latest = trainer.latest_checkpoint()
    if latest is not None:
        start_step = int(json.loads((latest / "trainer_state.json").read_text())["global_step"])
    print(f"[train] {LABEL[arm]} seed {seed}: {trainer.total_steps} steps "
          f"({trainer.steps_per_epoch}/epoch, {args.epochs:g} epochs), resuming at step {start_step}", flush=True)
    t0 = time.perf_counter()
    result = trainer.train(resume=True)
    seconds = time.perf_counter() - t0
    steps_done = result.global_step - start_step
    run["train_seconds"] = run.get("train_seconds", 0.0) + seconds
    run["train_invocations"] = run.get("train_invocations", 0) + 1
    name = device_name(device)
    if name not in run["train_devices"]:
        run["train_devices"].append(name)
    run.update(steps=result.global_step, total_steps=trainer.total_steps, best_step=result.best_step,
               steps_per_epoch=trainer.steps_per_epoch, output_dir=str(out), validation=result.history,
               global_batch_size=trainer.global_batch_size, overfitting=result.overfitting,
               training_attack=trainer.attack.to_dict() if trainer.attack is not None else None)
    if steps_done > 0:
        run.setdefault("throughput", []).append(
            {"device": name, "steps": steps_done, "seconds": round(seconds, 2),
             "images_per_second": round(steps_done * trainer.global_batch_size / seconds, 1)})
    run["trained"] = result.global_step >= trainer.total_steps
    print(f"[train] {LABEL[arm]} seed {seed}: step {result.global_step}/{trainer.total_steps} after "
          f"{seconds / 60:.2f} min ({steps_done} steps this invocation)"
          + (" -- complete" if run["trained"] else " -- stopped by the budget, checkpoint written"), flush=True)
    del trainer, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- scoring ----------------------------------------------------------------------------------------------------------
def score_unit(args, state, arm: str, seed: int, device: str, runs_dir: Path) -> None:
    from casify.data import build_dataset
    from casify.evaluate import evaluate
    from casify.model.loading import from_pretrained

    key = f"{arm}/s{seed}"
    run = state["runs"][key]
    out = Path(run["output_dir"])
    folder = out / args.select
    if not folder.exists():  # "best" exists whenever validation ran; fall back explicitly and say so
        folder = out / "final"
    model = from_pretrained(folder).to(device).eval()
    test = build_dataset(args.test, "test")
    n = len(test) if args.max_test is None else min(args.max_test, len(test))
    suite = "quick" if args.smoke else "standard"
    autoattack = False
    if args.autoattack:
        import importlib.util
        autoattack = importlib.util.find_spec("autoattack") is not None
        if not autoattack:
            run["autoattack"] = "skipped: the autoattack package is not installed"
    batch = args.eval_batch_size or (512 if device.startswith("cuda") else 128)
    print(f"[score] {LABEL[arm]} seed {seed}: {folder.name} model, {n} test images, suite {suite}, checks on",
          flush=True)
    t0 = time.perf_counter()
    report = evaluate(model, test, attacks=suite, eps=8 / 255, checks=True, max_examples=n, seed=0,
                      batch_size=batch, device=device, progress=False, autoattack=autoattack)
    seconds = time.perf_counter() - t0
    report.save(out / "eval")
    summary = report.summary()
    run.update(scored=True, score_seconds=round(seconds, 1), score_device=device_name(device),
               scored_model=folder.name, summary=summary,
               per_example={"natural": [bool(v) for v in report.per_example["natural"]],
                            "worst_case": [bool(v) for v in report.per_example["worst_case"]]})
    acc = summary["accuracy"]
    print(f"[score] {LABEL[arm]} seed {seed}: natural {100 * acc['natural']:.2f} %, worst case "
          f"{100 * acc['worst_case']:.2f} % ({seconds / 60:.2f} min); gradient masking suspected: "
          f"{summary['gradient_masking_suspected']}", flush=True)


# -- results ----------------------------------------------------------------------------------------------------------
def paired(a: list, b: list) -> dict:
    """B vs A on the same examples (A: the reference arm, under the keys *_at; B: the compared arm, *_at_cas, the
    names of the first comparison): difference of accuracies (B - A), 95 % CI (paired normal approximation) and
    McNemar's z (discordant pairs only, no continuity correction; with it in ``mcnemar_z_cc``)."""
    n = len(a)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)   # B right, A wrong
    only_a = sum(1 for x, y in zip(a, b) if x and not y)   # A right, B wrong
    diff = (only_b - only_a) / n if n else 0.0
    var = (only_a + only_b - (only_b - only_a) ** 2 / n) / n ** 2 if n else 0.0
    se = math.sqrt(max(var, 0.0))
    disc = only_a + only_b
    z = (only_b - only_a) / math.sqrt(disc) if disc else 0.0
    z_cc = (abs(only_b - only_a) - 1) / math.sqrt(disc) * (1 if only_b >= only_a else -1) if disc else 0.0
    return {"n": n, "acc_at": sum(a) / n if n else None, "acc_at_cas": sum(b) / n if n else None,
            "difference": diff, "ci95": [diff - 1.96 * se, diff + 1.96 * se], "se": se,
            "at_cas_only_correct": only_b, "at_only_correct": only_a, "mcnemar_z": z, "mcnemar_z_cc": z_cc}


def build_results(args, state: dict) -> dict:
    runs = {}
    for key, run in sorted(state["runs"].items()):
        s = run["summary"]
        runs[key] = {"arm": LABEL[run["arm"]], "seed": run["seed"], "natural": s["accuracy"]["natural"],
                     "worst_case": s["accuracy"]["worst_case"], "families": s["accuracy"], "rows": s["rows"],
                     "upper_bounds": s["upper_bounds"], "n": s["n"], "suite": s["suite"], "mode": s["mode"],
                     "gradient_masking_suspected": s["gradient_masking_suspected"],
                     "failed_checks": s["failed_checks"], "scored_model": run["scored_model"],
                     "best_step": run.get("best_step"), "steps": run.get("steps"),
                     "train_minutes": round(run["train_seconds"] / 60, 2),
                     "train_invocations": run.get("train_invocations"), "train_devices": run.get("train_devices"),
                     "throughput": run.get("throughput"), "score_minutes": round(run["score_seconds"] / 60, 2),
                     "score_device": run.get("score_device"), "autoattack": run.get("autoattack"),
                     "overfitting": run.get("overfitting")}
    comparison = {}
    if "at" in args.arms and "at_cas" in args.arms:
        comparison = compare_arms(args, state, "at", "at_cas")
    single_step = {}
    if SINGLE_STEP_REFERENCE in args.arms:
        for arm in SINGLE_STEP_ARMS:
            if arm in args.arms:
                single_step[arm] = {**compare_arms(args, state, SINGLE_STEP_REFERENCE, arm),
                                    "train_time_ratio": train_time_ratios(args, state, SINGLE_STEP_REFERENCE, arm)}
    return {"benchmark": f"reproduce_gpu: {', '.join(LABEL[a] for a in args.arms)}, CIFAR-10 cifar_resnet18 (full "
                         "width unless overridden)",
            "settings": state["settings"], "seeds": args.seeds, "arms": list(args.arms),
            "schedule": schedule_text(args), "protocol": protocol_text(args),
            "devices": sorted({i["device"] for i in state["invocations"]}),
            "versions": versions(), "runs": runs, "comparison": comparison,
            "single_step_vs_pgd3": single_step,
            "notes": ["CI: paired normal approximation over test images (sampling of the test set only; seed-to-seed "
                      "variation is in seed_sd_difference when several seeds ran).",
                      "McNemar z = (c - b) / sqrt(b + c), b / c = images only the reference / only the arm gets "
                      "right; |z| > 1.96 ~ p < 0.05 two-sided.",
                      "Worst case: per image, correct under every attack of the suite (casify's cascade).",
                      "Train time ratio: the arm's training minutes over PGD-3 AT's, same seed (compare only runs "
                      "trained on the same device; train_devices says which)."]}


def train_time_ratios(args, state: dict, reference: str, arm: str) -> dict:
    """Per seed, the arm's training seconds over the reference's."""
    out = {}
    for seed in args.seeds:
        ref = state["runs"][f"{reference}/s{seed}"]["train_seconds"]
        out[f"s{seed}"] = state["runs"][f"{arm}/s{seed}"]["train_seconds"] / ref if ref else None
    return out


def compare_arms(args, state: dict, reference: str, arm: str) -> dict:
    """``arm`` vs ``reference`` on the same test images, per seed (and pooled, with the seeds' spread)."""
    comparison = {}
    for metric in ("natural", "worst_case"):
        per_seed, pool_a, pool_b = {}, [], []
        for seed in args.seeds:
            a = state["runs"][f"{reference}/s{seed}"]["per_example"][metric]
            b = state["runs"][f"{arm}/s{seed}"]["per_example"][metric]
            per_seed[f"s{seed}"] = paired(a, b)
            pool_a += a
            pool_b += b
        entry = {"per_seed": per_seed}
        if len(args.seeds) > 1:
            entry["pooled"] = paired(pool_a, pool_b)
            diffs = [v["difference"] for v in per_seed.values()]
            mean = sum(diffs) / len(diffs)
            entry["seed_mean_difference"] = mean
            entry["seed_sd_difference"] = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        comparison[metric] = entry
    return comparison


def versions() -> dict:
    import casify
    return {"torch": torch.__version__, "casify": casify.__version__, "python": platform.python_version()}


def schedule_text(args) -> str:
    if args.schedule == "multistep":
        return (f"{args.epochs:g} epochs, lr 0.1 /10 at epochs {0.75 * args.epochs:g} and {0.90 * args.epochs:g} "
                f"(the paper's 75/90 of 100, scaled to the same fractions)")
    return f"{args.epochs:g} epochs, cosine decay of lr 0.1 to 0"


def protocol_text(args) -> str:
    if args.smoke:
        return ("SMOKE: width 0.125, 512 training images, batch 64, PGD-2 training attack, quick suite, "
                "CPU: tests the pipeline, the numbers mean nothing")
    return ("recipes/configs/cifar10_resnet18_at{,_cas}.yaml: SGD 0.9, lr 0.1, wd 2e-4, batch 128, PGD-10 eps 8/255 "
            "step 2/255 (adaptive CE + 2 * mean aux CE for AT+CAS; the single-step arms: the AT recipe with PGD-3 "
            "(step 2.5 eps / 3), N-FGSM or FGSM-RS), bf16 + channels_last on CUDA; selection on the "
            "last 5,000 training images (PGD-10 on 1,000); scored with evaluate(attacks='standard', eps=8/255, "
            "checks=True), default cascade")


def write_results(args, state: dict, results_dir: Path) -> Path:
    res = build_results(args, state)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "reproduce_gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# {' vs '.join(LABEL[a] for a in args.arms)}, CIFAR-10 ResNet-18 (reproduce_gpu.py)", "",
             f"Schedule: {res['schedule']}.  ", f"Protocol: {res['protocol']}.  ",
             f"Devices: {', '.join(res['devices'])}. Versions: {res['versions']}.", "",
             "| run | natural | worst case | families | scored | train min | device | masking suspected |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        fam = ", ".join(f"{k} {pct(v)}" for k, v in r["families"].items() if k not in ("natural", "worst_case"))
        lines.append(f"| {key} | {pct(r['natural'])} | **{pct(r['worst_case'])}** | {fam} | {r['scored_model']} "
                     f"(step {r['best_step'] if r['scored_model'] == 'best' else r['steps']}) | {r['train_minutes']} | "
                     f"{', '.join(r['train_devices'] or [])} | {r['gradient_masking_suspected']} |")
    lines += ["", "Families marked as upper bounds (rows that ran only on the cascade's survivors): "
              + "; ".join(f"{k}: {r['upper_bounds']}" for k, r in res["runs"].items()), "",
              ]
    tables = ([("AT", "AT+CAS", res["comparison"])] if res["comparison"] else []) + [
        (LABEL[SINGLE_STEP_REFERENCE], LABEL[arm], entry) for arm, entry in res["single_step_vs_pgd3"].items()]
    for ref_label, arm_label, comparison in tables:
        lines += [f"## Paired comparison {arm_label} - {ref_label} (same test images)", "",
                  f"| metric | seed | {ref_label} | {arm_label} | difference | 95 % CI | only {ref_label} / only "
                  f"{arm_label} | McNemar z |", "|---|---|---|---|---|---|---|---|"]
        for metric in ("natural", "worst_case"):
            entry = comparison[metric]
            items = list(entry["per_seed"].items()) + ([("pooled", entry["pooled"])] if "pooled" in entry else [])
            for seed, p in items:
                lines.append(f"| {metric} | {seed} | {pct(p['acc_at'])} | {pct(p['acc_at_cas'])} | "
                             f"{100 * p['difference']:+.2f} | [{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}] | "
                             f"{p['at_only_correct']} / {p['at_cas_only_correct']} | {p['mcnemar_z']:+.2f} |")
            if "seed_sd_difference" in entry:
                lines.append(f"| {metric} | mean over seeds | | | {100 * entry['seed_mean_difference']:+.2f} "
                             f"(sd {100 * entry['seed_sd_difference']:.2f}) | | | |")
        if "train_time_ratio" in comparison:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in comparison["train_time_ratio"].items() if v is not None)
            lines += ["", f"Training time of {arm_label} over {ref_label}: {ratios}."]
        lines.append("")
    overfit = [f"{k}: {r['overfitting'].get('rule', '')} at step {r['overfitting'].get('step')}"
               for k, r in res["runs"].items() if r.get("overfitting")]
    lines += ["Catastrophic overfitting (casify.train.overfit_guard): " + ("; ".join(overfit) if overfit else
                                                                          "not detected in any run")]
    lines += [""] + [f"- {n}" for n in res["notes"]]
    lines += ["", "The paper (Table 5, last epoch of 100, its own PGD-20 / CW): AT 84.27 natural / 46.50 PGD-20, "
              "AT+CAS 86.79 / 48.88; casify's worst case is over a stronger, adaptive suite, so it is expected lower "
              "than the paper's PGD-20."]
    (results_dir / "reproduce_gpu.md").write_text("\n".join(lines) + "\n")
    return results_dir / "reproduce_gpu.json"


def estimate_left(state: dict, remaining: list, device: str):
    """Training minutes left at the throughput measured on this device (scoring not included), or None."""
    rates = [t["images_per_second"] for r in state["runs"].values() for t in r.get("throughput", [])
             if t["device"] == device and t["steps"] >= 5]
    totals = [(r["total_steps"], r["global_batch_size"]) for r in state["runs"].values() if r.get("total_steps")]
    if not rates or not totals:
        return None
    total_steps, batch = totals[0]
    images = 0
    for kind, arm, seed in remaining:
        if kind == "train":
            run = state["runs"].get(f"{arm}/s{seed}", {})
            images += (total_steps - run.get("steps", 0)) * batch
    rate = sorted(rates)[len(rates) // 2]
    scored = [r["score_seconds"] for r in state["runs"].values() if r.get("scored")]
    n_score = sum(1 for kind, _, _ in remaining if kind == "score")
    score = f", scoring ~{n_score * max(scored) / 60:.1f} min" if scored and n_score else ""
    return (f"training ~{images / rate / 60:.1f} min left at the {rate:.0f} images/s measured on {device} "
            f"(median over invocations; plus ~0.5 min start-up per invocation){score}")


# -- main -------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    if args.epochs is None:
        args.epochs = 2.0 if args.smoke else 30.0
    if args.smoke:
        args.device = args.device or "cpu"
        args.threads = args.threads or 1
        args.max_test = args.max_test or 64
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and not device.startswith("cuda"):
        print("warning: full-scale run without CUDA (hours per epoch on a CPU); use --smoke to test the pipeline",
              file=sys.stderr)
    if args.smoke:
        for path in (args.data, args.test):
            if not Path(path).exists():
                raise SystemExit(f"no data at {path}")
    runs_dir = Path(args.runs_dir)
    results_dir = runs_dir / "results" if args.smoke else Path(args.results_dir or RESULTS)
    settings = settings_of(args)
    state = load_state(runs_dir, settings)
    deadline = t_start + 60 * args.budget_minutes if args.budget_minutes else None
    name = device_name(device)
    invocation = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": name,
                  "budget_minutes": args.budget_minutes, "units": []}
    state["invocations"].append(invocation)
    save_state(runs_dir, state)
    print(f"reproduce_gpu: {'SMOKE ' if args.smoke else ''}{schedule_text(args)}; device {name}; runs dir {runs_dir}",
          flush=True)

    units = plan(args)
    worked = 0
    for unit in units:
        if done(state, unit):
            continue
        kind, arm, seed = unit
        left = None if deadline is None else deadline - time.monotonic()
        if kind == "train":
            if worked and left is not None and left < max(30.0, 0.1 * 60 * args.budget_minutes):
                break  # too little left to be worth the setup; the next invocation starts it
            train_unit(args, state, arm, seed, device, deadline, runs_dir)
            invocation["units"].append(f"train {arm}/s{seed}")
            worked += 1
            save_state(runs_dir, state)
            if not state["runs"][f"{arm}/s{seed}"]["trained"]:
                break  # stopped by the budget
        else:
            known = [r["score_seconds"] for r in state["runs"].values() if r.get("scored")]
            predicted = 1.2 * max(known) if known else None
            if worked and left is not None and (predicted is None or predicted > left):
                break  # a scoring pass cannot be split: run it first thing in the next invocation
            score_unit(args, state, arm, seed, device, runs_dir)
            invocation["units"].append(f"score {arm}/s{seed}")
            worked += 1
            save_state(runs_dir, state)
    invocation["seconds"] = round(time.monotonic() - t_start, 1)
    remaining = [u for u in units if not done(state, u)]
    if not remaining:
        path = write_results(args, state, results_dir)
        state["results"] = str(path)
        invocation["results"] = str(path)
    save_state(runs_dir, state)

    command = "python -m studies.reproduce_gpu.study " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    print(f"\n== this invocation: {invocation['seconds'] / 60:.2f} min, did {invocation['units'] or 'nothing'}")
    if remaining:
        parts = []
        for kind, arm, seed in remaining:
            run = state["runs"].get(f"{arm}/s{seed}", {})
            extra = (f" (step {run['steps']}/{run['total_steps']})" if kind == "train" and run.get("total_steps")
                     else "")
            parts.append(f"{kind} {LABEL[arm]} seed {seed}{extra}")
        print("== remaining: " + "; ".join(parts))
        eta = estimate_left(state, remaining, name)
        if eta:
            print(f"== estimate: {eta}")
        print(f"== continue with the same command:\n{command}")
        return 3 if args.exit_code else 0
    print(f"== all done: results in {results_dir / 'reproduce_gpu.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
