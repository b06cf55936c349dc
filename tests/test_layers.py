"""Imports go one way, from the CLI down to config: no cycle, counting imports inside functions
(not those for type checking only). Modules are named by their dotted path in the package
(``cache.reader``; a package by its own name, ``cache``, for its ``__init__``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
# Lowest first; a module may import only modules of its own layer or below.
LAYERS = [
    ["_io", "_checks", "_compat", "_malloc", "_lazy", "progress", "data.splits", "data.transforms", "data.mixing",
     "losses.saved_gradient", "losses.fused_kl", "losses.fused_dist", "export.predict"],
    ["data.files"], ["data.layouts"], ["data.synthetic", "data.unlabelled"], ["data.labels"],
    ["config._base"], ["config._data_schema"], ["config._schema"], ["config"],
    ["data.batches"], ["data.loaders"], ["data"], ["launch"], ["run_folder"], ["models.weights"],
    ["models.pretrained"], ["models"],
    ["stage_weights"], ["fingerprint"], ["_checkpoint"], ["preflight"], ["teacher.sources"], ["teacher"],
    ["cache.store"], ["cache.reader"], ["cache.writer"], ["cache"],
    ["losses"], ["losses.features"], ["metrics"], ["evaluation"], ["export.quantize"], ["training"],
    ["export.student"], ["export"], ["comparison"], ["pipeline"], ["cli"], ["__init__", "__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        found: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill"):
                module = node.module.removeprefix("distill").lstrip(".")
                for alias in node.names:  # `from distill.cache import store`: the submodule
                    child = f"{module}.{alias.name}" if module else alias.name
                    found.add(child if child in names else (module or "__init__"))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("distill.") for a in node.names if a.name.startswith("distill.")}
        me = module_name(path)
        found.discard(me)
        if me != "__init__":
            found.discard("__init__")  # `import distill` for its side effect only
        graph[me] = found
    return graph


def test_every_module_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    assert set(imports()) == placed


def test_imports_only_go_down():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = [f"{m} imports {d}" for m, deps in imports().items() for d in deps
              if layer_of[d] > layer_of[m]]
    assert not upward


def test_nothing_outside_a_package_reaches_its_private_modules():
    reached = [f"{m} imports {d}" for m, deps in imports().items() for d in deps
               if "._" in d and not m.startswith(d.split("._")[0])]
    assert not reached
