"""The ``casify`` command's grammar: every subcommand's options, parsed without importing torch or casify.

Why a top-level module outside the package: importing anything under ``casify`` runs ``casify/__init__.py``, which
imports torch and timm (it registers casify's models with timm, which ``import casify`` promises). ``casify --help``
and ``casify --version`` must answer at once, so the options live here and the commands themselves
(:mod:`casify.cli`) are imported only once a subcommand runs.

Every ``--long-option`` is accepted with dashes and with underscores (``--max-examples`` and ``--max_examples``).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

SUITES = ("quick", "standard")  # casify.evaluate.SUITES (tests/test_cli.py keeps the two equal)
CAS_SIDES = ("before", "after")  # casify.analysis.CAS_SIDES
METHODS = ("standard", "at", "trades", "mart")  # casify.train.METHODS


def version() -> str:
    """casify's version, read from ``casify/version.py`` without importing the package."""
    spec = importlib.util.find_spec("casify")
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    found = re.search(r'__version__\s*=\s*["\']([^"\']+)["\']', text)
    return found.group(1) if found else "unknown"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` states each option's default, as ``ArgumentDefaultsHelpFormatter`` does, except where the help text
    already says it or there is nothing to state (no default, a flag that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that accepts every long option spelled with dashes and with underscores, and whose help
    shows the defaults (:class:`DefaultsFormatter`; subcommands' parsers are of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        spellings = list(names)
        for name in names:
            if name.startswith("--"):
                for other in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if other not in spellings:
                        spellings.append(other)
        return super().add_argument(*spellings, **kwargs)


def eps_arg(text: str) -> float:
    """A radius as ``8/255``, read by casify's one parser (:func:`casify.core.eps.parse_eps`; imported only when an option
    is converted, so ``--help`` imports nothing)."""
    from casify.core.eps import parse_eps
    try:
        return parse_eps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def radius_arg(text: str) -> float:
    """A radius under either norm (``8/255``, ``0.5``, ``2.0``), checked against ``--norm`` when the command runs
    (:func:`casify.cli._check_radii`); casify's parser is imported only when an option is converted."""
    from casify.attacks.threat_model import parse_radius
    try:
        return parse_radius(text, "l2")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _norm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norm", default="linf", choices=("linf", "l2"),
                   help="threat model: linf (default; eps like 8/255) or l2 (eps a Euclidean radius, e.g. 0.5)")


def _running(p: argparse.ArgumentParser) -> None:
    """How an evaluation runs (the same options for eval, compare and benchmark): batch, seed, device, progress."""
    p.add_argument("--batch-size", type=int, default=128, help="examples per attack batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: where the model is)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


SUITE_HELP = ("attacks: quick (FGSM, PGD-20, CW-20, and for CAS models straight-through PGD) or standard (quick + "
              "PGD-100, APGD, each auxiliary head alone, fixed routings); standard on every image of a dataset takes "
              "hours on a CPU: try {option} 500 first")
CASCADE_HELP = ("run every attack on every example (the full table, each attack's own accuracy); default: a cascade, "
                "as AutoAttack runs: natural, FGSM, PGD-20 and noise on every example, then the other attacks in a "
                "fixed order (straight-through PGD, APGD, CW, PGD-100, each head, fixed routings, AutoAttack, "
                "black-box), each only on the examples every earlier one left correct (the same worst case, faster)")


def _suite(p: argparse.ArgumentParser, examples_option: str = "--max-examples") -> None:
    p.add_argument("--suite", default="standard", choices=SUITES, help=SUITE_HELP.format(option=examples_option))


def _max_examples(p: argparse.ArgumentParser, default: Optional[int] = None) -> None:
    p.add_argument("--max-examples", type=int, default=default,
                   help="use the first N examples" + ("" if default else " (default: all)"))


def _debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error (by default: one line naming the fix)")


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier casify output (all its files are deleted); a folder "
                        "casify did not write is never touched")


def _model(p: argparse.ArgumentParser, what: str = "the model") -> None:
    p.add_argument("model", help=f"{what}: a folder written by save_pretrained, a Hub repo id, or a weights file "
                                 "(.pth / .safetensors: casify's shared models by file name, others with --arch)")
    p.add_argument("--arch", default=None, metavar="MODULE:FACTORY",
                   help="your own architecture: MODULE:FACTORY is imported (from the current folder too) and "
                        "FACTORY() must return the un-wrapped model; needed for a folder whose base is a custom "
                        "architecture and for a weights file of one. Only ever imported when given here")


# -- subcommands ---------------------------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate a saved model's robustness (report + gradient-masking checks)",
        description="Evaluate a model under white-box, adaptive and optional black-box attacks, scored on the "
                    "deployed model (eval mode, predicted routing).")
    _model(p)
    p.add_argument("--data", required=True, help="dataset name or path (digits, cifar10, imagefolder:<root>, x.npz)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split of --data")
    p.add_argument("--data-root", default=None, help="where named datasets live (default $CASIFY_DATA or ./data)")
    _suite(p)
    p.add_argument("--eps", type=radius_arg, default="8/255",
                   help="radius in pixel units: 8/255 (default) under --norm linf, e.g. 0.5 under --norm l2")
    _norm(p)
    _max_examples(p)
    _running(p)
    p.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack (standard version) on the deployed logits")
    p.add_argument("--transfer-from", default=None, help="surrogate model folder / Hub id for a transfer attack")
    p.add_argument("--square-queries", type=int, default=0, help="query budget of a Square attack (0: none)")
    p.add_argument("--eps-sweep", type=radius_arg, nargs="+", default=None, metavar="EPS",
                   help="radii of the robustness curve, e.g. 2/255 4/255 16/255: the same attacks rerun at each, worst "
                        "case per example (robustness_curve.png)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model once for the whole evaluation")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights (faster convolutions on GPUs/CPUs)")
    p.add_argument("--per-attack", action="store_true", help=CASCADE_HELP)
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--out", default=None, help="folder for eval_report.json and eval_report.md (new or empty; see "
                                               "--overwrite)")
    _overwrite(p)
    p.add_argument("--fail-on-masking", action="store_true", help="exit with status 2 when a check fails")
    _debug(p)
    p.set_defaults(command="eval")
    return p


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="channel-wise activation magnitude / frequency (paper Sec. 3) of natural vs PGD examples",
        description="Capture the channel-wise activation of natural and PGD adversarial examples at one layer, write "
                    "the paper's Figure 1 (magnitude) and Figure 2 (frequency) plots and a JSON + markdown report. "
                    "At a CAS layer the activation is taken before the channel mask (the CAS module's input; the same "
                    "point as the layer's output in a model without CAS); the report states the capture point.")
    _model(p)
    p.add_argument("--data", required=True,
                   help="dataset: digits, cifar10, cifar100, svhn, imagefolder:<root>, or an .npz file")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split of --data")
    p.add_argument("--data-root", default=None, help="where torchvision datasets live")
    p.add_argument("--layer", help="module or graph-node name (casify layers MODEL lists them); default: the last "
                                   "CAS layer, else the last feature stage")
    p.add_argument("--cas-side", choices=CAS_SIDES, default="before",
                   help="at a CAS layer, the activation before the channel mask (default: the CAS module's input) "
                        "or after it")
    p.add_argument("--class-index", type=int, default=0, help="the class of the frequency plot (default 0)")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="active = above this fraction of the example's largest channel (default 0.01)")
    p.add_argument("--eps", type=eps_arg, default="8/255", help="L-inf radius in pixels, e.g. 8/255 (default)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--objective", default="auto", help="attack objective; auto: cas on CAS models, else ce")
    _max_examples(p, 1000)
    p.add_argument("--batch-size", type=int, default=128, help="examples per batch")
    p.add_argument("--tsne", action="store_true", help="also write tsne.png (penultimate features, Figure 9)")
    p.add_argument("--tsne-examples", type=int, default=500, help="examples in the t-SNE plot")
    p.add_argument("--out", required=True, help="output folder for the PNGs, channel_report.json and "
                                                "channel_report.md (new or empty; see --overwrite)")
    _overwrite(p)
    p.add_argument("--device", help="e.g. cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's random start and the t-SNE")
    _debug(p)
    p.set_defaults(command="analyze")
    return p


def add_layers_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "layers", help="list where a defense can go in a model: name, output shape, channel layout",
        description="Trace MODEL and print every place CAS can go (the names casify.wrap(model, layers=...) "
                    "accepts), with its output shape for one input and where the channels are.")
    p.add_argument("model", help="a timm name (resnet18, cifar_resnet18), torchvision:<name>, a saved folder, a Hub "
                                 "repo id or a weights file (built without pretrained weights: only shapes matter)")
    p.add_argument("--arch", default=None, metavar="MODULE:FACTORY", help="your own architecture (see casify eval)")
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="the input used to find shapes (default: the model's own, else 3 224 224)")
    p.add_argument("--all", action="store_true", help="graph nodes too (call sites), not only module outputs")
    p.add_argument("--features", action="store_true",
                   help="(N, C) feature vectors too (an MLP head's hidden layer: CAS only, named explicitly)")
    _debug(p)
    p.set_defaults(command="layers")
    return p


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push", help="upload a saved model folder (model, card, reports) to the Hugging Face Hub",
        description="Upload FOLDER (config.json, model.safetensors, README.md, eval_report.*, *.png; nothing else) "
                    "to REPO_ID. The Hub and the token's write access are checked first. A model whose own "
                    "evaluation flagged gradient masking, or whose natural accuracy is at chance, is refused unless "
                    "--force is given.")
    p.add_argument("folder", help="a folder written by write_hub_folder / a training run's hub/ folder")
    p.add_argument("repo_id", help="the Hub repo, user/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--force", action="store_true",
                   help="push even if the evaluation flagged gradient masking or the model is at chance accuracy")
    p.add_argument("--message", default="Upload robust model trained with casify", help="the commit message")
    _debug(p)
    p.set_defaults(command="push")
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's options: ``casify train`` and ``recipes/finetune_*.py`` share them."""
    p.add_argument("--config", help="YAML file (see recipes/configs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.epochs=5 --set model.name=resnet18")
    p.add_argument("--output-dir", help="the run's folder (default: outputs/<named after the run>)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (0: train nothing)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh; a folder that holds a run is refused unless --overwrite is given too")
    p.add_argument("--overwrite", action="store_true", help="with --no_resume: delete the run already in output_dir")
    p.add_argument("--push-to-hub", action="store_true",
                   help="publish the selected model at the end (the Hub and the token are checked before training)")
    p.add_argument("--hub-model-id", help="the Hub repo, user/name")
    p.add_argument("--force-push", action="store_true",
                   help="publish even if the evaluation flagged gradient masking or the model is at chance accuracy")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="adversarial fine-tuning from a YAML recipe (what recipes/finetune_*.py run)",
        description="Train as the config says: python and accelerate launch run the same code. The method comes "
                    "from the config's `method:` or --method.")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="standard, at, trades or mart (default: the config's method:, else at)")
    add_train_arguments(p)
    _debug(p)
    p.set_defaults(command="train")
    return p


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """``casify compare A B [C ...]``: models or report folders side by side on the same images, eps and suite."""
    p = subparsers.add_parser(
        "compare", help="put models (or their eval reports) side by side: one table, paired statistics, curves",
        description="Compare saved models or report folders (casify eval --out) on the same images, eps and suite: "
                    "one table (natural, each attack family, worst case), paired per-image statistics of every "
                    "model against the first (McNemar, 95 % intervals) and the robustness curves overlaid. "
                    "Reports made on different images, eps, norm or suite are refused. A model folder is evaluated "
                    "first (needs --data). Several runs of one model (seeds): A_s0,A_s1,A_s2 B_s0,B_s1,B_s2.")
    p.add_argument("models", nargs="+", metavar="MODEL_OR_REPORT",
                   help="report folders or eval_report.json files, or models as casify eval takes them (folders, Hub "
                        "ids, weights files); comma-separated runs of one model")
    p.add_argument("--arch", default=None, metavar="MODULE:FACTORY",
                   help="your own architecture, for model folders and weights files of it (see casify eval)")
    p.add_argument("--labels", nargs="+", default=None, help="a name per model (default: folder names)")
    p.add_argument("--data", default=None, help="dataset to evaluate model folders on (as casify eval --data)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split of --data")
    p.add_argument("--data-root", default=None, help="where named datasets live (default $CASIFY_DATA or ./data)")
    _suite(p)
    p.add_argument("--eps", type=radius_arg, default="8/255", help="radius for model folders (default 8/255)")
    _norm(p)
    p.add_argument("--eps-sweep", type=radius_arg, nargs="+", default=None, metavar="EPS",
                   help="radii of the robustness curves (as casify eval --eps-sweep)")
    _max_examples(p)
    _running(p)
    p.add_argument("--per-attack", action="store_true", help=CASCADE_HELP)
    p.add_argument("--out", default=None, help="folder for compare_report.json / .md and robustness_curves.png")
    _overwrite(p)
    _debug(p)
    p.set_defaults(command="compare")
    return p


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
    p.add_argument("--data-root", default=None, help="where named datasets live (default $CASIFY_DATA or ./data)")
    p.add_argument("--threat-model", default="Linf", choices=("Linf", "L2", "corruptions"),
                   help="Linf or L2 (casify's adaptive worst case), or corruptions (mean corruption accuracy)")
    p.add_argument("--eps", type=radius_arg, default=None, help="default: the leaderboard's (8/255 Linf, 0.5 L2)")
    p.add_argument("--n-examples", type=int, default=10000, help="the first N test images, as RobustBench takes them")
    _suite(p, "--n-examples")
    p.add_argument("--no-autoattack", action="store_true",
                   help="skip AutoAttack: robust accuracy is then the suite's worst case alone, and autoattack_acc null")
    p.add_argument("--corruptions", nargs="+", default=None, help="corruption names (default: casify's 10)")
    p.add_argument("--corruptions-dir", default=None, help="read the released CIFAR-10-C .npy arrays from here")
    p.add_argument("--model-name", default=None, help="the JSON's name (default: the model folder's name)")
    p.add_argument("--model-info-dir", default=None, help="write the model-info JSON and the report under it")
    _running(p)
    _debug(p)
    p.set_defaults(command="benchmark")
    return p


SUBCOMMANDS = [add_train_parser, add_eval_parser, add_analyze_parser, add_layers_parser, add_push_parser,
               add_compare_parser, add_benchmark_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="casify", description="Channel-wise activation defenses (CAS) for pretrained PyTorch "
                                               "classifiers: wrap, fine-tune adversarially, evaluate, publish")
    parser.add_argument("--version", action="version", version=f"casify {version()}")
    _debug(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse (``--help`` and ``--version`` end here, torch never imported), then run the subcommand."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the marker of an output folder
    from casify.cli import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
