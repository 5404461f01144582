"""Issue 18, part 5(a): a standard-trained (non-robust) CIFAR-10 model made robust by AT fine-tuning, with and without
CAS at its last stage. Does CAS help in the mission's common case?

The base is ``standard_base.py``'s (beside this script) (cifar_resnet18 width 1/8, pooled linear head, natural training on the
45,000 training images; its SHA-256 is in ``results/standard_base.json`` and is checked before every run). Arms:

- ``at``: ``casify.wrap(base, [])`` fine-tuned with PGD-AT;
- ``at_cas``: CAS after ``layer4.0`` and ``layer4.1`` (``init="identity"``: at step 0 the wrapped model computes the
  base's function), AT + beta 2 x mean auxiliary CE, the paper's label routing (the study's protocol as it is);
- ``at_cas_warmup``: the same, after a warm-up of the auxiliary heads alone (backbone frozen, its batch-norm statistics
  held, ``suppress=False``: heads and their loss, no mask) for WARMUP_STEPS steps;
- ``at_cas_beta0.5``: beta 0.5;
- ``at_cas_headlr``: the CAS heads' parameters' whole gradient scaled by a tenth (their own loss and the main loss
  through the mask: in effect a tenth of the learning rate for the heads; weight decay unscaled) - gradient hooks,
  since the Trainer builds one optimizer for the whole model;
- ``at_cas_predicted``: label-free routing in training (each module routes by its own prediction, as at test time).

Protocol (FINE_TUNING, fixed before the first run and written to ``results/retrofit_standard.json`` with the rule):
seed 0 of every arm is trained first; the CAS variant with the highest held-out robust accuracy (the trainer's
PGD-10 on 500 held-out training images, the metric that also selects each run's checkpoint) is confirmed against
``at`` with seeds 1 and 2, and only those two arms are scored on test846 (the test set is read once per confirmed
run). The verdict is :data:`casify.evaluate.compare.SEED_RULE` on the per-example worst case over
``paper_claims.attack_list`` (the claims study's union, adaptive rows for CAS models) at eps 8/255 in pixel space.

"Train until the held-out curve has peaked": the rate drops tenfold at half an epoch; after the drop a run stops when
two validations in a row are below its best, and at most 1.25 epochs (439 steps) are run. A run that reaches the cap
with its best at the last step is reported as "selected at its last step" (not extended further: budget). This stop
replaces the base's rule ("a run selected at its last step is extended"); it was fixed before the first fine-tuning run,
and no run was selected at its last step (AT seed 2 reached the cap with its best earlier; every other run stopped
after its peak: ``retrofit_standard.json``).

    OMP_NUM_THREADS=1 python -m studies.retrofit_standard.study --work --data-dir ../shared/data/cifar10 \
        --base outputs/standard_base --runs-dir outputs/retrofit_standard      # one or two workers
    python -m studies.retrofit_standard.study --report --data-dir ../shared/data/cifar10 --runs-dir outputs/retrofit_standard

Workers share the run list through atomic claims (a killed worker's claim is taken over) and every run resumes from
its checkpoints; ``--report`` writes ``results/retrofit_standard.{json,png}`` and the study's README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from casify.train.schedule import first_step_of_epoch
from studies import _protocol as protocol
from studies._records import read_json, sha256, write_json
from studies._report import pct
from studies.cas_study import study as cas_study  # the union's record, the echo settings, the report's helpers
from studies.paper_claims import study as claims  # the scoring union
from studies.retrofit_standard import standard_base  # the base's protocol and record

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 8 / 255
CAS_LAYERS = ["layer4.0", "layer4.1"]
FINE_TUNING = {"train_images": [0, 45000], "checkpoint_selection": "PGD-10 robust accuracy on held-out training "
               "images 45000-45500, every 40 steps", "batch_size": 128, "lr": 0.05, "schedule": "multistep",
               "milestones_epochs": [0.5], "gamma": 0.1, "max_epochs": 1.25, "val_every_steps": 40,
               "early_stop": "after the rate drop, two validations in a row below the run's best",
               "momentum": 0.9, "weight_decay": 5e-4, "eps": "8/255", "attack_steps": 3, "attack_alpha": "2.5 * eps / 3",
               "loss_defaults": "authors (as the claims protocol)", "threads": 1}
WARMUP_STEPS = 40
# name: (beta, train routing, warm-up, head gradient scale); None = the plain-AT arm
ARMS = {"at": None, "at_cas": (2.0, "label", False, 1.0), "at_cas_warmup": (2.0, "label", True, 1.0),
        "at_cas_beta0.5": (0.5, "label", False, 1.0), "at_cas_headlr": (2.0, "label", False, 0.1),
        "at_cas_predicted": (2.0, "predicted", False, 1.0)}
VARIANTS = [a for a in ARMS if a != "at"]
CONFIRM_SEEDS = (0, 1, 2)


def rule() -> dict:
    from casify.evaluate.compare import SEED_RULE
    return {"question": standard_base.FINE_TUNING_RULE["question"], "fine_tuning": FINE_TUNING,
            "warmup_steps": WARMUP_STEPS, "arms": {k: (None if v is None else {
                "beta": v[0], "train_routing": v[1], "warmup": v[2], "head_gradient_scale": v[3]})
                for k, v in ARMS.items()},
            "variant_choice": "seed 0 of every arm; the CAS variant with the highest held-out best PGD-10 accuracy "
                              "(the trainer's selection metric: PGD-10 on the CAS objective with the arm's own beta, the model routed "
                              "by its prediction; not the adaptive union, which decides the verdict) is confirmed; the "
                              "test set is not read for the choice",
            "verdict": SEED_RULE, "metric": "per-example worst case over paper_claims.attack_list (adaptive rows for "
                                            "CAS), test846, eps 8/255",
            "amended_from_standard_base_json": "the base's rule named the variants; the warm-up length, the head "
                                               "rate (a gradient scale), the budget and the held-out metric were "
                                               "fixed here, before the first fine-tuning run"}


def run_dir(args, arm: str, seed: int) -> Path:
    return Path(args.runs_dir) / f"{arm}_s{seed}"


def base_record() -> dict:
    base = json.loads((RESULTS / "standard_base.json").read_text()).get("base")
    if not base or not base.get("complete"):
        raise SystemExit("the standard base is not recorded as complete in results/standard_base.json: run "
                         "python -m studies.retrofit_standard.standard_base first")
    return base


def load_base(args):
    """The base's bare timm network with the recorded weights (the SHA-256 must match the committed record)."""
    import timm

    import casify
    folder = Path(args.base) / base_record()["selected"]
    sha = sha256(folder / "model.safetensors")
    if sha != base_record()["sha256"]:
        raise SystemExit(f"{folder}/model.safetensors has SHA-256 {sha[:16]}..., not the recorded base's "
                         f"{base_record()['sha256'][:16]}...: retrain it with python -m studies.retrofit_standard.standard_base")
    p = standard_base.PROTOCOL
    net = timm.create_model(p["model"], num_classes=p["num_classes"], width=p["width"])
    # not casify.unwrap(casify.from_pretrained(folder)), which builds one network fewer: the random draws of both
    # builds precede the CAS heads' initialisation, so this order is part of what the committed runs' seeds reproduce
    net.load_state_dict(casify.from_pretrained(folder).state_dict())
    return net


def new_model(args, arm: str, seed: int, suppress: bool = True):
    import casify
    torch.manual_seed(seed)
    net = load_base(args)
    if ARMS[arm] is None:
        return casify.wrap(net, [], normalize=None, input_size=(3, 32, 32))
    return casify.wrap(net, CAS_LAYERS, init="identity", suppress=suppress, normalize=None, input_size=(3, 32, 32))


def config(arm: str, seed: int, out: Path, warmup: bool = False):
    from casify.train import TrainConfig
    beta, routing = (2.0, "label") if ARMS[arm] is None else ARMS[arm][:2]
    steps = FINE_TUNING["attack_steps"]
    return TrainConfig(method="at", cas=ARMS[arm] is not None, beta=beta,
                       loss_kwargs={} if routing == "label" else {"train_routing": routing},
                       epochs=FINE_TUNING["max_epochs"], max_steps=WARMUP_STEPS if warmup else None,
                       batch_size=FINE_TUNING["batch_size"], lr=FINE_TUNING["lr"],
                       schedule="constant" if warmup else "multistep",
                       milestones=tuple(FINE_TUNING["milestones_epochs"]), gamma=FINE_TUNING["gamma"],
                       momentum=FINE_TUNING["momentum"], weight_decay=FINE_TUNING["weight_decay"], eps=EPS,
                       attack_steps=steps, attack_alpha=2.5 * EPS / steps, defaults="authors", seed=seed,
                       val_max_examples=500, val_every_steps=FINE_TUNING["val_every_steps"], val_attack_steps=10,
                       checkpoint_every_steps=40, progress=False, output_dir=str(out))


def stop_after_peak(trainer) -> None:
    """Early stop (a Trainer callback): after the rate drop, two validations in a row below the run's best. The history
    only grows at validations, so the condition first holds at one; a run killed between that stop and its record
    stops again one step after it resumes (no validation in between: the selected model is the same)."""
    drop = first_step_of_epoch(FINE_TUNING["milestones_epochs"][0], trainer.steps_per_epoch)
    after = [h for h in trainer.state.history if h["step"] > drop]
    if len(after) >= 2 and all(h["val_pgd"] < trainer.state.best_metric for h in after[-2:]):
        trainer.stop = True


def scale_head_gradients(model, scale: float) -> None:
    for param in model.cas_modules.parameters():
        param.register_hook(lambda grad: grad * scale)


def warm_up(args, arm: str, seed: int, train_set, val_set):
    """The auxiliary heads alone: backbone frozen (weights and batch-norm statistics), no mask; returns the state."""
    from casify.train import Trainer
    out = run_dir(args, arm, seed) / "warmup"
    model = new_model(args, arm, seed, suppress=False)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("cas_modules.")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not name.startswith("cas_modules"):
            module.momentum = 0.0  # train-mode forwards leave the running statistics as they are
    trainer = Trainer(model, train_set, val_set, config(arm, seed, out, warmup=True),
                      identity={"study": "retrofit_standard", "arm": arm, "stage": "warmup",
                                "base_sha256": base_record()["sha256"]})
    trainer.train(resume=True)
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def train_one(args, arm: str, seed: int, train_set, val_set) -> None:
    from casify.train import Trainer
    out = run_dir(args, arm, seed)
    if (out / "train_record.json").exists():
        return
    start = time.time()
    model = new_model(args, arm, seed)
    if ARMS[arm] is not None and ARMS[arm][2]:
        model.load_state_dict(warm_up(args, arm, seed, train_set, val_set))
    if ARMS[arm] is not None and ARMS[arm][3] != 1.0:
        scale_head_gradients(model, ARMS[arm][3])
    cfg = config(arm, seed, out)
    trainer = Trainer(model, train_set, val_set, cfg, callbacks=[stop_after_peak],
                      identity={"study": "retrofit_standard", "arm": arm, "base_sha256": base_record()["sha256"]})
    state, seconds = claims.train_timed(trainer, out, f"{arm} s{seed}")
    folder = out / "best"
    write_json(out / "train_record.json", {
        "arm": arm, "seed": seed, "seconds": round(seconds, 1), "this_session_seconds": round(time.time() - start, 1),
        "steps": state.global_step, "cap": trainer.total_steps, "stopped_after_peak": trainer.stop,
        "best_step": state.best_step, "best_val_pgd": state.best_metric, "history": state.history,
        "selected_at_last_step": state.best_step == state.global_step, "model_sha256": sha256(
            folder / "model.safetensors"), "config": cfg.to_dict(), "torch": torch.__version__,
        "machine": platform.machine()})
    print(f"[train] {arm} s{seed}: {seconds:.0f}s, {state.global_step} steps, best {state.best_step} "
          f"({state.best_metric:.3f})", flush=True)


def chosen_variant(args):
    """The CAS variant confirmed with 3 seeds (highest held-out best), or None while a seed-0 run is missing."""
    best = {}
    for arm in VARIANTS:
        rec = read_json(run_dir(args, arm, 0) / "train_record.json")
        if rec is None:
            return None
        best[arm] = rec["best_val_pgd"]
    return max(VARIANTS, key=lambda a: (best[a], -VARIANTS.index(a)))


def score_one(args, arm: str, seed: int) -> None:
    from casify.data import NpzDataset
    from casify.evaluate import routing_echo
    out = run_dir(args, arm, seed)
    folder = out / "best"
    model = claims.load_model(folder)
    sha = sha256(folder / "model.safetensors")
    test = NpzDataset(Path(args.data_dir) / "test846.npz")
    cas = ARMS[arm] is not None
    if not (out / "score.json").exists():
        write_json(out / "score.json", cas_study.union_record(arm, seed, model, test, cas, sha))
    if cas and not (out / "echo.json").exists():
        start = time.time()
        echo = routing_echo(model, test, eps=EPS, steps=cas_study.ECHO["steps"], beta=ARMS[arm][0],
                            max_examples=cas_study.ECHO["max_examples"], seed=0)
        write_json(out / "echo.json", {**echo.to_dict(), "model_sha256": sha,
                                       "seconds": round(time.time() - start, 1)})


def jobs(args):
    """The work in order: seed 0 of every arm, AT's seeds 1-2 and scores, then the chosen variant's (once known)."""
    yield from (("train", arm, 0) for arm in ARMS)
    yield from (("train", "at", s) for s in (1, 2))
    yield from (("score", "at", s) for s in CONFIRM_SEEDS)
    while chosen_variant(args) is None:  # another worker is finishing a seed-0 run; if it died, its run is taken over
        yield from (("train", arm, 0) for arm in ARMS)
        time.sleep(30)
    chosen = chosen_variant(args)
    yield from (("train", chosen, s) for s in (1, 2))
    yield from (("score", chosen, s) for s in CONFIRM_SEEDS)


def cmd_work(args) -> None:
    from casify.data import NpzDataset, cifar_train_transform
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir) / "train.npz"
    train_set = NpzDataset(data, transform=cifar_train_transform(), indices=list(range(*FINE_TUNING["train_images"])))
    val_set = NpzDataset(data, indices=list(range(45000, 45500)))
    rule_path = RESULTS / "retrofit_standard.json"
    if not rule_path.exists():
        write_json(rule_path, {"decision_rule": rule(), "base": base_record()["sha256"], "runs": []})
    for kind, arm, seed in jobs(args):
        out = run_dir(args, arm, seed)
        done = out / ("train_record.json" if kind == "train" else "score.json")
        if done.exists() and (kind == "train" or ARMS[arm] is None or (out / "echo.json").exists()):
            continue
        while kind == "score" and not (out / "train_record.json").exists():  # its training is the other worker's
            if protocol.claim(out, ".claim_train"):  # ... which died: train it here
                train_one(args, arm, seed, train_set, val_set)
            else:
                time.sleep(30)
        if not protocol.claim(out, f".claim_{kind}"):
            continue
        if kind == "train":
            train_one(args, arm, seed, train_set, val_set)
        else:
            score_one(args, arm, seed)


# -- report ----------------------------------------------------------------------------------------------------------
def cmd_report(args) -> None:
    from casify.evaluate.compare import paired, seed_comparison
    path = RESULTS / "retrofit_standard.json"
    record = json.loads(path.read_text())
    base = base_record()
    runs, per = [], {}
    for arm in ARMS:
        for seed in CONFIRM_SEEDS:
            out = run_dir(args, arm, seed)
            train = read_json(out / "train_record.json")
            if train is None:
                continue
            score = read_json(out / "score.json")
            beta, routing = (None, None) if ARMS[arm] is None else ARMS[arm][:2]
            runs.append({"arm": arm, "seed": seed, "beta": beta, "train_routing": routing,
                         "base": {"name": "standard_base (cifar_resnet18 w1/8, natural)", "sha256": base["sha256"]},
                         "held_out_best_pgd10": train["best_val_pgd"], "selected_step": train["best_step"],
                         "steps": train["steps"], "stopped_after_peak": train["stopped_after_peak"],
                         "selected_at_last_step": train["selected_at_last_step"],
                         "natural": score["natural"] if score else None,
                         "paper_style": cas_study._row_accuracy(score["per_example"], "pgd20[cas]" if beta else "pgd20")
                         if score else None,
                         "worst_case": score["worst_case"] if score else None,
                         "gradient_masking_suspected": score["gradient_masking_suspected"] if score else None,
                         "echo": read_json(out / "echo.json"), "model_sha256": train["model_sha256"],
                         "train_seconds": train["seconds"], "score_seconds": score["seconds"] if score else None,
                         "history": train["history"]})
            if score:
                per[(arm, seed)] = score["per_example"]
    chosen = chosen_variant(args)
    record["base"] = {k: v for k, v in base.items() if k != "history"}
    record["chosen_variant"] = chosen
    record["runs"] = runs
    comparison = {"A": chosen, "B": "at"}
    for metric in ("worst_case", "natural"):
        seeds = [s for s in CONFIRM_SEEDS if (chosen, s) in per and ("at", s) in per]
        pairs = [paired(per[(chosen, s)][metric], per[("at", s)][metric]) for s in seeds]
        comparison[metric] = (seed_comparison(pairs, seeds).to_dict() if len(pairs) >= 3 else
                              {"seeds": seeds, "per_seed": [dict(c.to_dict(), seed=s) for c, s in zip(pairs, seeds)],
                               "verdict": f"not judged: {len(pairs)} paired seeds (the rule needs 3)"})
    record["comparison"] = comparison
    record["budget_cpu_hours"] = round(sum(r["train_seconds"] + (r["score_seconds"] or 0) for r in runs) / 3600, 2)
    write_json(path, record)
    (RESULTS.parent / "README.md").write_text(markdown(record, base))
    figure(record, RESULTS / "retrofit_standard.png")
    print(f"wrote {path} ({len(runs)} runs; chosen {chosen}; verdict {comparison['worst_case'].get('verdict')})")


def markdown(record: dict, base: dict) -> str:
    c = record["comparison"]
    lines = ["# Retrofit of a standard-trained base: AT vs AT+CAS fine-tuning (issue 18, part 5(a))", "",
             f"Base: `studies/retrofit_standard/standard_base.py` (cifar_resnet18 width 1/8, pooled linear head, natural training on "
             f"45,000 images), SHA-256 `{base['sha256'][:16]}...`, held-out natural {pct(base['held_out_natural'])} %, "
             f"test846 natural {pct(base['test846_natural'])} %.", "",
             "Fine-tuning: PGD-3 AT at eps 8/255 (pixel space), lr 0.05 dropped tenfold at half an epoch, stopped "
             "two validations after the held-out peak (at most 1.25 epochs); CAS after layer4.0 and layer4.1 "
             "(identity init). Commands and the rule: `studies/retrofit_standard/study.py`.", "",
             f"Decision rule (written before the first run): {record['decision_rule']['verdict']}", "",
             "## Variant choice (seed 0, held-out PGD-10, never the test set)", "",
             "| arm | held-out best PGD-10 | selected step / steps | stopped after peak |", "|---|---|---|---|"]
    for r in record["runs"]:
        if r["seed"] == 0:
            lines.append(f"| {r['arm']} | {pct(r['held_out_best_pgd10'])} | {r['selected_step']} / {r['steps']} | "
                         f"{'yes' if r['stopped_after_peak'] else 'no (cap' + (', selected at its last step' if r['selected_at_last_step'] else '') + ')'} |")
    lines += ["", f"at_cas_warmup's steps count from the mask on; its {WARMUP_STEPS} steps of the heads alone come first.",
              "", f"Chosen: **{record['chosen_variant']}**", "",
              "## Verdict (A - B, points, test846)", "",
              "| comparison | worst case (union) | verdict | natural |", "|---|---|---|---|",
              f"| {c['A']} vs {c['B']} | {cas_study._interval(c['worst_case'])} | "
              f"**{c['worst_case'].get('verdict')}** | {cas_study._interval(c['natural'])} |", "",
              "## Runs scored on test846 (%)", "",
              "| arm | seed | natural | PGD-20 (paper-style) | worst case | echo: forced routing followed | "
              "echo: final == head 0 (clean / adv) | SHA-256 |", "|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        if r["worst_case"] is None:
            continue
        echo = r.get("echo")
        e1 = f"{pct(echo['forced_all'])} (chance {pct(echo['chance'])})" if echo else "-"
        e2 = (f"{pct(echo['head_agreement_clean'][0])} / {pct(echo['head_agreement_adversarial'][0])}" if echo else "-")
        lines.append(f"| {r['arm']} | {r['seed']} | {pct(r['natural'])} | {pct(r.get('paper_style'))} | "
                     f"{pct(r['worst_case'])} | {e1} | {e2} | "
                     f"`{r['model_sha256'][:16]}` |")
    lines += ["", f"CPU time of these runs (training and scoring, one thread each): {record['budget_cpu_hours']} h.", ""]
    return "\n".join(lines)


def figure(record: dict, path: Path) -> None:
    """Left: the held-out curves of seed 0 (the variant choice). Right: test846 accuracy per confirmed run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in record["runs"]:
        if r["seed"] == 0:
            ax.plot([h["step"] for h in r["history"]], [100 * h["val_pgd"] for h in r["history"]], marker=".",
                    label=r["arm"])
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out PGD-10 accuracy (%)")
    ax.set_title("seed 0: the variant choice (held-out, never the test set)")
    ax.legend(fontsize=8)
    scored = [a for a in ARMS if any(r["arm"] == a and r["worst_case"] is not None for r in record["runs"])]
    for i, arm in enumerate(scored):
        rs = [r for r in record["runs"] if r["arm"] == arm and r["worst_case"] is not None]
        bx.scatter([i] * len(rs), [100 * r["worst_case"] for r in rs], color="C0",
                   label="worst case (union)" if i == 0 else None)
        bx.scatter([i] * len(rs), [100 * r["natural"] for r in rs], color="C1", marker="x",
                   label="natural" if i == 0 else None)
    bx.set_xticks(range(len(scored)))
    bx.set_xticklabels(scored)
    bx.set_ylabel("test846 accuracy (%), one point per seed")
    bx.set_title("AT vs the chosen CAS variant, eps 8/255")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", action="store_true", help="train and score the next unclaimed runs")
    p.add_argument("--report", action="store_true", help="write results/retrofit_standard.{json,png} and README.md")
    p.add_argument("--rule", action="store_true", help="only write the decision rule (before the first run)")
    p.add_argument("--data-dir", required=True, help="folder with train.npz and test846.npz (../shared/data/cifar10)")
    p.add_argument("--base", default="outputs/standard_base", help="the standard base's run folder")
    p.add_argument("--runs-dir", default="outputs/retrofit_standard")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.rule:
        if (RESULTS / "retrofit_standard.json").exists():
            p.error(f"{RESULTS / 'retrofit_standard.json'} exists: --rule writes the rule before the first run only "
                    "(delete the file to start the study over)")
        write_json(RESULTS / "retrofit_standard.json",
                   {"decision_rule": rule(), "base": None, "runs": []})
    if args.work:
        cmd_work(args)
    if args.report:
        cmd_report(args)


if __name__ == "__main__":
    main()
