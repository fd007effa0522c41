"""The package's import graph has no cycle (issue #18: imports run one way, downhill), and the library never
imports the benchmark harness (`diffusers_ptq.harness`: benchmark, metrics, bundled toy models).

Every `import` / `from ... import` of a diffusers_ptq module counts, at module level or inside a function (a lazy
import that closes a loop is still a loop). `from diffusers_ptq import name` depends on the submodule `name` when
there is one, else on the package root (`diffusers_ptq/__init__.py`), which imports most of the package.
"""

import ast
from pathlib import Path

import diffusers_ptq

PACKAGE = Path(diffusers_ptq.__file__).resolve().parent


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}."""
    files = module_files()
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in files]
                if len(targets) < len(subs):
                    targets.append(base)
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "diffusers_ptq.modules" in graph["diffusers_ptq.api"]  # a module-level import
    assert "diffusers_ptq.api" in graph["diffusers_ptq.quantizer"]  # a lazy one, inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


HARNESS = "diffusers_ptq.harness"
APPLICATION = {"diffusers_ptq.cli"}  # the CLI is the application on top of the library and the harness


def is_harness(module: str) -> bool:
    return module == HARNESS or module.startswith(HARNESS + ".")


def harness_path(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import chain [start, ..., a harness module] that stays in the library, or None."""
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt in parents:
                continue
            parents[nxt] = node
            if is_harness(nxt):
                path = [nxt]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1]
            queue.append(nxt)
    return None


def test_the_library_never_imports_the_harness():
    """No library module (every diffusers_ptq module but the harness and the CLI) imports diffusers_ptq.harness,
    at module level or lazily, directly or through other modules."""
    graph = import_graph()
    assert HARNESS in graph and "diffusers_ptq.harness.bundled" in graph["diffusers_ptq.cli"]  # the graph sees it
    assert harness_path({"a": {"b"}, "b": {HARNESS}, HARNESS: set()}, "a") == ["a", "b", HARNESS]
    library = sorted(m for m in graph if not is_harness(m) and m not in APPLICATION)
    assert "diffusers_ptq" in library and "diffusers_ptq.api" in library
    chains = sorted((path for m in library if (path := harness_path(graph, m))), key=len)
    assert not chains, "the library imports the harness: " + "; ".join(" -> ".join(c) for c in chains)
