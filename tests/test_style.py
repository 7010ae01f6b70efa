"""The shape the code keeps (../shared/docs/STYLE.md): short functions, no test machinery in production code,
each stage's heavy imports in one place. Read from the source with `ast`, so each check can fail."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
MAX_FUNCTION_LINES = 60
STAGES = ("generate", "train", "evaluate")


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(source)
    return [
        f"{f.name}: {f.end_lineno - f.lineno + 1} lines" for f in functions(tree) if f.end_lineno - f.lineno >= limit
    ]


@pytest.mark.parametrize("path", sorted(PIPELINE.glob("*.py")), ids=lambda p: p.name)
def test_no_function_is_longer_than_60_lines(path: Path) -> None:
    assert long_functions(path.read_text()) == []


def test_the_length_check_counts_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [f"f: {MAX_FUNCTION_LINES + 1} lines"]
    assert long_functions("def g():\n    return 1\n") == []


@pytest.mark.parametrize("path", sorted(PIPELINE.glob("*.py")), ids=lambda p: p.name)
def test_production_code_does_not_use_test_machinery(path: Path) -> None:
    names = imported(ast.parse(path.read_text()))
    assert not {n for n in names if n == "unittest" or n.startswith(("unittest.", "pytest"))}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_has_no_type_checking_imports_and_one_deferred_import(stage: str) -> None:
    tree = ast.parse((PIPELINE / f"{stage}.py").read_text())
    assert "TYPE_CHECKING" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    # Imports inside functions: at most one function holds them (the stage's body, after the worker starts).
    holders = {f.name for f in functions(tree) for n in ast.walk(f) if isinstance(n, ast.Import | ast.ImportFrom)}
    assert len(holders) <= 1, holders


TEAM_SERVER = PIPELINE.parent / "team_server"


@pytest.mark.parametrize("path", sorted(TEAM_SERVER.glob("*.py")), ids=lambda p: p.name)
def test_the_team_server_keeps_the_same_shape(path: Path) -> None:
    names = imported(ast.parse(path.read_text()))
    assert long_functions(path.read_text()) == []
    assert not {n for n in names if n == "unittest" or n.startswith(("unittest.", "pytest", "tests"))}


@pytest.mark.parametrize("path", sorted(PIPELINE.glob("*.py")), ids=lambda p: p.name)
def test_the_pipeline_never_imports_the_team_server(path: Path) -> None:
    """Operations depend on the pipeline, not the other way: the pipeline runs without them."""
    assert not {n for n in imported(ast.parse(path.read_text())) if n.split(".")[0] == "team_server"}
