"""The package's own import graph, read with `ast` (nothing is imported).

`python tests/import_graph.py` prints the circles, the imports that break the floor plan and
the own-package imports made inside functions; tests/test_import_graph.py asserts on them.
"""
from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass

PACKAGE = "megatron_sparkling"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# What each floor may not import (README "Layout"): lower floors never reach up.
FORBIDDEN = {
    "core": ("operators", "methods", "compat", "mcore", "checkpoint", "live", "training",
             "diagnostics", "planning", "wandb_log", "cli", "megatron_lm"),
    "operators": ("compat", "mcore", "checkpoint", "live", "training", "diagnostics",
                  "planning", "wandb_log", "cli", "megatron_lm"),
    "methods": ("compat", "mcore", "checkpoint", "live", "training", "diagnostics", "planning",
                "wandb_log", "cli", "megatron_lm"),
    "compat": ("checkpoint", "live", "training", "diagnostics", "planning", "wandb_log", "cli",
               "megatron_lm"),
    "mcore": ("checkpoint", "live", "training", "diagnostics", "planning", "wandb_log", "cli",
              "megatron_lm"),
    "checkpoint": ("live", "training", "diagnostics", "planning", "wandb_log", "cli",
                   "megatron_lm"),
    "live": ("training", "diagnostics", "planning", "wandb_log", "cli", "megatron_lm"),
    "planning": ("checkpoint", "live", "training", "diagnostics", "wandb_log", "cli",
                 "megatron_lm"),
}


@dataclass(frozen=True)
class Import:
    source: str      # importing module, e.g. megatron_sparkling.live.state
    target: str      # imported module
    lineno: int
    in_function: bool


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def modules() -> dict:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[module_name(path)] = path
    return out


def _resolve(name: str, known: dict) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def own_imports() -> list[Import]:
    known = modules()
    found = []
    for mod, path in known.items():
        tree = ast.parse(open(path).read(), path)
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def type_checking_only(node) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    return True
            return False

        def in_function(node) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    return True
            return False

        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import mod` imports the submodule when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                           else node.module for a in node.names]
            if targets and type_checking_only(node):
                continue   # annotations only: never run
            for t in targets:
                if t.split(".")[0] != PACKAGE:
                    continue
                target = _resolve(t, known)
                if target and target != mod:
                    found.append(Import(mod, target, node.lineno, in_function(node)))
    return found


def cycles(imports: list[Import]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    graph: dict[str, set] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
        graph.setdefault(i.target, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def floor_breaks(imports: list[Import]) -> list[Import]:
    return [i for i in imports if floor(i.target) in FORBIDDEN.get(floor(i.source), ())]


def function_imports(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.in_function]


if __name__ == "__main__":
    found = own_imports()
    for group in cycles(found):
        print("circle:", " <-> ".join(group))
    for i in floor_breaks(found):
        print(f"floor: {i.source}:{i.lineno} imports {i.target}")
    inside = function_imports(found)
    for i in inside:
        print(f"inside a function: {i.source}:{i.lineno} imports {i.target}")
    print(f"{len(found)} own imports, {len(inside)} inside functions, "
          f"{len(cycles(found))} circles, {len(floor_breaks(found))} floor breaks")
