"""`make demo`: the main job of casify on the embedded default dataset, end to end, in a few minutes on a CPU.

1. a classifier is pretrained (naturally) on scikit-learn's handwritten digits, shipped inside the package;
2. CAS is retrofitted after each block of its last stage (identity initialisation: the pretrained function is kept);
3. AT+CAS and plain AT fine-tune copies of it for the same budget;
4. both are evaluated on the held-out test split under FGSM, PGD-20 and CW-inf (CAS under the adaptive attack);
5. the robust model is saved as a Hub-ready folder (config.json, model.safetensors, README.md model card).

    python -m casify.demo [--out demo_output] [--epochs 6] [--eps 16]
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import timm
import torch

import casify
from casify_cli import Parser
from casify.data import build_dataset
from casify.evaluate import evaluate
from casify.model.loading import write_hub_folder
from casify.train import TrainConfig, Trainer

ARCH = "cifar_resnet18"
STEPS = 5
EVIDENCE = "studies/paper_claims/README.md"
CAS_LAYERS = ["layer4.0", "layer4.1"]


def _base(width: float, state=None):
    model = timm.create_model(ARCH, num_classes=10, width=width)
    if state is not None:
        model.load_state_dict(state)
    return model


def main(argv=None) -> dict:
    parser = Parser(description="casify demo: retrofit CAS, AT vs AT+CAS, robustness table")  # --a-b and --a_b
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--epochs", type=float, default=6, help="adversarial fine-tuning epochs for each method")
    parser.add_argument("--pretrain-epochs", type=float, default=8)
    parser.add_argument("--eps", type=float, default=16, help="L-inf eps in pixel units of 1/255")
    parser.add_argument("--width", type=float, default=0.25, help="channel width of the CIFAR ResNet-18")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-examples", type=int, default=None,
                        help="validate and evaluate on at most this many digits (default: the whole splits)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    eps = args.eps / 255
    start = time.time()
    torch.manual_seed(args.seed)
    train_set = build_dataset("digits", "train", augment=True)
    val_set, test_set = build_dataset("digits", "val"), build_dataset("digits", "test")
    if args.max_examples:
        val_set, test_set = _first(val_set, args.max_examples), _first(test_set, args.max_examples)
    print(f"digits (scikit-learn, embedded): {len(train_set)} train / {len(val_set)} val / {len(test_set)} test, "
          f"16x16 pixels in [0, 1]; eps = {args.eps:g}/255 (L-inf)")

    common = dict(batch_size=64, schedule="cosine", seed=args.seed, progress=True, val_max_examples=len(val_set))
    print(f"[1/{STEPS}] pretraining a standard classifier (no attack) ...")
    pretrained = casify.wrap(_base(args.width), [], input_size=(3, 16, 16))
    Trainer(pretrained, train_set, val_set, TrainConfig(method="standard", cas=False, epochs=args.pretrain_epochs,
                                                        lr=0.05, output_dir=str(out / "runs" / "standard"), **common)
            ).train(resume=False, overwrite=True)  # the demo replaces its own earlier output
    state = casify.unwrap(pretrained).state_dict()

    results, models = {}, {}
    print(f"[2/{STEPS}] retrofitting CAS after {', '.join(CAS_LAYERS)} onto one copy (identity init: the pretrained "
          "function is kept); plain AT fine-tunes another copy for the same budget")
    for name, layers in (("AT", []), ("AT+CAS", CAS_LAYERS)):
        print(f"[3/{STEPS}] {name}: fine-tuning the pretrained classifier adversarially ...")
        model = casify.wrap(_base(args.width, state), layers, input_size=(3, 16, 16), init="identity")
        config = TrainConfig(method="at", cas=bool(layers), epochs=args.epochs, lr=0.02, eps=eps, attack_steps=5,
                             attack_alpha=eps / 2.5, output_dir=str(out / "runs" / name.lower().replace("+", "_")),
                             **common)
        trainer = Trainer(model, train_set, val_set, config)
        trainer.train(resume=False, overwrite=True)
        models[name] = casify.from_pretrained(Path(config.output_dir) / "best")  # selected on the validation split
    print(f"[4/{STEPS}] evaluating on the test split (CAS under the adaptive attack) ...")
    models = {"standard (pretrained)": pretrained, **models}
    for name, model in models.items():
        # per_attack: the table compares every attack family across models, so each must be whole (not a cascade)
        report = evaluate(model, test_set, attacks="quick", eps=eps, seed=args.seed, progress=False, per_attack=True)
        results[name] = report
    robust = models["AT+CAS"]
    print(f"[5/{STEPS}] saving the AT+CAS model as a Hub-ready folder ...")
    folder = write_hub_folder(robust, out / "at_cas_robust_model", "casify-demo-digits-resnet18-at-cas",
                              evaluation=results["AT+CAS"].summary(), dataset_name="digits (scikit-learn)",
                              dataset_type="sklearn-digits", split="test")
    table = _table(results, args.eps)
    elapsed = time.time() - start
    print("\n" + table)
    print("\n" + honest_reading(results))
    print(f"\nrobust model (Hub-ready): {folder}   load with casify.from_pretrained({str(folder)!r})")
    print(f"total time: {elapsed:.0f} s")
    summary = {"eps": eps, "eps_str": f"{args.eps:g}/255", "seconds": round(elapsed, 1),
               "results": {k: r.summary() for k, r in results.items()}}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1))
    (out / "demo_results.md").write_text(table + "\n")
    return summary


def _first(dataset, n: int):
    subset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    subset.num_classes = getattr(dataset, "num_classes", None)
    return subset


def honest_reading(results: dict) -> str:
    """What the table can and cannot say: one seed on a few hundred tiny images is a demonstration, not evidence."""
    at, cas = results["AT"].summary(), results["AT+CAS"].summary()
    n = cas["n"]
    worst_at, worst_cas = at["accuracy"]["worst_case"], cas["accuracy"]["worst_case"]
    p = (worst_at + worst_cas) / 2
    half = 100 * 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))
    return (f"How to read this table: AT+CAS minus AT is {100 * (worst_cas - worst_at):+.1f} points of worst-case "
            f"accuracy, from one seed, a few epochs and {n} test digits of 16x16 pixels; a single row's 95 % interval "
            f"alone is about +-{half:.1f} points, and another seed moves the gap more. This shows the pipeline "
            f"working, not whether CAS helps. The evidence (several seeds, paired tests, adaptive attacks) is in "
            f"{EVIDENCE}: trained with CAS at CPU scale, CAS cost 2-6 points of worst-case robustness with AT, "
            f"TRADES and MART; retrofitted onto a robust model it cost about 13 (studies/retrofit_study/README.md).")


def _table(results: dict, eps255: float) -> str:
    attacks = list(next(iter(results.values())).summary()["accuracy"])
    head = "| model | " + " | ".join(attacks) + " |"
    rows = [head, "|" + "---|" * (len(attacks) + 1)]
    for name, report in results.items():
        acc = report.summary()["accuracy"]
        rows.append(f"| {name} | " + " | ".join(f"{100 * acc[a]:.1f}" for a in attacks) + " |")
    n = next(iter(results.values())).summary()["n"]
    return (f"Accuracy (%) on {n} held-out test digits, L-inf eps = {eps255:g}/255 in pixel space\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
