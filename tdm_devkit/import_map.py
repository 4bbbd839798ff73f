"""The product's import map, read from the source (ast, nothing imported): which module imports which, the import
cycles, imports that point up the layers, and the largest module, class and function.

Layers, lowest first: `tdm_core` (never imports ComfyUI), the support modules of `nodes/` (adapters, runtime,
glue), the node modules (those defining `io.ComfyNode` classes), the `nodes` package. A module may import its own
layer or lower ones; a node module imports no other node module. `tests/test_layering.py` holds the product to it;
`python scripts/import_map.py [repo]` prints the figures as one JSON line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("nodes", "tdm_core")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _targets(name: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The product modules an import statement names (`from . import x` names the module x, not the package)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = name.split(".")
            base = parts if path.name == "__init__.py" else parts[:-1]
            base = base[: len(base) - (node.level - 1)]
            package = ".".join(base + ([node.module] if node.module else []))
        else:
            package = node.module or ""
        submodules = [f"{package}.{alias.name}" for alias in node.names if f"{package}.{alias.name}" in known]
        names = submodules if len(submodules) == len(node.names) else [package, *submodules]
    else:
        names = [alias.name for alias in node.names]
    return [n for n in names if n in known and n != name]


def import_graph(root: Path) -> tuple[dict[str, set[str]], int]:
    """module → the product modules it imports (inside functions too, so a lazy import still counts for cycles); and
    how many imports of product modules sit inside functions in nodes/ (there, lazy imports were shims around a
    layering problem; tdm_core defers a few heavy or optional imports on purpose)."""
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    lazy = 0
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(_targets(name, path, node, known))
        for function in ast.walk(tree):
            if name.startswith("nodes") and isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += sum(1 for inner in ast.walk(function)
                            if isinstance(inner, (ast.Import, ast.ImportFrom)) and _targets(name, path, inner, known))
    return graph, lazy


def layer(name: str, root: Path) -> int:
    if name == "nodes":
        return 4
    if name.startswith("nodes."):
        return 3 if "io.ComfyNode" in modules(root)[name].read_text(encoding="utf-8") else 2
    return 1


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (a package importing its own submodules is no cycle)."""
    edges = {a: {b for b in targets if not b.startswith(a + ".") and not a.startswith(b + ".")}
             for a, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(vertex: str) -> None:  # Tarjan's algorithm
        index[vertex] = low[vertex] = len(index)
        stack.append(vertex)
        for other in edges[vertex]:
            if other not in index:
                visit(other)
                low[vertex] = min(low[vertex], low[other])
            elif other in stack:
                low[vertex] = min(low[vertex], index[other])
        if low[vertex] == index[vertex]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == vertex:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for vertex in edges:
        if vertex not in index:
            visit(vertex)
    return found


def figures(root: Path) -> dict:
    root = Path(root)
    graph, lazy = import_graph(root)
    layers = {name: layer(name, root) for name in graph}
    upward = sorted([a, b] for a, targets in graph.items() for b in targets
                    if layers[b] > layers[a] and not b.startswith(a + "."))
    sideways = sorted([a, b] for a, targets in graph.items() for b in targets if layers[a] == layers[b] == 3)
    largest = {"module": (0, ""), "class": (0, ""), "function": (0, "")}
    node_modules_over_300 = []
    for name, path in modules(root).items():
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        largest["module"] = max(largest["module"], (lines, name))
        if layers[name] == 3 and lines > 300:
            node_modules_over_300.append([name, lines])
        for node in ast.walk(ast.parse(source)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                largest["class"] = max(largest["class"], (size, f"{name}.{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                largest["function"] = max(largest["function"], (size, f"{name}.{node.name}"))
    return {"modules": len(graph), "internal_imports": sum(len(t) for t in graph.values()),
            "imports_up_the_layers": upward, "node_module_to_node_module": sideways,
            "lazy_imports_in_nodes": lazy, "cycles": cycles(graph),
            "largest": {kind: {"lines": size, "name": name} for kind, (size, name) in largest.items()},
            "node_modules_over_300_lines": node_modules_over_300}
