"""The ``casify`` command line. One function per subcommand: ``add_<name>_parser`` declares it, ``cmd_<name>`` runs it;
register a new subcommand by adding its ``add_*_parser`` to :data:`SUBCOMMANDS`. All argument parsing lives here; the
subcommands call the library's plain functions (:func:`casify.evaluate.evaluate`, :func:`casify.analysis.run_analysis`).

    casify eval MODEL --data digits --split test --suite standard --eps 8/255 --max-examples 1000 --out runs/eval
    casify analyze MODEL --data digits --layer layer4.1 --out runs/analysis --tsne

``--out`` folders are handled by :mod:`casify.output_dir`: a non-empty folder is refused; ``--overwrite`` replaces a
folder casify wrote (never one it did not); a run's files appear all at once, when it has finished.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .eps import parse_eps
from .evaluate import SUITES
from .output_dir import OutputDirError, output_dir, prepare_output_dir


def _eps_arg(text: str) -> float:
    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _radius_arg(text: str) -> float:
    """A radius under either norm (``8/255``, ``0.5``, ``2.0``); checked against ``--norm`` by :func:`_check_radii`."""
    from .threat_model import parse_radius
    try:
        return parse_radius(text, "l2")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_radii(command: str, norm: str, *radii) -> None:
    """L-inf radii are pixel units in [0, 1] (``8``, not ``8/255``, is a mistake); L2 radii may exceed 1."""
    for eps in radii:
        if eps is not None and norm == "linf" and eps > 1:
            raise SystemExit(f"casify {command}: error: eps {eps:g} is outside [0, 1]: under --norm linf eps is in "
                             "pixel units, write 8/255, not 8 (an L2 radius above 1 needs --norm l2)")


def _add_norm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norm", default="linf", choices=("linf", "l2"),
                   help="threat model: linf (default; eps like 8/255) or l2 (eps a Euclidean radius, e.g. 0.5)")


# -- eval ------------------------------------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate a saved model's robustness (report + gradient-masking checks)",
        description="Evaluate a model saved with save_pretrained (a folder or a Hub id) under white-box, adaptive and "
                    "optional black-box attacks, scored on the deployed model (eval mode, predicted routing).")
    p.add_argument("model", help="folder written by save_pretrained, or a Hub repo id")
    p.add_argument("--data", required=True, help="dataset name or path (digits, cifar10, imagefolder:<root>, x.npz)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--data-root", default=None, help="where named datasets live (default $CASIFY_DATA or ./data)")
    p.add_argument("--suite", default="standard", choices=SUITES)
    p.add_argument("--eps", type=_radius_arg, default=8 / 255,
                   help="radius in pixel units: 8/255 (default) under --norm linf, e.g. 0.5 under --norm l2")
    _add_norm(p)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where the model is)")
    p.add_argument("--autoattack", action="store_true", help="also run AutoAttack (standard version) on the deployed logits")
    p.add_argument("--transfer-from", default=None, help="surrogate model folder / Hub id for a transfer attack")
    p.add_argument("--square-queries", type=int, default=0, help="query budget of a Square attack (0: none)")
    p.add_argument("--eps-sweep", type=_radius_arg, nargs="+", default=None, metavar="EPS",
                   help="radii of the robustness curve, e.g. 2/255 4/255 16/255: the same attacks rerun at each, worst "
                        "case per example (robustness_curve.png)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model once for the whole evaluation")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights (faster convolutions on GPUs/CPUs)")
    p.add_argument("--per-attack", action="store_true",
                   help="run every attack on every example (the full table, each attack's own accuracy); default: a "
                        "cascade, strongest attacks first, each only on the examples still robust (same worst case)")
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="folder for eval_report.json and eval_report.md (new or empty; see "
                                               "--overwrite)")
    _add_overwrite(p)
    p.add_argument("--fail-on-masking", action="store_true", help="exit with status 2 when a check fails")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .evaluate import evaluate
    from .hub import from_pretrained

    _check_radii("eval", args.norm, args.eps, *(args.eps_sweep or []))
    if args.out:
        prepare_output_dir(args.out, args.overwrite)  # refuse before the evaluation, not after it
    model = from_pretrained(args.model)
    source = model
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:  # attacks, routing and scoring all run through the one compiled module
        model = torch.compile(model, backend=args.compile_backend)
    dataset = build_dataset(args.data, args.split, root=args.data_root)
    report = evaluate(model, dataset, attacks=args.suite, eps=args.eps, batch_size=args.batch_size,
                      max_examples=args.max_examples, seed=args.seed, device=args.device,
                      progress=not args.no_progress, autoattack=args.autoattack, transfer_from=args.transfer_from,
                      square_queries=args.square_queries, eps_sweep=args.eps_sweep, checks=not args.no_checks,
                      per_attack=args.per_attack, norm=args.norm)
    report.model["source"] = args.model
    report.model["class"] = type(source).__name__
    report.model.update(compiled=bool(args.compile), channels_last=bool(args.channels_last))
    report.dataset = f"{args.data} ({args.split})"
    print(report.to_markdown())
    if args.out:
        with output_dir(args.out, args.overwrite, command="eval", argv=getattr(args, "argv", None)) as staging:
            report.save(staging)
        print(f"wrote {Path(args.out) / 'eval_report.json'}, {Path(args.out) / 'eval_report.md'} and the figures "
              f"{', '.join(str(Path(args.out) / f) for f in report.figures.values())}")
    return 2 if args.fail_on_masking and report.gradient_masking_suspected else 0


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier casify output (all its files are deleted); a folder "
                        "casify did not write is never touched")


# -- analyze ---------------------------------------------------------------------------------------------------------
def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """``casify analyze MODEL --data ... [--layer ...] --out DIR``."""
    from .analysis import CAS_SIDES

    p = subparsers.add_parser(
        "analyze", help="channel-wise activation magnitude / frequency (paper Sec. 3) of natural vs PGD examples",
        description="Capture the channel-wise activation of natural and PGD adversarial examples at one layer, write "
                    "the paper's Figure 1 (magnitude) and Figure 2 (frequency) plots and a JSON + markdown report. "
                    "At a CAS layer the activation is taken before the channel mask (the CAS module's input; the same "
                    "point as the layer's output in a model without CAS); the report states the capture point.")
    p.add_argument("model", help="a folder written by save_pretrained, or a Hub repo id")
    p.add_argument("--data", required=True,
                   help="dataset: digits, cifar10, cifar100, svhn, imagefolder:<root>, or an .npz file")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--data-root", "--data_root", dest="data_root", help="where torchvision datasets live")
    p.add_argument("--layer", help="module or graph-node name (casify.list_layers); default: the last CAS layer, "
                                   "else the last feature stage")
    p.add_argument("--cas-side", "--cas_side", dest="cas_side", choices=CAS_SIDES, default="before",
                   help="at a CAS layer, the activation before the channel mask (default: the CAS module's input) "
                        "or after it")
    p.add_argument("--class-index", "--class_index", dest="class_index", type=int, default=0,
                   help="the class of the frequency plot (default 0)")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="active = above this fraction of the example's largest channel (default 0.01)")
    p.add_argument("--eps", type=_eps_arg, default=8 / 255, help="L-inf radius in pixels, e.g. 8/255 (default)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--objective", default="auto", help="attack objective; auto: cas on CAS models, else ce")
    p.add_argument("--max-examples", "--max_examples", dest="max_examples", type=int, default=1000)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=128)
    p.add_argument("--tsne", action="store_true", help="also write tsne.png (penultimate features, Figure 9)")
    p.add_argument("--tsne-examples", "--tsne_examples", dest="tsne_examples", type=int, default=500)
    p.add_argument("--out", required=True, help="output folder for the PNGs, channel_report.json and "
                                                "channel_report.md (new or empty; see --overwrite)")
    _add_overwrite(p)
    p.add_argument("--device", help="e.g. cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_analyze)
    return p


def cmd_analyze(args: argparse.Namespace) -> int:
    """``casify analyze``: load the model and data, run :func:`casify.analysis.run_analysis` into a staging folder
    that replaces ``--out`` at the end, and print the report's scalars as JSON."""
    import torch

    from .analysis import run_analysis
    from .data import build_dataset
    from .hub import from_pretrained

    prepare_output_dir(args.out, args.overwrite)  # refuse before loading anything
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = from_pretrained(args.model).to(device)
    input_size = model.casify_config.get("cas", {}).get("input_size")
    kwargs = {}
    if input_size and args.data == "digits":
        kwargs = {"size": int(input_size[-1]), "channels": int(input_size[0])}
    dataset = build_dataset(args.data, args.split, root=args.data_root,
                            image_size=int(input_size[-1]) if input_size else None, **kwargs)
    with output_dir(args.out, args.overwrite, command="analyze", argv=getattr(args, "argv", None)) as staging:
        report = run_analysis(model, dataset, args.layer, staging, tsne=args.tsne, tsne_examples=args.tsne_examples,
                              eps=args.eps, steps=args.steps, attack_objective=args.objective,
                              class_index=args.class_index, threshold=args.threshold, cas_side=args.cas_side,
                              max_examples=args.max_examples, batch_size=args.batch_size, seed=args.seed,
                              device=device)
    out = Path(args.out)
    report.figures = {k: str(out / Path(v).name) for k, v in report.figures.items()}  # where they are now
    print(json.dumps(report.summary(), indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


# -- compare ---------------------------------------------------------------------------------------------------------
def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """``casify compare A B [C ...]``: models or report folders side by side on the same images, eps and suite."""
    p = subparsers.add_parser(
        "compare", help="put models (or their eval reports) side by side: one table, paired statistics, curves",
        description="Compare saved models or report folders (casify eval --out) on the same images, eps and suite: "
                    "one table (natural, each attack family, worst case), paired per-image statistics of every "
                    "model against the first (McNemar, 95 %% intervals) and the robustness curves overlaid. "
                    "Reports made on different images, eps, norm or suite are refused. A model folder is evaluated "
                    "first (needs --data). Several runs of one model (seeds): A_s0,A_s1,A_s2 B_s0,B_s1,B_s2.")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_REPORT",
                   help="report folders, eval_report.json files or model folders; comma-separated runs of one model")
    p.add_argument("--labels", nargs="+", default=None, help="a name per model (default: folder names)")
    p.add_argument("--data", default=None, help="dataset to evaluate model folders on (as casify eval --data)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--suite", default="standard", choices=SUITES)
    p.add_argument("--eps", type=_radius_arg, default=8 / 255, help="radius for model folders (default 8/255)")
    _add_norm(p)
    p.add_argument("--eps-sweep", type=_radius_arg, nargs="+", default=None, metavar="EPS")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--per-attack", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="folder for compare_report.json / .md and robustness_curves.png")
    _add_overwrite(p)
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluate import IncomparableReports, compare_models

    _check_radii("compare", args.norm, args.eps, *(args.eps_sweep or []))
    if args.out:
        prepare_output_dir(args.out, args.overwrite)
    kwargs = {}
    if args.data:
        from .data import build_dataset
        kwargs = dict(dataset=build_dataset(args.data, args.split, root=args.data_root), attacks=args.suite,
                      eps=args.eps, norm=args.norm, eps_sweep=args.eps_sweep, max_examples=args.max_examples,
                      batch_size=args.batch_size, seed=args.seed, device=args.device, per_attack=args.per_attack,
                      progress=not args.no_progress)
    arms = [m.split(",") if "," in m else m for m in args.models]
    try:
        result = compare_models(arms, labels=args.labels, **kwargs)
    except (IncomparableReports, ValueError) as e:
        print(f"casify compare: error: {e}", file=sys.stderr)
        return 1
    print(result.to_markdown())
    if args.out:
        with output_dir(args.out, args.overwrite, command="compare", argv=getattr(args, "argv", None)) as staging:
            result.save(staging)
        print(f"wrote {Path(args.out)}", file=sys.stderr)
    return 0


# -- benchmark -------------------------------------------------------------------------------------------------------
def add_benchmark_parser(subparsers) -> argparse.ArgumentParser:
    """``casify benchmark MODEL --data cifar10 --threat-model Linf|L2|corruptions``: RobustBench's convention."""
    p = subparsers.add_parser(
        "benchmark", help="RobustBench-style clean and robust accuracy (Linf, L2, corruptions) + model-info JSON",
        description="RobustBench's benchmark() without robustbench: clean and robust accuracy on the first "
                    "--n-examples test images; robust = casify's adaptive worst case (suite + AutoAttack) for Linf "
                    "and L2, mean corruption accuracy (5 severities) for corruptions. --model-info-dir writes "
                    "<dir>/<data>/<threat model>/<name>.json with RobustBench's field names plus casify's.")
    p.add_argument("model", help="folder written by save_pretrained, or a Hub repo id")
    p.add_argument("--data", default="cifar10", help="dataset name or path (default cifar10)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threat-model", default="Linf", choices=("Linf", "L2", "corruptions"))
    p.add_argument("--eps", type=_radius_arg, default=None, help="default: the leaderboard's (8/255 Linf, 0.5 L2)")
    p.add_argument("--n-examples", type=int, default=10000)
    p.add_argument("--suite", default="standard", choices=SUITES)
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (autoattack_acc is then null)")
    p.add_argument("--corruptions", nargs="+", default=None, help="corruption names (default: casify's 10)")
    p.add_argument("--corruptions-dir", default=None, help="read the released CIFAR-10-C .npy arrays from here")
    p.add_argument("--model-name", default=None, help="the JSON's name (default: the model folder's name)")
    p.add_argument("--model-info-dir", default=None, help="write the model-info JSON and the report under it")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_benchmark)
    return p


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .evaluate import benchmark_info

    _check_radii("benchmark", "linf" if args.threat_model == "Linf" else "l2", args.eps)
    info = benchmark_info(args.model, args.n_examples, args.data, args.threat_model, eps=args.eps,
                          data_dir=args.data_root, device=args.device, batch_size=args.batch_size, attacks=args.suite,
                          autoattack=not args.no_autoattack, seed=args.seed, model_name=args.model_name,
                          to_disk=args.model_info_dir is not None, model_info_dir=args.model_info_dir or "model_info",
                          corruptions=args.corruptions, corruptions_dir=args.corruptions_dir,
                          progress=not args.no_progress)
    c = info["casify"]
    print(json.dumps({k: v for k, v in info.items() if k != "casify" and v is not None}, indent=1))
    line = f"clean {100 * c['clean_acc']:.2f} %, robust {100 * c['robust_acc']:.2f} % ({c['robust_acc_definition']})"
    if info.get("autoattack_acc") is not None:
        line += f"; AutoAttack alone {info['autoattack_acc']} %"
    print(line)
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
SUBCOMMANDS: List[Callable] = [add_eval_parser, add_analyze_parser, add_compare_parser, add_benchmark_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casify",
                                     description="Channel-wise Activation Suppressing for PyTorch models")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the marker of the output folder
    try:
        return int(args.func(args) or 0)
    except OutputDirError as e:
        print(f"casify {args.command}: error: {e}", file=sys.stderr)
        return 1


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``casify eval`` with ``argv`` as its arguments (what ``recipes/evaluate.py`` runs)."""
    return main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
