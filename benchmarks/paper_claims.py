"""The paper's claims on real CIFAR-10, scaled down to fit a 2-core CPU (issue 5, parts 1 and 2).

    python benchmarks/paper_claims.py --data-dir ../shared/data/cifar10 --part main
    python benchmarks/paper_claims.py --data-dir ../shared/data/cifar10 --part ablations     # claims 7, 8
    python benchmarks/paper_claims.py --data-dir ../shared/data/cifar10 --part trades_mart   # claim 9
    python benchmarks/paper_claims.py --data-dir ../shared/data/cifar10 --part retrofit      # part 2
    python benchmarks/paper_claims.py --data-dir ../shared/data/cifar10 --part report         # verdicts from the JSON

Scale (defaults): a CIFAR ResNet-18 of width 1/8 (8/16/32/64 channels), the first ``--train-size`` images of
train.npz for training, ``--val-size`` of the last 5,000 for checkpoint selection (never a test set), PGD-3 training
attacks at eps 8/255, evaluation on test846.npz (lossless, official test images) and on the first ``--jpeg-size``
images of test10k_jpeg.npz (marked approximate). CAS models are attacked adaptively (CE + beta * mean aux CE, eval
mode, predicted routing). Full scale on a GPU: ``--width 1 --train-size 45000 --epochs 100 --attack-steps 10
--milestones 75 90 --jpeg-size 10000 --device cuda`` (the paper's setting, ~a GPU-day for all runs).
Each part writes ``benchmarks/results/paper_claims_<part>.json``; ``--part report`` turns them into verdicts.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import Subset

import casify
from casify.analysis import analyze
from casify.data import NpzDataset, cifar_train_transform
from casify.evaluate import evaluate
from casify.train import TrainConfig, Trainer

RESULTS = Path("benchmarks/results")
CAS4 = ["layer4.0", "layer4.1"]
EXPERIMENTS = {
    # name: (method, CAS layers, wrap kwargs)
    "std": ("standard", [], {}),
    "at": ("at", [], {}),
    "at_cas": ("at", CAS4, {}),
    "at_cas_no_suppress": ("at", CAS4, {"suppress": False}),
    "at_cas_block3": ("at", ["layer3.0", "layer3.1"], {}),
    "trades": ("trades", [], {}),
    "trades_cas": ("trades", CAS4, {}),
    "mart": ("mart", [], {}),
    "mart_cas": ("mart", CAS4, {}),
}
PARTS = {"main": [("std", [0]), ("at", [0, 1, 2]), ("at_cas", [0, 1, 2])],
         "ablations": [("at_cas_no_suppress", [0]), ("at_cas_block3", [0])],
         "trades_mart": [("trades", [0]), ("trades_cas", [0]), ("mart", [0]), ("mart_cas", [0])]}


def datasets(args):
    d = Path(args.data_dir)
    full = NpzDataset(d / "train.npz")
    train = NpzDataset(d / "train.npz", transform=cifar_train_transform(), indices=list(range(args.train_size)))
    val = Subset(full, list(range(45000, 45000 + args.val_size)))
    test = NpzDataset(d / "test846.npz", indices=list(range(args.test_size)) if args.test_size else None)
    jpeg = NpzDataset(d / "test10k_jpeg.npz", indices=list(range(args.jpeg_size)))
    return train, val, test, jpeg


def new_model(args, layers, seed, init="paper", state=None, **wrap_kwargs):
    torch.manual_seed(seed)
    base = timm.create_model("cifar_resnet18", num_classes=10, width=args.width)
    if state is not None:
        base.load_state_dict(state)
    return casify.wrap(base, layers, init=init, normalize=None, input_size=(3, 32, 32), **wrap_kwargs)


def train_run(args, name, model, method, cas, seed, train, val, epochs=None, lr=None, out=None):
    cfg = TrainConfig(method=method, cas=cas, epochs=epochs or args.epochs, batch_size=args.batch, lr=lr or args.lr,
                      weight_decay=5e-4, schedule="multistep", milestones=tuple(args.milestones),
                      eps=8 / 255, attack_steps=args.attack_steps, attack_alpha=2.5 * (8 / 255) / args.attack_steps,
                      defaults="authors", seed=seed, val_max_examples=args.val_size, progress=False,
                      output_dir=str(out or Path(args.work_dir) / f"{name}_seed{seed}"))
    start = time.time()
    trainer = Trainer(model, train, val, cfg)
    state = trainer.train(resume=False)
    seconds = time.time() - start
    folder = Path(cfg.output_dir) / ("best" if (Path(cfg.output_dir) / "best").exists() else "final")
    return casify.from_pretrained(folder), {"seconds": round(seconds, 1), "steps": state.global_step,
                                           "best_step": state.best_step, "validation": state.history,
                                           "folder": str(folder)}


def measure(args, model, test, jpeg, autoattack_n):
    out = {}
    report = evaluate(model, test, attacks="quick", eps=8 / 255, seed=0, progress=False, checks=False)
    out["test846"] = report.summary()
    jr = evaluate(model, jpeg, attacks=["pgd20"], eps=8 / 255, seed=0, progress=False, checks=False)
    out["test10k_jpeg_approx"] = jr.summary()
    if autoattack_n:
        sub = Subset(test, list(range(autoattack_n)))
        try:
            ar = evaluate(model, sub, attacks=[], eps=8 / 255, seed=0, progress=False, checks=False, autoattack=True)
            out["autoattack"] = {"n": autoattack_n, "accuracy": ar.summary()["accuracy"]}
        except ImportError as exc:
            out["autoattack"] = {"skipped": str(exc)}
    layer = model.cas_layers[-1] if model.cas_layers else "layer4"
    ch = analyze(model, test, layer, eps=8 / 255, steps=20, max_examples=min(len(test), args.analysis_size), seed=0)
    out["channels"] = {"layer": ch.layer, "captured": ch.captured, "magnitude": ch.magnitude,
                       "frequency_class0": {k: v for k, v in ch.frequency.items() if not isinstance(v, list)},
                       "frequency_class_mean": ch.frequency_class_mean}
    return out


def run_part(args):
    train, val, test, jpeg = datasets(args)
    path = RESULTS / f"paper_claims_{args.part}.json"
    done = json.loads(path.read_text()) if path.exists() and args.resume else {"runs": {}}
    done.update(settings=vars(args), versions={"torch": torch.__version__, "casify": casify.__version__},
                machine=platform.machine(), device="cpu")
    for name, seeds in PARTS[args.part]:
        if args.only and name not in args.only:
            continue
        method, layers, wrap_kwargs = EXPERIMENTS[name]
        for seed in seeds:
            key = f"{name}/seed{seed}"
            if key in done["runs"]:
                continue
            print(f"== {key}", flush=True)
            model = new_model(args, layers, seed, **wrap_kwargs)
            epochs = args.std_epochs if method == "standard" else None
            trained, info = train_run(args, name, model, method, bool(layers), seed, train, val, epochs=epochs)
            info.update(measure(args, trained, test, jpeg, args.autoattack_examples if seed == 0 else 0))
            done["runs"][key] = info
            path.write_text(json.dumps(done, indent=1, default=str))
            print(json.dumps(info["test846"]["accuracy"]), flush=True)
    return done


def run_retrofit(args):
    """Part 2: a standard (pretrained) network fine-tuned by AT vs AT+CAS (identity / paper init) for one budget."""
    train, val, test, jpeg = datasets(args)
    path = RESULTS / "paper_claims_retrofit.json"
    done = json.loads(path.read_text()) if path.exists() and args.resume else {"runs": {}}
    done.update(settings=vars(args), versions={"torch": torch.__version__, "casify": casify.__version__})
    std_folder = Path(args.work_dir) / "std_seed0" / "best"
    if not std_folder.exists():
        raise SystemExit("run --part main first: the retrofit starts from its standard model")
    pretrained = casify.unwrap(casify.from_pretrained(std_folder)).state_dict()
    for name, layers, init in (("retrofit_at", [], "identity"), ("retrofit_at_cas_identity", CAS4, "identity"),
                               ("retrofit_at_cas_paper", CAS4, "paper")):
        if name in done["runs"]:
            continue
        print(f"== {name}", flush=True)
        model = new_model(args, layers, 0, init=init, state=pretrained)
        trained, info = train_run(args, name, model, "at", bool(layers), 0, train, val, epochs=args.retrofit_epochs,
                                  lr=args.retrofit_lr)
        info.update(measure(args, trained, test, jpeg, 0))
        info["robust_acc_per_hour"] = info["test846"]["accuracy"]["worst_case"] / (info["seconds"] / 3600)
        done["runs"][name] = info
        path.write_text(json.dumps(done, indent=1, default=str))
        print(json.dumps(info["test846"]["accuracy"]), flush=True)
    return done


def _noise(p, n):
    return 2 * math.sqrt(max(p * (1 - p), 1 / n) / n)


def _compare(a, b, n, metric):
    """Verdict for 'b beats a' on lists of per-seed accuracies."""
    ma, mb = statistics.mean(a), statistics.mean(b)
    spread = (statistics.pstdev(a) ** 2 / len(a) + statistics.pstdev(b) ** 2 / len(b)) ** 0.5 if len(a) > 1 else 0
    band = max(2 * spread, _noise((ma + mb) / 2, n) / (len(a) ** 0.5))
    verdict = "reproduced" if mb - ma > band else "not reproduced" if ma - mb > band else "inconclusive"
    return {"metric": metric, "baseline_mean": ma, "cas_mean": mb, "baseline": a, "cas": b,
            "difference": mb - ma, "noise_band": band, "verdict": verdict}


def report(args):
    runs = {}
    for part in ("main", "ablations", "trades_mart", "retrofit", "std_rerun"):
        p = RESULTS / f"paper_claims_{part}.json"
        if p.exists():
            runs.update(json.loads(p.read_text())["runs"])
    acc = lambda key, m: runs[key]["test846"]["accuracy"][m]  # noqa: E731
    seeds = lambda name: sorted(k for k in runs if k.startswith(name + "/"))  # noqa: E731
    claims = {}
    ch = lambda key: runs[key]["channels"]  # noqa: E731
    if "std/seed0" in runs:
        m = ch("std/seed0")["magnitude"]
        claims["1_std_adv_higher_magnitude"] = {"ratio_adv_over_nat": m["ratio"], "mean_difference": m["mean_difference"],
                                                "verdict": "reproduced" if m["ratio"] > 1.02 else "not reproduced"}
        f = ch("std/seed0")["frequency_class_mean"]
        uniform = f["entropy_adversarial"] > f["entropy_natural"] and f["gini_adversarial"] < f["gini_natural"]
        claims["2_std_adv_more_uniform"] = {k: f[k] for k in ("entropy_natural", "entropy_adversarial", "gini_natural",
                                                              "gini_adversarial", "rare_frequency_natural",
                                                              "rare_frequency_adversarial")}
        claims["2_std_adv_more_uniform"]["verdict"] = "reproduced" if uniform else "not reproduced"
    if "std/seed0" in runs and seeds("at"):
        std_gap = abs(ch("std/seed0")["magnitude"]["ratio"] - 1)
        at_gaps = [abs(ch(k)["magnitude"]["ratio"] - 1) for k in seeds("at")]
        claims["3_at_narrows_magnitude_gap"] = {"std_abs_ratio_minus_1": std_gap, "at_abs_ratio_minus_1": at_gaps,
                                                "verdict": "reproduced" if max(at_gaps) < std_gap else
                                                "not reproduced" if min(at_gaps) > std_gap else "inconclusive"}
        at_rare = [ch(k)["frequency_class_mean"] for k in seeds("at")]
        gaps = [f["rare_frequency_adversarial"] - f["rare_frequency_natural"] for f in at_rare]
        claims["4_at_leaves_frequency_gap"] = {"rare_channel_freq_adv_minus_nat": gaps,
                                               "verdict": "reproduced" if min(gaps) > 0.01 else
                                               "not reproduced" if max(gaps) <= 0 else "inconclusive"}
    if seeds("at") and seeds("at_cas"):
        f_at = [ch(k)["frequency_class_mean"] for k in seeds("at")]
        f_cas = [ch(k)["frequency_class_mean"] for k in seeds("at_cas")]
        gap_at = [f["mean_abs_difference"] for f in f_at]
        gap_cas = [f["mean_abs_difference"] for f in f_cas]
        rare_at = [f["rare_frequency_adversarial"] for f in f_at]
        rare_cas = [f["rare_frequency_adversarial"] for f in f_cas]
        claims["5a_cas_suppresses_rarely_used_channels"] = {
            "rare_adv_freq_at": rare_at, "rare_adv_freq_cas": rare_cas,
            "verdict": "reproduced" if max(rare_cas) < min(rare_at) else
            "not reproduced" if min(rare_cas) > max(rare_at) else "inconclusive"}
        claims["5b_cas_narrows_frequency_gap"] = {
            "freq_gap_at": gap_at, "freq_gap_cas": gap_cas,
            "verdict": "reproduced" if max(gap_cas) < min(gap_at) else
            "not reproduced" if min(gap_cas) > max(gap_at) else "inconclusive"}
        n = runs[seeds("at")[0]]["test846"]["n"]
        claims["6_at_cas_beats_at"] = {m: _compare([acc(k, m) for k in seeds("at")], [acc(k, m) for k in seeds("at_cas")],
                                                   n, m) for m in ("natural", "pgd20", "cw20", "worst_case")}
        aa = [(runs[a].get("autoattack", {}), runs[b].get("autoattack", {})) for a, b in
              zip(seeds("at"), seeds("at_cas")) if "accuracy" in runs[a].get("autoattack", {})]
        if aa:
            claims["6_at_cas_beats_at"]["autoattack_seed0"] = {"at": aa[0][0]["accuracy"], "at_cas": aa[0][1]["accuracy"]}
    single = lambda base, cas, label: {m: _compare([acc(base, m)], [acc(cas, m)], runs[base]["test846"]["n"], m)  # noqa
                                       for m in ("natural", "pgd20", "cw20", "worst_case")} | {"claim": label}
    if "at_cas_no_suppress/seed0" in runs and "at/seed0" in runs:
        c7 = single("at/seed0", "at_cas_no_suppress/seed0", "AT+CAS without the mask vs AT: the paper expects no gain")
        for m in ("natural", "pgd20", "cw20", "worst_case"):  # the claim is "no gain": equal or worse reproduces it
            c7[m]["verdict"] = "not reproduced" if c7[m]["difference"] > c7[m]["noise_band"] else "reproduced"
        claims["7_no_suppression_no_gain"] = c7
    if "at_cas_block3/seed0" in runs and "at_cas/seed0" in runs:
        claims["8_last_stage_helps_more"] = single("at_cas_block3/seed0", "at_cas/seed0",
                                                  "CAS at block4 ('cas') vs block3 ('baseline'): block4 should win")
    for method in ("trades", "mart"):
        if f"{method}/seed0" in runs and f"{method}_cas/seed0" in runs:
            claims[f"9_{method}_cas_beats_{method}"] = single(f"{method}/seed0", f"{method}_cas/seed0",
                                                             f"{method.upper()}+CAS vs {method.upper()}")
    retro = {k: {"seconds": v["seconds"], **v["test846"]["accuracy"], "robust_acc_per_hour": v.get("robust_acc_per_hour")}
             for k, v in runs.items() if k.startswith("retrofit")}
    out = {"claims": claims, "retrofit": retro, "runs_done": sorted(runs)}
    (RESULTS / "paper_claims_verdicts.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "paper_claims.md").write_text(_markdown(out, runs))
    print(json.dumps(out, indent=1))
    return out


def _markdown(out: dict, runs: dict) -> str:
    lines = ["# The paper's claims at CPU scale", "",
             "`python benchmarks/paper_claims.py --part report` (after the training parts). CIFAR ResNet-18 of width 1/8, "
             "5,000 training images, 8 epochs, PGD-3 training at eps 8/255; checkpoints selected on 500 held-out training "
             "images; accuracies on test846 (lossless) under eps 8/255, CAS models under the adaptive attack. Verdicts "
             "compare against a band of 2 standard errors (seed spread, or binomial sampling noise for single seeds).",
             "", "## Accuracy per run (test846, %)", "",
             "| run | natural | FGSM | PGD-20 | CW-inf | worst case | PGD-20 on test10k-jpeg (approx.) | AutoAttack (n) | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(runs.items()):
        a = r["test846"]["accuracy"]
        aa = r.get("autoattack", {})
        aa_txt = f"{100 * aa['accuracy']['autoattack']:.1f} ({aa['n']})" if "accuracy" in aa and "autoattack" in aa["accuracy"] else ""
        jp = r.get("test10k_jpeg_approx", {}).get("accuracy", {}).get("pgd20")
        lines.append(f"| {key} | " + " | ".join(f"{100 * a[m]:.1f}" for m in ("natural", "fgsm", "pgd20", "cw20", "worst_case"))
                     + f" | {'' if jp is None else f'{100 * jp:.1f}'} | {aa_txt} | {r['seconds']:.0f} |")
    lines += ["", "## Verdicts", "", "| claim | verdict | numbers |", "|---|---|---|"]
    for name, c in out["claims"].items():
        if "verdict" in c:
            nums = {k: v for k, v in c.items() if k != "verdict"}
            lines.append(f"| {name} | {c['verdict']} | `{json.dumps(nums, default=lambda v: round(v, 4))[:300]}` |")
        else:
            for m, v in c.items():
                if isinstance(v, dict) and "verdict" in v:
                    lines.append(f"| {name} ({m}) | {v['verdict']} | baseline {100 * v['baseline_mean']:.1f} vs "
                                 f"CAS {100 * v['cas_mean']:.1f} (band ±{100 * v['noise_band']:.1f}) |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=False, help="folder with train.npz, test846.npz, test10k_jpeg.npz")
    parser.add_argument("--part", choices=list(PARTS) + ["retrofit", "report"], default="main")
    parser.add_argument("--work-dir", default="outputs/paper_claims")
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--jpeg-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=None, help="first N of test846 (default: all 846)")
    parser.add_argument("--analysis-size", type=int, default=500, help="test examples for the channel analysis")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the machine)")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--std-epochs", type=float, default=8)
    parser.add_argument("--milestones", type=float, nargs="+", default=[6, 7])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--attack-steps", type=int, default=3)
    parser.add_argument("--autoattack-examples", type=int, default=100)
    parser.add_argument("--retrofit-epochs", type=float, default=3)
    parser.add_argument("--retrofit-lr", type=float, default=0.02)
    parser.add_argument("--resume", action="store_true", help="skip runs already in the part's JSON")
    parser.add_argument("--only", nargs="+", default=None, help="run only these experiments of the part")
    args = parser.parse_args()
    global RESULTS
    RESULTS = Path(args.results_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        return report(args)
    if not args.data_dir:
        parser.error("--data-dir is required to train")
    return run_retrofit(args) if args.part == "retrofit" else run_part(args)


if __name__ == "__main__":
    main()
