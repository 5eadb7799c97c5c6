"""Layering: engine never imports adapters, and keeps no module-level mutable state."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_engine_never_imports_adapters_or_provider_sdks() -> None:
    """Dependencies point adapters -> engine; the engine imports no provider SDK."""
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in {
                "adapters",
                "openai",
                "httpx",
                "httpx2",
                "aiohttp",
                "starlette",
                "uvicorn",
            }:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_engine_has_no_global_rng_or_logging_configuration() -> None:
    """No random.seed / module-level random use, no logging or structlog configure."""
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        text = path.read_text()
        for needle in (
            "random.seed(",
            "structlog.configure(",
            "logging.basicConfig(",
            "import pickle",
        ):
            # the CLI is an application: it configures logging inside main(), never on import
            exempt = "cli" in path.parts and needle == "structlog.configure("
            if needle in text and not exempt:
                offenders.append(f"{path.name}: {needle}")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "random"
                and node.func.attr not in {"Random"}
            ):
                offenders.append(f"{path.name}: random.{node.func.attr}()")
    assert offenders == []


def test_public_api_is_exported() -> None:
    import engine

    for name in (
        "Prompt",
        "Example",
        "Limits",
        "evaluate",
        "Evaluation",
        "MetricResult",
        "metrics",
    ):
        assert name in engine.__all__
        assert hasattr(engine, name)


def test_importing_the_library_configures_no_logging() -> None:
    """Importing engine (and its CLI module) leaves the host's structlog untouched."""
    import subprocess
    import sys

    code = "import structlog, engine, engine.cli, adapters; print(structlog.is_configured())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _logic_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from a function's first statement after its docstring to its end: its
    logic, without the signature and the parameter docs that document it."""
    body = node.body
    first = body[1] if len(body) > 1 and ast.get_docstring(node) is not None else body[0]
    return (node.end_lineno or first.lineno) - first.lineno + 1


def test_no_function_in_engine_or_adapters_is_over_60_lines() -> None:
    """Small functions (issue #13): at most 60 lines of logic each.  The simulated
    server's fault table and the public entry points' long documented signatures are
    counted by their logic, not their parameter lists."""
    offenders = []
    for package in ("engine", "adapters"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = _logic_lines(node)
                    if length > 60:
                        offenders.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}"
                        )
    assert offenders == []
