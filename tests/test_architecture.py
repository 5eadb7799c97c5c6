"""The house's shape (issue #20): rooms, the arrows between them, no import cycles.

`docs/ARCHITECTURE.md` is the map; these tests keep the map and the tree in agreement.
Imports are read from the source (every ``import`` statement, at module level, inside
functions and under ``TYPE_CHECKING`` alike), so a cycle hidden behind a lazy import is a
cycle here too.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "adapters")
# The engine's rooms: each a package with an __init__ exporting what the rest may use.
ROOMS = ("bench", "cache", "cli", "cluster", "endpoint", "report", "tracing", "training")
# Applications on the engine: nothing in the core imports them (``python -m engine``,
# engine/__main__.py, is the command line's launcher: part of the application).
APPLICATIONS = ("engine.cli", "engine.bench", "engine.__main__")
# Entry points whose keyword lists are the public API (documented one by one).
PUBLIC_ENTRY_POINTS = {"evaluate", "optimize", "__init__"}
MAX_PARAMETERS = 12


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[tuple[str, pathlib.Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield _module_name(path), path


def _targets(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, wherever the import statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            if submodules and len(submodules) == len(node.names):
                found.update(submodules)  # `from . import x`: x alone, not its package
            elif target in known:
                found.add(target)
                found.update(submodules)
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    sources = dict(_sources())
    known = set(sources)
    return {module: _targets(module, path, known) for module, path in sources.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_lazy_or_not() -> None:
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    """The finder itself: a cycle through a function-level import is a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_the_applications() -> None:
    """The CLI and the benchmark tool are applications on the engine: no arrow back."""
    offenders = []
    for module, targets in _graph().items():
        if not module.startswith("engine") or module.startswith(APPLICATIONS):
            continue
        offenders += [f"{module} -> {t}" for t in targets if t.startswith(APPLICATIONS)]
    assert offenders == []


def test_nothing_in_the_engine_imports_the_engine_package_itself() -> None:
    """`engine/__init__` imports every room; a module importing it back is a cycle.
    (Adapters are outside the engine: they import its public names, as users do.)"""
    offenders = [
        m for m, targets in _graph().items() if m.startswith("engine.") and "engine" in targets
    ]
    assert offenders == []


def test_rooms_are_packages_and_the_top_level_stays_small() -> None:
    for room in ROOMS:
        assert (ROOT / "engine" / room / "__init__.py").is_file(), room
    top_level = sorted(p.name for p in (ROOT / "engine").glob("*.py"))
    assert len(top_level) <= 30, top_level


def test_the_architecture_map_names_only_rooms_that_exist() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`(engine/[\w/]+?)/?`", text)) | set(
        re.findall(r"`(adapters/[\w/]+?)/?`", text)
    )
    assert named, "the map names no package"
    missing = [
        n for n in sorted(named) if not (ROOT / n).exists() and not (ROOT / f"{n}.py").exists()
    ]
    assert missing == []
    for room in ROOMS:
        assert f"`engine/{room}/`" in text, f"the map does not describe engine/{room}/"


def test_no_function_takes_more_than_twelve_parameters() -> None:
    """Long keyword lists are the public entry points' documented API; everything
    inside passes one options value instead of relaying the list."""
    offenders = []
    for module, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            count -= bool(args.args and args.args[0].arg in {"self", "cls"})
            public = node.name in PUBLIC_ENTRY_POINTS
            if count > MAX_PARAMETERS and not public:
                offenders.append(f"{module}:{node.lineno} {node.name} ({count})")
    assert offenders == []


def test_no_test_module_imports_another_test_module() -> None:
    """Shared fixtures live in ``conftest.py`` and shared plain helpers in
    ``tests/support.py``; a test module importing another runs (and couples to) it."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            imported: list[str] = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                imported = [module] + [f"{module}.{alias.name}" for alias in node.names]
            hits = {part for name in imported for part in name.split(".") if part in names}
            offenders += [f"{path.name} -> {hit}" for hit in sorted(hits - {path.stem})]
    assert offenders == []
