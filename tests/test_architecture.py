"""The house rules, checked: one direction of flow, no import cycles, per-database code in one place, strict
typing, formatted and linted code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reaper"
DATABASE_NAMES = {"postgresql", "postgres", "mysql", "mariadb", "sqlite"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_layers_hold():
    """pyproject.toml's import-linter contracts: cli > service > commands > output > reaping > backends > ledger
    > analysis | db > profiles > config > errors, and nothing above the backends imports SQL."""
    res = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("reaper")
    modules = sorted(graph.modules)
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            # A package importing its own submodules (its __init__) is not a cycle of the flow.
            if imported.startswith(module + "."):
                continue
            if graph.chain_exists(importer=imported, imported=module):
                chain = graph.find_shortest_chain(importer=imported, imported=module)
                cycles.append(f"{module} -> {' -> '.join(chain or [])}")
    assert not cycles, "\n".join(cycles)


def _database_comparisons(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            if any(isinstance(v, ast.Constant) and v.value in DATABASE_NAMES for v in values):
                lines.append(node.lineno)
    return lines


def test_no_database_name_comparison_outside_the_per_database_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "db"):
            continue
        for line in _database_comparisons(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, "per-database decisions belong in reaper/db/impl.py: " + ", ".join(found)


def test_the_rule_itself_catches_a_branch():
    """Control: the checker sees the kinds of branch it forbids."""
    code = "if engine.dialect.name == 'sqlite': pass\nif x in ('mysql', 'mariadb'): pass\n"
    assert _database_comparisons(ast.parse(code)) == [1, 2]


def test_the_compiler_compares_with_the_clock_only_through_later():
    """Incremental ticks skip a condition for rows where no value it compares with the clock crossed a threshold
    (`Compiler._later` records them): a comparison written any other way would be missed, and a flip with it.
    `self.now` may only reach `_later` and the compiler an EXISTS makes for its other table (not windowed)."""
    tree = ast.parse((PACKAGE / "db" / "compiler.py").read_text(encoding="utf-8"))
    elsewhere = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.name in ("__init__", "_later"):
            continue
        handles = (
            ast.unparse(fn.args.args[1].annotation) if len(fn.args.args) > 1 and fn.args.args[1].annotation else ""
        )
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and node.attr == "now" and ast.unparse(node.value) == "self":
                if handles != "c.Exists":
                    elsewhere.append(f"{fn.name} ({handles or 'no condition'}), line {node.lineno}")
    assert not elsewhere, "compare with the clock through Compiler._later: " + ", ".join(elsewhere)


@pytest.mark.slow
def test_mypy_strict_is_clean():
    res = run("mypy", "--strict", "reaper")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_lint_and_format_are_clean():
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
