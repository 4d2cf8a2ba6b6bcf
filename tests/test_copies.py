"""Each method file carries its own copy of the shared model code (so it can be copied alone).
This test keeps the copies identical: every top-level function or class defined under the same
name in two method files must have the same source text."""

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD_FILES = ["diffusion4k.py", "op4ksr.py", "cupscale.py"]
PER_FILE = {"main"}  # entry points that are meant to differ; any other shared name is a copy


def top_level_definitions(path: Path) -> dict[str, str]:
    source = path.read_text()
    tree = ast.parse(source)
    return {
        node.name: ast.get_source_segment(source, node)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }


@pytest.mark.parametrize("first, second", list(itertools.combinations(METHOD_FILES, 2)))
def test_shared_definitions_are_identical(first, second):
    a, b = top_level_definitions(ROOT / first), top_level_definitions(ROOT / second)
    different = sorted(name for name in (a.keys() & b.keys()) - PER_FILE if a[name] != b[name])
    assert not different, f"{first} and {second} define these differently: {different}"


def test_the_shared_wavelet_is_shared():
    assert "haar_dwt" in top_level_definitions(ROOT / "cupscale.py")
    assert "haar_dwt" in top_level_definitions(ROOT / "diffusion4k.py")
