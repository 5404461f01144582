"""The package's import graph is one-way: no cycles, and no layer imports a layer above it.

Every ``casify`` module is parsed with ``ast`` (no import runs); every ``from .x import ...``, ``from casify.x import
...``, ``from . import x`` and ``import casify.x`` counts, at module level and inside functions alike. Lazy submodule
access through ``casify.__getattr__`` (PEP 562) is not an import statement and is not an edge.

The layers, lowest first. A module may import its own layer and the ones below it, never one above. A new module
must be placed in a layer here (the test fails until it is), so the next engineer decides where it belongs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import casify

ROOT = Path(casify.__file__).parent

LAYERS = [
    # the CAS module and everything that needs nothing else from casify
    ("foundation", {"casify.version", "casify.code_version", "casify.host_sync", "casify.defenses", "casify.defenses.base",
                    "casify.defenses.routed", "casify.defenses.cas", "casify.defenses.cifs", "casify.defenses.fsr",
                    "casify.inputs", "casify.routing", "casify.normalize", "casify.eps",
                    "casify.models", "casify.models._timm", "casify.models.pretrained_weights",
                    "casify.models.cifar_resnet", "casify.models.shared", "casify.models.vgg",
                    "casify.models.wide_resnet"}),
    # what a saved config.json is and how it is checked: DefenseConfig, validation, base-model specs
    ("config", {"casify.config_validation", "casify.spec", "casify.config"}),
    # tracing and layer discovery (layouts, shapes, candidates, "auto")
    ("discovery", {"casify.tracing", "casify.discovery"}),
    # the fx rewrite: returns graphs, CAS modules and the resolved DefenseConfig; knows no model class
    ("rewrite", {"casify.rewrite"}),
    # the texts a published model carries: the evaluation summary and the model card (they serve publishing, so they
    # sit just below it, not in the foundation)
    ("published texts", {"casify.eval_summary", "casify.model_card"}),
    # writing a folder (state dict + checksum + config.json) and the model card around it
    # (with the Hub access check and the publishing guard, which import nothing from casify: push_to_hub runs them)
    ("serialization", {"casify.serialization", "casify.hub_access", "casify.publish_guard", "casify.publish"}),
    # the wrapped model, which owns save_pretrained / push_to_hub
    ("model", {"casify.model"}),
    # wrap / unwrap: rewrite + model
    ("surgery", {"casify.surgery"}),
    # loading (folders and the Hub), which rebuilds through wrap
    ("hub", {"casify.hub"}),
    # what an application serves that wraps nothing (dataset builders, console progress, report and run-table text,
    # trackers, seeded corruptions, output folders, whether data fit a model, Hugging Face / WebDataset sources)
    ("application support", {"casify.image_records", "casify.hf_dataset", "casify.webdataset_shards",
                             "casify.data", "casify.progress", "casify.run_table", "casify.trackers",
                             "casify.corruptions", "casify.output_dir", "casify.data_fit"}),
    # attacks on wrapped models: objectives, the attack kinds (PGD / CW / FGSM, APGD, Square, AutoAttack), the threat
    # models
    ("attacks", {"casify.attacks.constants", "casify.attacks.objectives", "casify.attacks.context",
                 "casify.attacks.steps", "casify.attacks.kinds", "casify.attacks.pgd", "casify.attacks.spec",
                 "casify.attacks.apgd", "casify.attacks.square", "casify.attacks.autoattack",
                 "casify.attacks.fgsm_rs", "casify.attacks.n_fgsm", "casify.attacks",
                 "casify.attacks.threat_model", "casify.attacks.autopgd"}),
    # the training losses (they call the attacks' presets)
    ("losses", {"casify.losses"}),
    # evaluation and analysis: beside training, never importing it
    ("evaluation and analysis", {"casify.evaluate", "casify.evaluate.report", "casify.evaluate.deployed",
                                 "casify.evaluate.blackbox", "casify.evaluate.plan", "casify.evaluate.runner",
                                 "casify.evaluate.tally", "casify.evaluate.checks", "casify.evaluate.api",
                                 "casify.evaluate.compare", "casify.evaluate.echo", "casify.evaluate.examples",
                                 "casify.evaluate.figures", "casify.evaluate.side_by_side", "casify.evaluate.benchmark",
                                 "casify.analysis", "casify.analysis.files", "casify.analysis.statistics",
                                 "casify.analysis.capture", "casify.analysis.figures", "casify.analysis.tsne",
                                 "casify.analysis.report"}),
    # training: config, schedule, metrics, the run folder, the loop
    ("training", {"casify.train", "casify.train.config", "casify.train.schedule", "casify.train.metrics",
                  "casify.train.checkpoint_files", "casify.train.run_lock", "casify.train.checkpoints",
                  "casify.train.overfit_guard", "casify.train.loop"}),
    # what users run: recipes, publishing, model sources and the CLI
    ("applications", {"casify.recipe_config", "casify.recipe", "casify.cli", "casify.model_source", "casify.push"}),
    # the package facade (casify/__init__.py) and scripts that use it
    ("package", {"casify"}),
    ("scripts", {"casify.demo"}),
]

# Upward edges that exist today in files this refactor could not edit, with what would remove them. Keep it short.
KNOWN_UPWARD: dict = {}

# Private names (one leading underscore) imported from another casify module, by files this refactor could not edit.
KNOWN_PRIVATE_IMPORTS: dict = {}

# Private attributes of casify's classes that only their owning module may touch.
PRIVATE_ATTRIBUTES = {"_base": "casify.model", "_graphs": "casify.model", "_forwards": "casify.model",
                      "_range_check": "casify.model", "_route": "casify.defenses.routed",
                      "_router": "casify.defenses.routed", "_routing_for": "casify.defenses.routed"}
KNOWN_PRIVATE_ATTRIBUTES: dict = {}


def _modules():
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_package)
    return mods


def _imports(name, path, is_package, mods):
    """(imported module, imported names) for every import statement in the file, nested ones included."""
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "casify" and not target.startswith("casify."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, ()) if sub in mods else (target, (alias.name,))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "casify" or alias.name.startswith("casify."):
                    yield alias.name, ()


def _graph():
    mods = _modules()
    graph = {}
    for name, (path, is_package) in mods.items():
        graph[name] = {target for target, _ in _imports(name, path, is_package, mods) if target != name}
    return graph


# Folders whose every file is in the folder's layer: a new defense or attack kind is one file there, with no edit here.
LAYER_FOLDERS = ("casify.defenses", "casify.attacks")


def _layer_of():
    listed = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
    for module in _graph():
        package = module.rsplit(".", 1)[0]
        if module not in listed and package in LAYER_FOLDERS:
            listed[module] = listed[package]
    return listed


def test_every_module_has_a_layer():
    layer_of = _layer_of()
    missing = sorted(set(_graph()) - set(layer_of))
    assert not missing, f"place these modules in a layer in tests/test_architecture.py: {missing}"
    stale = sorted({m for _, modules in LAYERS for m in modules} - set(_graph()))
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


def test_import_graph_is_acyclic():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_layer_imports_a_higher_layer():
    layer_of = _layer_of()
    upward = []
    for source, targets in _graph().items():
        for target in targets:
            if target in layer_of and source in layer_of and layer_of[target] > layer_of[source]:
                if (source, target) not in KNOWN_UPWARD:
                    upward.append(f"{source} ({LAYERS[layer_of[source]][0]}) imports {target} "
                                  f"({LAYERS[layer_of[target]][0]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_known_exceptions_still_exist():
    """An exception that was fixed is removed from the lists, so the lists only shrink."""
    graph = _graph()
    for source, target in KNOWN_UPWARD:
        assert target in graph[source], f"{source} no longer imports {target}: remove it from KNOWN_UPWARD"


def test_no_module_imports_another_modules_private_names():
    mods = _modules()
    found = set()
    for name, (path, is_package) in mods.items():
        for target, names in _imports(name, path, is_package, mods):
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__") and target != name:
                    found.add((name, target, imported))
    unexpected = sorted(found - set(KNOWN_PRIVATE_IMPORTS))
    assert not unexpected, f"private names imported across modules: {unexpected}"
    assert set(KNOWN_PRIVATE_IMPORTS) <= found, "a known private import was fixed: remove it from the list"


def test_private_attributes_are_touched_only_by_their_owner():
    mods = _modules()
    found = set()
    for name, (path, _) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
                owner = PRIVATE_ATTRIBUTES[node.attr]
                is_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if name != owner and not is_self:
                    found.add((name, node.attr))
            if isinstance(node, ast.Constant) and node.value in PRIVATE_ATTRIBUTES:  # setattr / __dict__ by name
                if name != PRIVATE_ATTRIBUTES[node.value]:
                    found.add((name, node.value))
    unexpected = sorted(found - set(KNOWN_PRIVATE_ATTRIBUTES))
    assert not unexpected, f"private attributes reached from outside their module: {unexpected}"
