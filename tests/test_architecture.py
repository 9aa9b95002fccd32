"""The package's shape: no import cycles, no reaching into another module's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cnnkit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import anywhere in the module, lazy ones included."""
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("cnnkit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnkit"):
            names = [alias.name for alias in node.names]
            # `from cnnkit.pkg import submodule` imports the submodule.
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            found += [(sub, []) for sub in subs]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES]))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in _imports(name) if target in MODULES and target != name}
            for name in MODULES}


def test_the_graph_is_built_from_real_imports():
    graph = _graph()
    assert "cnnkit.runs" in graph["cnnkit.extraction"]  # a lazy import counts too
    assert "cnnkit.backbones.efficientnet_lite" in graph["cnnkit.backbones"]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_backbone_registry_imports_no_family():
    assert not {t for t in _graph()["cnnkit.backbones.registry"] if t.startswith("cnnkit.backbones.")}


def test_no_module_uses_another_modules_private_names():
    offences = []
    for name in MODULES:
        for target, names in _imports(name):
            offences += [f"{name} imports {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__") and target != name]
        tree = ast.parse(MODULES[name].read_text())
        aliases = {alias.asname or alias.name.split(".")[-1]
                   for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in node.names
                   if (isinstance(node, ast.Import) and alias.name.startswith("cnnkit"))
                   or (isinstance(node, ast.ImportFrom) and node.module and f"{node.module}.{alias.name}" in MODULES)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offences.append(f"{name} uses {node.value.id}.{node.attr}")
    assert not offences, offences


# The layers, lowest first: a module may import its own layer and the ones below, never one above.
# Read from the folders: core, then data and backbones, then what computes features and runs a
# network (engines, the feature cache, heads and their graphs), the run kinds (cnnkit/kinds/), the run
# contract (runs), what reads runs (predict, evaluate, explain, export, reports), the strategies that
# write them (extract, training, ensembles), the plan, advise and auto, and the CLI on top.
LAYERS = [
    ("core", ["cnnkit", "cnnkit.errors", "cnnkit.choices", "cnnkit.paths", "cnnkit.reporting.markup", "cnnkit.forked",
              "cnnkit.content_hashes"]),
    ("data and backbones", ["cnnkit.data", "cnnkit.data.*", "cnnkit.backbones", "cnnkit.backbones.*",
                            "cnnkit.options"]),
    ("features and engines", ["cnnkit.engines", "cnnkit.convert", "cnnkit.features", "cnnkit.heads",
                              "cnnkit.head_graph", "cnnkit.classifier", "cnnkit.saliency", "cnnkit.tta",
                              "cnnkit.neighbours"]),
    ("kinds", ["cnnkit.kinds", "cnnkit.kinds.*"]),
    ("runs", ["cnnkit.runs"]),
    ("readers of runs", ["cnnkit.evaluation", "cnnkit.predict", "cnnkit.similarity", "cnnkit.explain",
                         "cnnkit.export", "cnnkit.reporting", "cnnkit.reporting.evidence", "cnnkit.reporting.html",
                         "cnnkit.labelling", "cnnkit.reporting.label_sheet", "cnnkit.doctor", "cnnkit.doctor.*",
                         "cnnkit.reporting.doctor_report", "cnnkit.cluster"]),
    ("strategies", ["cnnkit.extraction", "cnnkit.ensemble", "cnnkit.training", "cnnkit.training.*"]),
    ("plan", ["cnnkit.plan"]),
    ("advise and auto", ["cnnkit.advise", "cnnkit.auto"]),
    ("cli", ["cnnkit.cli", "cnnkit.cli.*", "cnnkit.__main__"]),
]


def _layer(module: str) -> int:
    import fnmatch

    found = [i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    assert len(found) == 1, f"{module} belongs to {len(found)} layers: name it in exactly one of LAYERS"
    return found[0]


def test_every_import_goes_down_the_layers():
    graph = _graph()
    upward = [f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
              for name, targets in sorted(graph.items()) for target in sorted(targets)
              if _layer(target) > _layer(name)]
    assert not upward, upward


def test_nothing_below_the_strategies_imports_training():
    strategies = next(i for i, (name, _) in enumerate(LAYERS) if name == "strategies")
    offenders = [name for name, targets in _graph().items() if _layer(name) < strategies
                 and any(t == "cnnkit.training" or t.startswith("cnnkit.training.") for t in targets)]
    assert not offenders, offenders


def test_the_kind_registry_imports_no_kind():
    assert not {t for t in _graph()["cnnkit.kinds.registry"] if t.startswith("cnnkit.kinds.")}
