"""The package's import graph keeps its layers: data flows one way and no module
reaches back up (docs/design.md's module map)."""

from __future__ import annotations

import ast
import pathlib

import rstar_batch

PACKAGE = pathlib.Path(rstar_batch.__file__).parent

# Lowest first. A module may import only from its own layer or lower ones, and
# nothing may import in a circle. Folders fill one layer each.
LAYERS = [
    {"base", "config"},                                       # vocabulary
    {"model", "bert_cls", "plain_bert", "faults", "progress", "cluster", "supervise"},  # what stages
                                                              # and io stand on
    {"io", "stages"},                                         # the pipeline's steps
    {"replicas", "summary", "manifest", "rank_pass", "driver", "pipeline", "score_corpus",
     "tokenize_corpus", "dataset", "length_bias", "evaluate", "export", "status", "testing",
     "cache",
     "tiny_families"},                                        # jobs and tools
    {"cli", "nightly", "demo", "__main__", "__init__"},       # entry points
]


def _unit(module: str) -> str:
    """A module's layer unit: its folder, or its own name at the top level."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("rstar_batch", *parts))
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rstar_batch"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    is_module = (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists()
                    targets.add(full if is_module else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("rstar_batch."))
    return {k: {t for t in v if t != "rstar_batch" and t != k} for k, v in graph.items()}


def _layer(module: str) -> int:
    unit = _unit(module)
    found = [i for i, layer in enumerate(LAYERS) if unit in layer]
    assert found, f"{module} is in no layer: add it to LAYERS (and docs/design.md's map)"
    return found[0]


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{a} -> {b}" for a, targets in _imports().items() for b in targets
              if _layer(b) > _layer(a)]
    assert not upward


def test_io_and_stages_do_not_import_each_other():
    crossing = [f"{a} -> {b}" for a, targets in _imports().items() for b in targets
                if {_unit(a), _unit(b)} == {"io", "stages"}]
    assert not crossing


def test_the_import_graph_has_no_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
