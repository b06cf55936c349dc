"""Imports go one way, from the CLI down to config: no cycle, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
# Lowest first; a module may import only modules of its own layer or below.
LAYERS = [
    ["_io", "_splits", "_compat", "_malloc", "_saved_gradient", "_fused_kl", "_fused_dist",
     "_transforms", "_mixing", "predict", "progress"],
    ["_files"], ["_datasets"], ["_synthetic", "_unlabelled"], ["_labels"], ["_schema_base"], ["_schema_data"], ["_schema"], ["config"],
    ["_batches"], ["data"], ["launch"], ["models"], ["_checkpoint"], ["run_folder"], ["_teacher_sources"], ["teacher"], ["_cache_replay"], ["_cache_store"], ["cache"],
    ["losses"], ["features"], ["metrics"], ["evaluation"], ["quantize"], ["training"], ["export"], ["comparison"],
    ["pipeline"], ["cli"], ["__init__", "__main__"],
]


def imports() -> dict[str, set[str]]:
    names = {path.stem for path in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at any depth
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill"):
                module = node.module.removeprefix("distill").lstrip(".")
                found.add(module or "__init__")
                found |= {a.name for a in node.names if not module and a.name in names}
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("distill.") for a in node.names if a.name.startswith("distill.")}
        found.discard(path.stem)
        if path.stem != "__init__":
            found.discard("__init__")  # `import distill` for its side effect only
        graph[path.stem] = found
    return graph


def test_every_module_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    assert set(imports()) == placed


def test_imports_only_go_down():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = [f"{m} imports {d}" for m, deps in imports().items() for d in deps
              if layer_of[d] > layer_of[m]]
    assert not upward
