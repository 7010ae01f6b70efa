"""dvc.yaml's deps are exactly the pipeline code each stage runs: editing any of it re-runs the stage, and a file
the stage never runs does not.

What a stage runs is derived statically, with `ast`: the closure of its `python -m pipeline.<module>` over the
package's imports, module level or inside functions (the stages import lazily), but not those under
`if TYPE_CHECKING:`, which never execute. Code started by name or loaded by path counts too: a string constant
that is exactly a module's name (as `python -m` or multiprocessing would start it) or a file's
name ("mlflow_model.py", which the tracking worker hands to MLflow to execute). Whole strings only, so prose that
mentions a module (docstrings, messages) adds nothing.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.helpers import REPO

PACKAGE = "pipeline"


def module_file(root: Path, name: str) -> Path | None:
    """The file that importing the dotted module `name` runs, if it is a module or package under root."""
    base = root.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def executed_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree but those under `if TYPE_CHECKING:` (its `else:` does run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`: true only for type checkers."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def referenced_names(name: str, path: Path) -> Iterator[str]:
    """The dotted names that module `name` (its file: path) imports or starts, some maybe not modules at all."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in executed_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # Relative: level 1 is this module's package, each further level one package up.
            parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parts, *(node.module or "").split(".")]).strip(".")
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from pipeline import loop`: a module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.endswith(".py"):  # a file by name, beside this one: Path(__file__).with_name(...)
                yield ".".join([*package, node.value.removesuffix(".py")])
            else:  # a module by name, e.g. for `python -m`
                yield node.value


def closure(root: Path, entry: str) -> set[str]:
    """The files (relative to root) of the package's modules that running `python -m entry` executes."""
    todo, seen = [entry], set[Path]()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] != entry.split(".")[0]:
            continue  # another package: not this project's code
        # Importing a.b.c first runs a/__init__.py and a/b/__init__.py.
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            path = module_file(root, prefix)
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(referenced_names(prefix, path))
    return {p.relative_to(root).as_posix() for p in seen}


def stages() -> dict[str, Any]:
    """dvc.yaml's stages by name, read as DVC reads it (ruamel.yaml, YAML 1.2)."""
    return dict(YAML(typ="safe").load(REPO / "dvc.yaml")["stages"])


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_deps_are_the_code_it_runs(stage: str) -> None:
    spec = stages()[stage]
    words = shlex.split(str(spec["cmd"]))
    assert words[:2] == ["python", "-m"] and words[2].startswith(f"{PACKAGE}."), (
        f"stage {stage!r}: cmd {spec['cmd']!r} is not `python -m {PACKAGE}.<module> ...`; teach this test how it runs"
    )
    runs = closure(REPO, words[2])
    listed = {d for d in spec.get("deps", []) if d.startswith(f"{PACKAGE}/")}  # data files (${paths.x}) aside
    problems = [
        f"stage {stage!r} runs {f}, missing from its deps: editing it would not re-run it"
        for f in sorted(runs - listed)
    ]
    problems += [f"stage {stage!r} lists {f} in its deps but never runs it: remove it" for f in sorted(listed - runs)]
    assert not problems, "dvc.yaml deps out of date:\n  " + "\n  ".join(problems)


def test_closure_of_a_synthetic_package(tmp_path: Path) -> None:
    """closure() on a package of every kind of reference, so that the test above cannot pass vacuously."""
    files = {
        "pkg/__init__.py": "",
        "pkg/main.py": (
            "from typing import TYPE_CHECKING\nimport os\n"
            "if TYPE_CHECKING:\n    from pkg import typing_only\nelse:\n    import pkg.runtime_else\n"
            "def run():\n    from pkg.sub import lazy\n    return lazy, 'pkg.started', 'loaded.py'\n"
        ),
        "pkg/typing_only.py": "",
        "pkg/runtime_else.py": "",
        "pkg/sub/__init__.py": "",
        "pkg/sub/lazy.py": "from .. import relative_up\nfrom .sibling import x\n",
        "pkg/sub/sibling.py": "x = 1",
        "pkg/relative_up.py": "",
        "pkg/started.py": "",
        "pkg/loaded.py": "",
        "pkg/unused.py": "import pkg.main",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    expected = set(files) - {"pkg/typing_only.py", "pkg/unused.py"}
    assert closure(tmp_path, "pkg.main") == expected
