"""Follow a recipe's config as data: which casify files it passes through, in what order, from the command line
to the end of the run (issue 21's measurement).

A *visit* is a Python call, in a file of casify (or ``casify_cli.py``), that receives the config: an argument that is
the config mapping or one of its sections (the same objects, by identity), or a typed recipe / section / TrainConfig.
Consecutive visits in one file form a *stay*; entering a file that had an earlier stay is a *return*; moving from a
file to a file of a higher layer (the layers of ``tests/test_architecture.py``; ``casify_cli.py`` is the top) is a
*climb*. A config that flows one way enters each file once on its way down: stays == files, returns == 0.

    python benchmarks/config_walk.py [--out benchmarks/results/config_walk.json] [--label after]

It runs ``casify train`` on the embedded digits recipe for one step, in a temporary folder, with
``sys.setprofile`` (written by hand: no profiler reports "which calls receive this object").
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "recipes" / "configs" / "digits_tiny_at_cas.yaml"
TYPED = {"TrainConfig", "Recipe", "ModelSection", "DefenseSection", "DataSection", "TrainingAttack", "EvalSection",
         "HubSection", "RunSection"}


def layer_of() -> dict:
    """module name -> layer index, from the import-order test (the project's one statement of the layers)."""
    spec = importlib.util.spec_from_file_location("arch", ROOT / "tests" / "test_architecture.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    table = {module: i for i, (_, modules) in enumerate(arch.LAYERS) for module in modules}
    table["casify_cli"] = len(arch.LAYERS)
    return table


def module_of(filename: str):
    path = Path(filename).resolve()
    if path == ROOT / "casify_cli.py":
        return "casify_cli"
    try:
        rel = path.relative_to(ROOT / "casify")
    except ValueError:
        return None
    parts = ["casify", *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Walk:
    """The profile hook: records (module, function) for each call that receives the config."""

    def __init__(self):
        self.tracked: dict = {}  # id -> the object, kept alive so that no other object reuses its id
        self.visits: list = []

    def carries_config(self, value) -> bool:
        """The config mapping (a dict with model, data and train sections: copies count too), a section of one seen
        before (by identity), or a typed recipe / section."""
        if isinstance(value, dict):
            if id(value) in self.tracked:
                return True
            if {"model", "data", "train"} <= set(value):
                self.tracked.update((id(v), v) for v in value.values() if isinstance(v, dict))
                self.tracked[id(value)] = value
                return True
            return False
        return dataclasses.is_dataclass(value) and type(value).__name__ in TYPED

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        module = module_of(frame.f_code.co_filename)
        if module is None:
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if any(self.carries_config(frame.f_locals.get(n)) for n in names):
            self.visits.append((module, code.co_name))


def measure(argv: list) -> dict:
    import casify_cli
    walk = Walk()
    sys.setprofile(walk)
    try:
        rc = casify_cli.main(argv)
    finally:
        sys.setprofile(None)
    if rc:
        raise SystemExit(f"casify train failed ({rc})")
    return summarize(walk.visits)


def summarize(visits: list) -> dict:
    layers = layer_of()
    stays = []
    for module, function in visits:
        if stays and stays[-1]["file"] == module:
            if function not in stays[-1]["functions"]:
                stays[-1]["functions"].append(function)
        else:
            stays.append({"file": module, "functions": [function]})
    seen, returns, climbs = set(), 0, 0
    for i, stay in enumerate(stays):
        if stay["file"] in seen:
            returns += 1
        seen.add(stay["file"])
        if i and layers.get(stay["file"], -1) > layers.get(stays[i - 1]["file"], -1):
            climbs += 1
    per_file = {}
    for stay in stays:
        per_file[stay["file"]] = per_file.get(stay["file"], 0) + 1
    calls: dict = {}
    for module, function in visits:
        calls[f"{module}.{function}"] = calls.get(f"{module}.{function}", 0) + 1
    return {"stays": len(stays), "files": len(seen), "climbs": climbs, "returns": returns,
            "entries_per_file": dict(sorted(per_file.items(), key=lambda kv: -kv[1])),
            "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])), "path": stays}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "config_walk.json"))
    p.add_argument("--label", default="after", help="the key this measurement is stored under (before / after)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(["train", "--config", str(TINY), "--output-dir", str(Path(tmp) / "run"), "--max-steps", "1",
                          "--set", "eval.max_examples=16"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result["commit"] = commit.strip()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record["method"] = __doc__.split("\n\n")[1].replace("\n", " ")
    record[args.label] = result
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "path"}, indent=1))


if __name__ == "__main__":
    main()
