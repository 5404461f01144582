"""The ``casify`` command line. One function per subcommand: ``add_<name>_parser`` declares it, ``cmd_<name>`` runs it;
register a new subcommand by adding its ``add_*_parser`` to :data:`SUBCOMMANDS`.

    casify eval MODEL --data digits --split test --suite standard --eps 8/255 --max-examples 1000 --out runs/eval
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence

from .evaluate import SUITES, parse_eps


def _eps_arg(text: str) -> float:
    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    p.add_argument("--eps", type=_eps_arg, default=8 / 255, help="L-inf radius in pixels, e.g. 8/255 (default)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where the model is)")
    p.add_argument("--autoattack", action="store_true", help="also run AutoAttack (pip install casify[autoattack])")
    p.add_argument("--transfer-from", default=None, help="surrogate model folder / Hub id for a transfer attack")
    p.add_argument("--square-queries", type=int, default=0, help="query budget of a Square attack (0: none)")
    p.add_argument("--eps-sweep", type=_eps_arg, nargs="+", default=None, metavar="EPS",
                   help="radii for a PGD-20 sweep, e.g. 1/255 2/255 4/255 8/255 16/255 32/255")
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="folder for eval_report.json and eval_report.md")
    p.add_argument("--fail-on-masking", action="store_true", help="exit with status 2 when a check fails")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .evaluate import evaluate
    from .hub import from_pretrained

    model = from_pretrained(args.model)
    dataset = build_dataset(args.data, args.split, root=args.data_root)
    report = evaluate(model, dataset, attacks=args.suite, eps=args.eps, batch_size=args.batch_size,
                      max_examples=args.max_examples, seed=args.seed, device=args.device,
                      progress=not args.no_progress, autoattack=args.autoattack, transfer_from=args.transfer_from,
                      square_queries=args.square_queries, eps_sweep=args.eps_sweep, checks=not args.no_checks)
    report.model["source"] = args.model
    report.dataset = f"{args.data} ({args.split})"
    print(report.to_markdown())
    if args.out:
        out = report.save(args.out)
        print(f"wrote {out / 'eval_report.json'} and {out / 'eval_report.md'}")
    return 2 if args.fail_on_masking and report.gradient_masking_suspected else 0


# -- entry point -----------------------------------------------------------------------------------------------------
def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    from .analysis import add_analyze_parser as add
    parser = add(subparsers)
    parser.set_defaults(func=cmd_analyze)
    return parser


def cmd_analyze(args: argparse.Namespace) -> int:
    """``casify analyze``: channel-activation statistics and the paper's Figures 1, 2 (and 9 with --tsne)."""
    from .analysis import analyze_main
    analyze_main(args)
    return 0


SUBCOMMANDS: List[Callable] = [add_eval_parser, add_analyze_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casify",
                                     description="Channel-wise Activation Suppressing for PyTorch models")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return int(args.func(args) or 0)


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """``casify eval`` with ``argv`` as its arguments (what ``recipes/evaluate.py`` runs)."""
    return main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
