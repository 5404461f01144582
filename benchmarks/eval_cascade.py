"""Time of the cascade (``evaluate(per_attack=False)``, the default) against the full per-attack table, at the same
per-example worst case, on a small robust CIFAR model.

The model: the shared ``resnet2b`` (PGD adversarial training at L-inf 2/255 by the alpha-beta-CROWN team; published
clean 69.25 %, PGD 54.82 % at 2/255) wrapped with CAS after ``layer1.0`` and ``layer1.1`` with ``init="identity"``
(the wrapped model computes the pretrained function, so its robustness is real; no training is needed for a timing
comparison). The data: the first ``--n`` images of ``test846.npz``. Both evaluations run the standard suite with the
gradient-masking checks at eps 2/255 with the same seed, one after the other, ``--repeats`` times (interleaved; the
median is reported). Checked: the per-example worst case ("robust to every attack") and each row's cascade accounting
are identical.

    python benchmarks/eval_cascade.py --models-dir ../shared/models --data ../shared/data/cifar10/test846.npz \
        --threads 1 --out benchmarks/results/eval_cascade.json

(about 4 minutes on one thread of the 2-core development CPU). On a GPU: add ``--device cuda --n 846``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import casify
from casify.evaluate import evaluate
from casify.models.shared import load_shared_model


def load_data(path: Path, n: int):
    import numpy as np
    d = np.load(path)
    x = torch.from_numpy(d["x"][:n]).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    y = torch.from_numpy(d["y"][:n].astype("int64"))
    return x, y


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", default="../shared/models")
    p.add_argument("--model", default="resnet2b.pth")
    p.add_argument("--layers", nargs="+", default=["layer1.0", "layer1.1"])
    p.add_argument("--data", default="../shared/data/cifar10/test846.npz")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", nargs="+", default=["2/255", "8/255"],
                   help="radii, each timed separately (the model was trained at 2/255)")
    p.add_argument("--suite", default="standard")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/eval_cascade.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, normalize = load_shared_model(Path(args.models_dir) / args.model)
    model = casify.wrap(base, args.layers, input_size=(3, 32, 32), normalize=normalize, init="identity").eval()
    model.to(args.device)
    x, y = load_data(Path(args.data), args.n)
    command = "python benchmarks/eval_cascade.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = {
        "command": command, "model": f"{args.model} + CAS at {', '.join(args.layers)} (init identity)",
        "data": f"{args.data}[:{args.n}]", "suite": args.suite, "checks": True, "batch_size": args.batch_size,
        "seed": args.seed, "device": args.device, "threads": args.threads, "repeats": args.repeats,
        "versions": {"torch": torch.__version__, "casify": getattr(casify, "__version__", "?"),
                     "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}}
    runs = [run_one(model, x, y, e, args) for e in args.eps]
    result = {**header, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = "\n\n".join([f"# Cascade vs per-attack evaluation\n\n`{command}`"] + [markdown(header, r) for r in runs])
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return result


def run_one(model, x, y, eps_text: str, args) -> dict:
    eps = casify.evaluate.parse_eps(eps_text)
    kwargs = dict(attacks=args.suite, eps=eps, batch_size=args.batch_size, seed=args.seed, progress=False,
                  device=args.device)
    evaluate(model, (x[:8], y[:8]), **kwargs)  # warm-up (allocator, kernels)

    times = {"per_attack": [], "cascade": []}
    reports = {}
    for r in range(args.repeats):
        for mode in (("per_attack", "cascade") if r % 2 == 0 else ("cascade", "per_attack")):
            t0 = time.perf_counter()
            reports[mode] = evaluate(model, (x, y), per_attack=(mode == "per_attack"), **kwargs)
            times[mode].append(time.perf_counter() - t0)
            print(f"repeat {r} {mode}: {times[mode][-1]:.1f} s", file=sys.stderr)
    full, cascade = reports["per_attack"], reports["cascade"]
    key = ("row", "newly_fooled", "robust_after")
    same_worst = full.per_example["worst_case"] == cascade.per_example["worst_case"]
    same_rows = [tuple(c[k] for k in key) for c in full.cascade] == [tuple(c[k] for k in key) for c in cascade.cascade]
    same_where_attacked = all(
        f == g for c in cascade.cascade for f, g in zip(cascade.per_example[c["row"]], full.per_example[c["row"]])
        if f is not None)
    t_full, t_cascade = statistics.median(times["per_attack"]), statistics.median(times["cascade"])
    seconds = {r.name: {"per_attack": full.attacks[i].seconds, "cascade": cascade.attacks[i].seconds}
               for i, r in enumerate(full.attacks)}
    later = [c for c in cascade.cascade if not c["every_example"]]
    # What any cascade of these rows could save at best: the later rows' share of the per-attack time, times the
    # fraction of examples they need not attack (each must still attack every example robust to all of them).
    share = sum(seconds[c["row"]]["per_attack"] for c in later) / full.elapsed_seconds
    floor = 1.0 - share * (1.0 - cascade.worst_case["accuracy"])
    return {
        "eps": eps_text,
        "survivor_fraction": round(later[0]["attacked"] / cascade.n_examples, 4) if later else None,
        "seconds": {"per_attack": times["per_attack"], "cascade": times["cascade"]},
        "median_seconds": {"per_attack": round(t_full, 2), "cascade": round(t_cascade, 2)},
        "time_ratio_cascade_over_per_attack": round(t_cascade / t_full, 3),
        "later_rows_share_of_per_attack_time": round(share, 3),
        "ratio_floor_for_this_robust_accuracy": round(floor, 3),
        "natural_accuracy": full.natural_accuracy,
        "worst_case": {"per_attack": full.worst_case["accuracy"], "cascade": cascade.worst_case["accuracy"],
                       "n_correct": cascade.worst_case["n_correct"], "n": cascade.n_examples},
        "equal": {"worst_case_per_example": same_worst, "cascade_accounting_per_row": same_rows,
                  "rows_where_attacked": same_where_attacked},
        "cascade": cascade.cascade,
        "row_seconds_last_repeat": seconds,
        "summary": {"per_attack": full.summary()["accuracy"], "cascade": cascade.summary()["accuracy"],
                    "cascade_upper_bounds": cascade.summary()["upper_bounds"]},
        "checks": {"per_attack": {c.name: c.passed for c in full.checks},
                   "cascade": {c.name: c.passed for c in cascade.checks}},
    }


def markdown(h: dict, r: dict) -> str:
    lines = [f"## eps {r['eps']}", "",
             f"- model: {h['model']}; data: {h['data']}; suite {h['suite']} with the "
             f"gradient-masking checks; batch {h['batch_size']}; {h['device']}, {h['threads']} thread(s); "
             f"{h['repeats']} interleaved repeats, median",
             f"- examples the cascade's later rows start from (correct under natural, FGSM, PGD-20, noise): "
             f"{100 * (r['survivor_fraction'] or 0):.1f} %",
             f"- time: per-attack {r['median_seconds']['per_attack']:.1f} s, cascade "
             f"{r['median_seconds']['cascade']:.1f} s: **ratio {r['time_ratio_cascade_over_per_attack']:.3f}**",
             f"- the later rows (those the cascade runs on survivors) take "
             f"{100 * r['later_rows_share_of_per_attack_time']:.0f} % of the per-attack time; as each must still attack every example robust to all rows "
             f"({100 * r['worst_case']['cascade']:.1f} %), no cascade of these rows gets below a ratio of "
             f"{r['ratio_floor_for_this_robust_accuracy']:.3f} here",
             f"- worst case: per-attack {100 * r['worst_case']['per_attack']:.2f} %, cascade "
             f"{100 * r['worst_case']['cascade']:.2f} % ({r['worst_case']['n_correct']}/{r['worst_case']['n']}); "
             f"identical per example: **{r['equal']['worst_case_per_example']}**; each row's newly fooled / robust "
             f"after identical: {r['equal']['cascade_accounting_per_row']}; cascade rows identical where they ran: "
             f"{r['equal']['rows_where_attacked']}",
             f"- natural accuracy {100 * r['natural_accuracy']:.2f} %", "",
             "| row (in cascade order) | attacked | newly fooled | robust after | s per-attack | s cascade |",
             "|---|---|---|---|---|---|"]
    for c in r["cascade"]:
        s = r["row_seconds_last_repeat"][c["row"]]
        lines.append(f"| {c['row']} | {c['attacked']} | {c['newly_fooled']} | {c['robust_after']} | "
                     f"{s['per_attack']:.1f} | {s['cascade']:.1f} |")
    lines += ["", "The remaining time in both modes is the check-only attacks (PGD-20 at 128/255, final-logit PGD-20) "
              "and the gradient probe, which run on every example in both.", "",
              "Checks: per-attack " + ", ".join(f"{k} {v}" for k, v in r["checks"]["per_attack"].items()),
              "", "Checks: cascade " + ", ".join(f"{k} {v}" for k, v in r["checks"]["cascade"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
