"""The package's three layers and the direction of their imports, checked on the source with ``ast``.

- library (everything under prunekit/ but jobs/ and cli/) never imports prunekit.jobs or prunekit.cli;
- jobs never imports prunekit.cli;
- no import cycle among prunekit's modules, counting imports inside functions too;
- in the library and jobs, an import inside a function is only for a dependency that is slow to import or
  optional (LAZY below), or a prunekit module that imports one at module level: everything else is
  imported at the top, where a reader sees it. The CLI may import anything inside its commands, so that
  ``prunekit --help`` never loads torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prunekit"

# the one list of imports a library or job function may defer: seconds to import, or an optional extra
LAZY = (
    "numba",
    "llvmlite",
    "matplotlib",
    "transformers",
    "torchvision",  # model: {torchvision: NAME}, where installed
    "datasets",  # data: {hf_datasets: DIR}, where installed
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx_ir",
    "llama_cpp",  # llama-cpp-python: an optional benchmark baseline
    "sklearn",
    "markdown",
    "pydoc_data",  # the default calibration text: megabytes of strings
    "torch.utils.tensorboard",  # the tensorboard extra
    "prunekit.runtime",  # numba kernels, compiled on first use
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    if module.startswith("prunekit.cli") or module == "prunekit.__main__":
        return "cli"
    return "jobs" if module.startswith("prunekit.jobs") else "library"


def _resolve(name: str) -> str | None:
    """The prunekit module an imported name lives in (``from a.b import c``: a.b.c if that is a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for every import the module executes."""
    path = MODULES[module]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only, never executed
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    package = module.split(".")
                    if path.name != "__init__.py":
                        package.pop()
                    package = package[: len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, inner, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


EDGES = {m: [(t, inner, line) for t, inner, line in _imports(m)] for m in MODULES}


def test_the_tree_has_the_three_layers():
    assert {"library", "jobs", "cli"} == {_layer(m) for m in MODULES}
    assert (PACKAGE / "jobs" / "state.py").is_file() and (PACKAGE / "cli" / "commands.py").is_file()


def _upward(edges: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    rank = {"library": 0, "jobs": 1, "cli": 2}
    return [
        f"{module}:{line} imports {target}"
        for module, imports in edges.items()
        for target, _, line in imports
        if (resolved := _resolve(target)) and rank[_layer(resolved)] > rank[_layer(module)]
    ]


def _deferred(edges: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    return [
        f"{module}:{line} imports {target} inside a function"
        for module, imports in edges.items()
        if _layer(module) != "cli"
        for target, inner, line in imports
        if inner and not any(target == lazy or target.startswith(lazy + ".") for lazy in LAZY)
    ]


def test_imports_point_down_the_layers():
    assert _upward(EDGES) == []


def test_imports_inside_functions_are_only_the_lazy_ones():
    assert _deferred(EDGES) == []


def test_the_checks_catch_what_they_forbid():
    """The rules flag an upward import and a needless deferred import (so they cannot pass vacuously)."""
    fake = {
        "prunekit.masking": [("prunekit.jobs.run", False, 1), ("prunekit.spec", True, 2), ("numba", True, 3)],
        "prunekit.jobs.run": [("prunekit.cli.commands", True, 4)],
        "prunekit.cli.commands": [("prunekit.jobs.run", True, 5)],
    }
    assert _upward(fake) == [
        "prunekit.masking:1 imports prunekit.jobs.run",
        "prunekit.jobs.run:4 imports prunekit.cli.commands",
    ]
    assert _deferred(fake) == [
        "prunekit.masking:2 imports prunekit.spec inside a function",
        "prunekit.jobs.run:4 imports prunekit.cli.commands inside a function",
    ]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    edges = {m: {r for t, _, _ in EDGES[m] if (r := _resolve(t)) and r != m} for m in MODULES}
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
