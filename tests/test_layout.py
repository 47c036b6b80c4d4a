"""The package's shape, read from the source with ast (nothing imported): the import rule that keeps the
folders meaningful, and no import loop anywhere, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tuner"

LEAVES = {"tuner.errors", "tuner.common", "tuner.offline", "tuner.progress"}
CORE = {"tuner.config", "tuner.loss", "tuner.distill", "tuner.lora", "tuner.preference"}  # options and the chunked loss family
LIBRARY = {"data": set(), "influence": {"data"}, "evaluation": {"data"}, "train": {"data", "evaluation"}}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}


def absolute(node: ast.ImportFrom, importer: str) -> str:
    """The module an import names, relative ones (`from . import x`, `from .y import z`) resolved."""
    if not node.level:
        return node.module or ""
    package = importer.split(".") if importer in PACKAGES else importer.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path, names: set[str]) -> list[tuple[str, int, bool, str]]:
    """(module imported, line, inside a function, the line's text) for each import of the package's own modules."""
    source = path.read_text(encoding="utf-8")
    tree, lines = ast.parse(source), source.splitlines()
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, module_name(path))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
        for target in targets:
            if target.split(".")[0] == "tuner" and target in names:
                found.append((target, node.lineno, id(node) in inner, lines[node.lineno - 1]))
    return found


def group(module: str) -> str:
    """leaf, core, a library folder's name, or edge (the run's edges at the top, and export/)."""
    if module in LEAVES:
        return "leaf"
    if module in CORE:
        return "core"
    folder = module.split(".")[1]
    return folder if folder in LIBRARY else "edge"


def allowed(source: str, target: str) -> bool:
    mine, theirs = group(source), group(target)
    if mine == "leaf":
        return target in {"tuner.errors", "tuner.common"}
    if mine == "core":
        return theirs in {"leaf", "core"}
    if mine in LIBRARY:
        return theirs in {"leaf", "core", mine} | LIBRARY[mine]
    return True  # the run's edges may import anything but main.py (not in the package)


GRAPH = {m: imports(p, set(modules())) for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_module_imports_only_what_its_folder_may(module):
    wrong = [f"line {line}: {target} ({group(target)})" for target, line, _, _ in GRAPH[module] if not allowed(module, target)]
    assert not wrong, f"{module} ({group(module)}) may not import: {wrong}"


def find_loop(edges: dict[str, set[str]]) -> list[str] | None:
    """One import loop (a -> b -> ... -> a) of the graph, or None: depth-first search."""
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (loop := visit(nxt, path + [node])):
                return loop
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (loop := visit(module, [])):
            return loop
    return None


def test_no_import_loop_anywhere():
    # A package's __init__ counts as its folder, not as a loop with its own members.
    edges = {m: {t for t, *_ in found if t != m and not m.startswith(t + ".")} for m, found in GRAPH.items()}
    loop = find_loop(edges)
    assert loop is None, f"import loop: {' -> '.join(loop)}"


def test_the_loop_finder_finds_a_loop_through_three_modules():
    assert find_loop({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_loop({"a": {"b"}, "b": set()}) is None


def test_an_import_of_our_own_inside_a_function_says_why():
    silent = [f"{m} line {line}" for m, found in GRAPH.items() for _, line, inside, text in found if inside and "#" not in text]
    assert not silent, f"function-level imports of tuner modules without the reason beside them: {silent}"


def test_the_rule_catches_what_it_is_for():
    """Negative controls: a data module importing the trainer, a leaf importing config, influence importing train."""
    assert not allowed("tuner.data.mix", "tuner.train.trainer")
    assert not allowed("tuner.common", "tuner.config")
    assert not allowed("tuner.influence.tracker", "tuner.train.callbacks")
    assert not allowed("tuner.train.trainer", "tuner.influence.tracker")
    assert allowed("tuner.validate", "tuner.influence.scores") and allowed("tuner.train.trainer", "tuner.data.packing")


def test_relative_imports_are_read_as_the_modules_they_name():
    def first(source: str) -> ast.ImportFrom:
        return ast.parse(source).body[0]

    assert absolute(first("from . import formats"), "tuner.data") == "tuner.data"  # in the package's __init__
    assert absolute(first("from .mix import x"), "tuner.data.build") == "tuner.data.mix"
    assert absolute(first("from ..errors import x"), "tuner.data.mix") == "tuner.errors"
