"""Form of the method files: ruff for line length, import order and pyflakes (unused or undefined names),
with explicit arguments so that no configuration file is involved, and an AST check for three habits
that read badly."""

import ast
import subprocess
import sys

import pytest
from sync_copies import FILES, ROOT

CHECKED = FILES + ["common", "tests/sync_copies.py", "tests/test_style.py"]


def test_ruff_line_length_import_order_and_names():
    options = ["--isolated", "--select", "E501,I,F", "--line-length", "110"]
    command = [sys.executable, "-m", "ruff", "check", *options, *CHECKED]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def awkward_constructs(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Lambda) and isinstance(node.body, ast.Lambda):
            found.append(f"line {node.lineno}: a lambda returning a lambda")
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.IfExp):
            found.append(f"line {node.lineno}: a statement written as a conditional expression")
        is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        formatted_name = is_call and bool(node.args) and isinstance(node.args[0], ast.JoinedStr)
        if formatted_name and node.func.attr == "add_module":
            found.append(f"line {node.lineno}: add_module with a formatted name")
    return found


@pytest.mark.parametrize("name", FILES)
def test_no_awkward_constructs(name):
    assert awkward_constructs((ROOT / name).read_text()) == []


def test_the_construct_check_finds_them():
    source = "f = lambda a: lambda b: a + b\nx if y else z\nfor i in r:\n    m.add_module(f'n{i}', n)\n"
    assert len(awkward_constructs(source)) == 3


@pytest.mark.parametrize("name", FILES)
def test_module_docstring_fits_a_screen(name):
    """Paper, method with its equations, commands and the order of the rest of the file: 40 lines at most."""
    docstring = ast.get_docstring(ast.parse((ROOT / name).read_text()), clean=False)
    assert docstring and len(docstring.splitlines()) <= 40
