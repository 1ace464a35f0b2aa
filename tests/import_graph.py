"""The import graph of the project's own modules (`dsa_rag.*`), read from the source with `ast`.

Every `import` / `from ... import` statement counts, including those inside functions (an import
moved into a function to dodge a cycle is still a dependency); only the bodies of
`if TYPE_CHECKING:` are skipped. `from dsa_rag.x import y` is an edge to `dsa_rag.x.y` when that
is a module, else to `dsa_rag.x`. Relative imports are resolved against the importing module.

    .venv/bin/python tests/import_graph.py          # prints each module's project imports, then any cycle
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository folder behind each top-level package of the `dsa_rag` namespace (pyproject.toml's
# [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"dsa_rag.model": "model", "dsa_rag.kernels": "kernels", "dsa_rag.rag_service": "rag_service"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """module name -> source file, for every .py file under the package folders."""
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.parts[:-1])
            if path.name != "__init__.py":
                parts.append(path.stem)
            mods[".".join([pkg, *parts])] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom in the tree, at any depth, but not under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a project module (None: not the project's)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in mods:
            return cand
        parts.pop()
    return None


def module_imports(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules that `module` (its file at `path`) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name, mods)) is not None:
                    out.add(target)
            continue
        if node.level:
            base = package.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in mods:
                out.add(full)
            elif (target := _resolve(source, mods)) is not None:
                out.add(target)
    out.discard(module)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports, for every project module."""
    mods = project_modules(root)
    return {m: module_imports(m, p, mods) for m, p in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the graph is a few hundred nodes at most
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for comp in sccs:
        members = set(comp)
        start = comp[0]
        # breadth-first from start inside the component, back to start: a shortest cycle through it
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def format_cycle(cycle: list[str]) -> str:
    return " -> ".join(cycle)


if __name__ == "__main__":
    g = import_graph()
    for m in sorted(g):
        print(m, "->", ", ".join(sorted(g[m])) or "-")
    cycles = find_cycles(g)
    for c in cycles:
        print("CYCLE:", format_cycle(c))
    sys.exit(1 if cycles else 0)
