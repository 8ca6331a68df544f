"""The package's import structure: no circle (function-level imports included), Ray only in the
dispatcher, and the modules that `ablate status`, `report`, `--dry-run` and config errors use free
of torch. Read from the source with ``ast``, so the rule is checked, not one run of it.

``python tests/test_imports.py`` prints the graph (module -> what it imports), floor by floor.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ablation"

# Modules that must not import torch, at module level or through what they import at module level.
TORCH_FREE = {"config", "strategies", "datasets", "layers", "schedule", "fork", "files", "io",
              "errors", "curves", "store", "grid", "remote", "datafiles", "cluster",
              "report", "report.numbers", "report.tables", "report.effects", "report.writers",
              "report.figures", "report.index", "analysis"}
RAY_ALLOWED = {"tune", "cluster"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _resolve(module: str, level: int, name: str | None, is_package: bool) -> str | None:
    """The ablation module an import names (None for anything outside the package)."""
    if level == 0:
        if not (name or "").startswith("ablation"):
            return None
        return (name or "")[len("ablation."):] if name != "ablation" else ""
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([name] if name else [])])


def imports() -> dict[str, dict[str, bool]]:
    """module -> {imported ablation module or external top-level name: at module level?}"""
    graph: dict[str, dict[str, bool]] = {}
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body} | {id(n) for node in tree.body
                                             if isinstance(node, (ast.If, ast.Try))
                                             for n in ast.walk(node)}
        edges: dict[str, bool] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            found = []
            if isinstance(node, ast.Import):
                found = [(a.name, 0, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                found = [(node.module, node.level, None)]
                if node.level and node.module is None:  # from . import x, y
                    found = [(a.name, node.level, "name") for a in node.names]
            for name, level, kind in found:
                target = _resolve(module, level, name, path.name == "__init__.py") \
                    if (level or (name or "").startswith("ablation")) else None
                if target is not None and target not in modules and kind == "name":
                    target = target.rpartition(".")[0]  # from . import NAME: the package itself
                key = target if target is not None else (name or "").split(".")[0]
                if target is not None and target not in modules:
                    continue
                at_top = id(node) in top
                edges[key] = edges.get(key, False) or at_top
        graph[module] = edges
    # imports inside `if TYPE_CHECKING:` were walked above too; drop them
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and sub.level:
                        target = _resolve(module, sub.level, sub.module, path.name == "__init__.py")
                        graph[module].pop(target, None)
    return graph


def _internal(graph):
    return {m: {t: top for t, top in e.items() if t in graph and t != m}
            for m, e in graph.items()}


def test_no_import_circle_even_through_function_level_imports():
    graph = _internal(imports())
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_ray_is_imported_only_by_the_dispatcher():
    graph = imports()
    users = {m for m, e in graph.items() if "ray" in e}
    assert users <= RAY_ALLOWED, f"{sorted(users - RAY_ALLOWED)} import ray"


def test_the_torch_free_modules_load_no_torch_at_import():
    graph = imports()
    internal = _internal(graph)

    def reaches_torch(m, seen):
        if graph[m].get("torch") or graph[m].get("torchvision"):
            return [m]
        for t, at_top in internal[m].items():
            if at_top and t not in seen:
                seen.add(t)
                chain = reaches_torch(t, seen)
                if chain:
                    return [m, *chain]
        return []

    for m in sorted(TORCH_FREE & set(graph)):
        chain = reaches_torch(m, {m})
        assert not chain, f"{m} loads torch at import: {' -> '.join(chain)}"


if __name__ == "__main__":
    graph = _internal(imports())
    depth: dict[str, int] = {}

    def floor(m):
        if m not in depth:
            depth[m] = 0
            depth[m] = 1 + max((floor(t) for t in graph[m]), default=-1)
        return depth[m]

    for m in sorted(graph, key=lambda m: (-floor(m), m)):
        deps = ", ".join(sorted((t or "ablation") + ("" if top else "*") for t, top in graph[m].items()))
        print(f"{floor(m):2d}  {m or 'ablation':<18} -> {deps}")
    print("(* = imported inside a function)", file=sys.stderr)
