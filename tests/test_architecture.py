"""The package's import graph is one-way: no cycles, and no layer imports a layer above it.

Every ``casify`` module is parsed with ``ast`` (no import runs); every ``from .x import ...``, ``from casify.x import
...``, ``from . import x`` and ``import casify.x`` counts, at module level and inside functions alike. Lazy submodule
access through ``casify.__getattr__`` (PEP 562) is not an import statement and is not an edge.

The layers, lowest first, are the sub-packages (each one's ``__init__`` says what lives there and what it may import)
and the few modules left loose at the top. A module's layer is the entry below that names it or its nearest folder,
so a new file in a sub-package needs no edit here; a new loose module must be placed (the test fails until it is).
A module may import its own layer and the ones below it, never one above.
"""
from __future__ import annotations

import ast
from pathlib import Path

import casify

ROOT = Path(casify.__file__).parent

LAYERS = [
    ("foundation", {"casify.version", "casify.defenses", "casify.models"}),
    ("core", {"casify.core"}),
    ("io", {"casify.io"}),
    ("model", {"casify.model"}),
    ("data", {"casify.data"}),
    ("attacks", {"casify.attacks"}),
    ("losses", {"casify.losses"}),
    ("evaluation and analysis", {"casify.evaluate", "casify.analysis"}),
    ("training", {"casify.train"}),
    ("recipe", {"casify.recipe"}),
    ("commands", {"casify.cli"}),
    ("package", {"casify"}),
    ("scripts", {"casify.demo"}),
]

# Upward edges that exist today in files this refactor could not edit, with what would remove them. Keep it short.
KNOWN_UPWARD: dict = {}

# Private names (one leading underscore) imported from another casify module, by files this refactor could not edit.
KNOWN_PRIVATE_IMPORTS: dict = {}

# Private attributes of casify's classes that only their owning module may touch.
PRIVATE_ATTRIBUTES = {"_base": "casify.model.defended", "_graphs": "casify.model.defended", "_forwards": "casify.model.defended",
                      "_range_check": "casify.model.defended", "_route": "casify.defenses.routed",
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


def _layer_of():
    """Each module's layer: the entry of LAYERS that names it or the nearest folder above it (a sub-package's files
    are in its layer, so a new file needs no edit here)."""
    listed = {entry: i for i, (_, entries) in enumerate(LAYERS) for entry in entries}
    layer_of = {}
    for module in _graph():
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in listed:
                layer_of[module] = listed[".".join(parts[:n])]
                break
    return layer_of


def test_every_module_has_a_layer():
    layer_of = _layer_of()
    missing = sorted(set(_graph()) - set(layer_of))
    assert not missing, f"place these modules in a layer in tests/test_architecture.py: {missing}"
    stale = sorted({m for _, modules in LAYERS for m in modules} - set(_graph()))
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


MAX_LOOSE_MODULES = 6


def test_few_modules_are_left_loose_at_the_top():
    loose = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} modules loose in casify/ (at most {MAX_LOOSE_MODULES}): " \
        f"{loose}; put the new one in the sub-package of its layer"


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
