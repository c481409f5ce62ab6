"""The shape of the package, checked from its source with `ast` (nothing is imported):

- imports point down the layers below, never up, and form no cycle (between modules, or
  between the package's parts);
- scheduling policies decide only inside the policy module (no `policy == "..."` elsewhere);
- no function is longer than a screen or two.

Lazy imports inside functions and `TYPE_CHECKING` imports count like any other."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "conserve"

# Lowest first. A module may import from its own layer and the ones below it.
LAYERS: list[set[str]] = [
    # ground: no knowledge of requests in flight
    {
        "config",
        "engine_args",
        "hugepages",
        "kernels",
        "kv",
        "model",
        "paths",
        "platform",
        "sampling",
        "tables",
        "version",
    },
    {"engine"},  # scheduler, policies, runner, latency model: one engine in one process
    {"core"},  # the engine in its own process, and the client that drives it
    {"cluster"},  # engine replicas on Ray behind one front door
    {"openai"},  # OpenAI request preparation and response shapes, no web framework
    {"llm", "server", "batch", "__init__"},  # the ways in: Python API, HTTP server, batch jobs
    {"bench", "cli"},  # measuring and commanding all of the above
]
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` refers to (a module, or the package of a name in it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from conserve.x import y` may import the module conserve.x.y
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "conserve" or name.startswith("conserve."):
                target = _resolve(name, modules)
                if target is not None:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to (`conserve.engine.x` -> engine)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"conserve/{part} is in no layer: add it to LAYERS in {__file__}")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer():
    for module in _modules():
        _layer(_part(module))


def test_imports_never_point_up_a_layer():
    upward = [
        f"{m} (layer {_layer(_part(m))}) imports {t} (layer {_layer(_part(t))})"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if _layer(_part(t)) > _layer(_part(m))
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_parts_of_the_package():
    parts: dict[str, set[str]] = defaultdict(set)
    for m, targets in _graph().items():
        parts[_part(m)] |= {_part(t) for t in targets} - {_part(m)}
    cycles = _cycles(parts)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_look_for():
    """The checks above, on a graph made to break them."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("engine") > _layer("kv") and _layer("cli") > _layer("server")
    modules = _modules()
    assert _resolve("conserve.engine.engine.Engine", modules) == "conserve.engine.engine"
    assert _resolve("conserve.engine.scheduler", modules) == "conserve.engine.scheduler"
    assert "conserve.engine.scheduler" in _imports(modules["conserve.engine.engine"], modules)


POLICY_CHECK = re.compile(r"""\bpolicy\s*(==|!=|\bin\b|\bnot in\b)\s*[("'\[]""")


def test_policies_decide_only_in_the_policy_module():
    found = []
    for module, path in _modules().items():
        if module == "conserve.engine.policy":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if POLICY_CHECK.search(line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
    assert POLICY_CHECK.search('if config.policy == "conserve":')
    assert POLICY_CHECK.search("if self.config.policy in ('fcfs', 'priority'):")
    assert not POLICY_CHECK.search("policy = make_policy(name)")


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_no_function_is_longer_than_the_limit(limit):
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {n}"
                    )
    assert not long, "\n".join(long)
