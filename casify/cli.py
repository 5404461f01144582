"""The ``casify`` commands. The options are declared in :mod:`casify_cli` (outside the package, so ``casify --help``
imports no torch), which calls :func:`run` once a subcommand is parsed; here each subcommand's ``cmd_<name>`` runs
it with the library's plain functions. Nothing here imports :mod:`casify_cli` back: the launcher is the top.

    casify train --config recipes/configs/digits_tiny_at_cas.yaml
    casify eval MODEL --data digits --split test --suite standard --eps 8/255 --max-examples 1000 --out runs/eval
    casify analyze MODEL --data digits --layer layer4.1 --out runs/analysis --tsne
    casify layers resnet18
    casify push FOLDER user/name

Errors the user can fix (a bad option, a folder that is not a model, a refused ``--out``) print one line naming the
fix and exit with status 1; ``--debug`` shows the traceback instead. ``--out`` folders are handled by
:mod:`casify.io.output_dir`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

from .data.data_fit import check_data_fits
from .io.output_dir import OutputDirError, output_dir, prepare_output_dir


def _check_radii(command: str, norm: str, *radii) -> None:
    """L-inf radii are pixel units in [0, 1] (``8``, not ``8/255``, is a mistake); L2 radii may exceed 1."""
    for eps in radii:
        if eps is not None and norm == "linf" and eps > 1:
            raise SystemExit(f"casify {command}: error: eps {eps:g} is outside [0, 1]: under --norm linf eps is in "
                             "pixel units, write 8/255, not 8 (an L2 radius above 1 needs --norm l2)")


# -- eval ------------------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import build_dataset
    from .evaluate import evaluate
    from .model.source import load_model

    _check_radii("eval", args.norm, args.eps, *(args.eps_sweep or []))
    if args.out:
        prepare_output_dir(args.out, args.overwrite)  # refuse before the evaluation, not after it
    model = load_model(args.model, args.arch)
    source = model
    dataset = build_dataset(args.data, args.split, root=args.data_root)  # evaluate() checks that it fits the model
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:  # attacks, routing and scoring all run through the one compiled module
        model = torch.compile(model, backend=args.compile_backend)
    report = evaluate(model, dataset, attacks=args.suite, eps=args.eps, batch_size=args.batch_size,
                      max_examples=args.max_examples, seed=args.seed, device=args.device,
                      progress=not args.no_progress, autoattack=args.autoattack, transfer_from=args.transfer_from,
                      square_queries=args.square_queries, eps_sweep=args.eps_sweep, checks=not args.no_checks,
                      per_attack=args.per_attack, norm=args.norm)
    report.model["source"] = args.model
    report.model["class"] = type(source).__name__
    report.model.update(compiled=bool(args.compile), channels_last=bool(args.channels_last))
    print(report.to_markdown(json_beside=bool(args.out)))
    if args.out:
        with output_dir(args.out, args.overwrite, command="eval", argv=getattr(args, "argv", None)) as staging:
            report.save(staging)
        print(f"wrote {Path(args.out) / 'eval_report.json'}, {Path(args.out) / 'eval_report.md'} and the figures "
              f"{', '.join(str(Path(args.out) / f) for f in report.figures.values())}")
    return 2 if args.fail_on_masking and report.gradient_masking_suspected else 0


# -- analyze ---------------------------------------------------------------------------------------------------------
def cmd_analyze(args: argparse.Namespace) -> int:
    """``casify analyze``: load the model and data, run :func:`casify.analysis.run_analysis` into a staging folder
    that replaces ``--out`` at the end, and print the report's scalars as JSON."""
    import torch

    from .analysis import run_analysis
    from .data import build_dataset
    from .model.source import load_model

    prepare_output_dir(args.out, args.overwrite)  # refuse before loading anything
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, getattr(args, "arch", None)).to(device)
    input_size = model.casify_config.get("cas", {}).get("input_size")
    kwargs = {}
    if input_size and args.data == "digits":
        kwargs = {"size": int(input_size[-1]), "channels": int(input_size[0])}
    dataset = build_dataset(args.data, args.split, root=args.data_root,
                            image_size=int(input_size[-1]) if input_size else None, **kwargs)
    check_data_fits(model, dataset, f"--data {args.data} (--split {args.split})")
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
    from .model.source import load_model
    arms = [m.split(",") if "," in m else m for m in args.models]
    try:  # a model is loaded as casify eval loads it: folders, Hub ids, weights files, --arch
        result = compare_models(arms, labels=args.labels, load_model=lambda name: load_model(name, args.arch),
                                **kwargs)
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


# -- layers ----------------------------------------------------------------------------------------------------------
def layers_table(layers) -> str:
    """A plain-text table: name, output shape (batch of one), channel layout, channels."""
    rows = [("name", "shape", "layout", "channels")]
    rows += [(layer.name, "x".join(str(d) for d in layer.shape[1:]), str(layer.layout.value),
              "" if layer.channels is None else str(layer.channels)) for layer in layers]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def cmd_layers(args: argparse.Namespace) -> int:
    from .core.discovery import list_layers
    from .model.source import build_named

    model = build_named(args.model, args.arch)
    layers = list_layers(model, input_size=args.input_size, modules_only=not args.all, features=args.features)
    print(layers_table(layers))
    print(f"\n{len(layers)} places; pass names to casify.wrap(model, layers=[...]) or model.cas_layers in a recipe",
          file=sys.stderr)
    return 0


# -- push ------------------------------------------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace) -> int:
    from .io.push import push_folder

    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: pass a folder written by save_pretrained / "
                         "write_hub_folder (a training run's hub/ folder)")
    push_folder(folder, args.repo_id, private=args.private, force=args.force, commit_message=args.message,
                retry_hint=False)
    print(f"pushed {folder} to https://huggingface.co/{args.repo_id}")
    return 0


# -- train -----------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import CommandLine, load_recipe
    from .recipe import run as run_recipe

    run_recipe(load_recipe(args.config, CommandLine.from_args(args)))
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "eval": cmd_eval, "analyze": cmd_analyze, "layers": cmd_layers, "push": cmd_push,
    "compare": cmd_compare, "benchmark": cmd_benchmark}


def _user_errors() -> tuple:
    """Exceptions whose message is the whole story (casify's own, and the ValueError / OSError family of bad input)."""
    from .core.config_validation import LoadError
    from .io.hub_access import HubAccessError
    from .io.push import PublishRefused, PushFailed
    from .train import RunFolderError, RunMismatchError
    return (OutputDirError, LoadError, HubAccessError, PublishRefused, PushFailed, RunMismatchError, RunFolderError,
            ValueError,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def check_device(name: Optional[str]) -> None:
    """``--device``: a device torch knows and this machine has, checked before any model is loaded (not a CUDA
    error from deep inside the first ``.to()``)."""
    if not name:
        return
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name} is not a device name: use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                             "False); use --device cpu, or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu")


def _run_command(command, args: argparse.Namespace) -> int:
    check_device(getattr(args, "device", None))
    return int(command(args) or 0)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; a user error prints ``casify <command>: error: <message>`` (one line naming the fix)
    and returns 1, with the traceback under ``--debug``."""
    command = COMMANDS[args.command]
    if getattr(args, "debug", False):
        return _run_command(command, args)
    try:
        return _run_command(command, args)
    except _user_errors() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"casify {args.command}: error: {message}\n(--debug shows the traceback)", file=sys.stderr)
        return 1
