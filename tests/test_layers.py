"""The packages import one way (ARCHITECTURE: elm_spec <- the twins <- convert, elm_eval <- apps),
the twins never import each other, and no module imports itself back through others. Imports
inside functions count too; `if TYPE_CHECKING:` blocks do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

from support.cli import REPO

PACKAGES = ("elm_spec", "elm_train", "elm_mlx", "convert", "elm_eval", "apps")
# Which other packages each may import; elm_eval reaches each twin from one module only.
ALLOWED = {
    "elm_spec": set(),
    "elm_train": {"elm_spec"},
    "elm_mlx": {"elm_spec"},
    "convert": {"elm_spec", "elm_train", "elm_mlx"},
    "elm_eval": {"elm_spec", "elm_train", "elm_mlx"},
    "apps": set(PACKAGES),
}
TWIN_GATEWAYS = {"elm_train": "elm_eval.torch_model", "elm_mlx": "elm_eval.mlx_model"}


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: None if is_package else -1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                # `from pkg import module` imports pkg.module; `from pkg import name`, pkg
                candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                              for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_the_checker_finds_a_circle_and_skips_type_checking_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text("from pkg.a import f\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from pkg import e\n")
    (package / "e.py").write_text("import pkg.d\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_circles():
    assert cycles(import_graph(REPO, PACKAGES)) == []


def test_packages_import_only_downwards():
    wrong = []
    for module, targets in import_graph(REPO, PACKAGES).items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other == package:
                continue
            if other not in ALLOWED[package]:
                wrong.append(f"{module} -> {target}")
            elif package == "elm_eval" and other in TWIN_GATEWAYS and TWIN_GATEWAYS[other] != module:
                wrong.append(f"{module} -> {target} (only {TWIN_GATEWAYS[other]} may)")
    assert wrong == []
