"""Each method file carries its own copy of the shared model code, so that it can be copied alone.
The copies are whole kits between BEGIN/END lines (see tests/sync_copies.py); this test keeps each
one identical, as raw text, to the kit in its source file."""

import ast
import itertools

import pytest
from sync_copies import FILES, ROOT, copies, first_difference, kits, unmatched_markers

COPYING = {"op4ksr.py": "diffusion4k.py", "cupscale.py": "diffusion4k.py", "metrics.py": "op4ksr.py"}


def text(name: str) -> str:
    return (ROOT / name).read_text()


def copy_blocks():
    return [(name, match) for name in FILES for match in copies(text(name))]


@pytest.mark.parametrize("name", FILES)
def test_markers_pair_up(name):
    assert unmatched_markers(text(name)) == 0, f"{name}: a BEGIN or END line without its partner"


@pytest.mark.parametrize("name, match", copy_blocks(), ids=lambda v: v if isinstance(v, str) else v["name"])
def test_copy_equals_its_kit(name, match):
    source = kits(text(match["source"]))
    assert match["name"] in source, f"{name} copies kit {match['name']!r}, which {match['source']} does not mark"
    if match["body"] != source[match["name"]]:
        number, ours, theirs = first_difference(match["body"], source[match["name"]])
        pytest.fail(
            f"{name}, copy of {match['source']} kit {match['name']!r}, line {number} of the kit differs:\n"
            f"  copy:   {ours!r}\n  source: {theirs!r}\n"
            "edit the source and run `python tests/sync_copies.py`"
        )


def top_level_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("name", sorted(COPYING))
def test_nothing_is_copied_outside_the_markers(name):
    """A file that copies kits uses them whole: no definition of a kit is repeated or altered elsewhere."""
    own = text(name)
    for match in reversed(copies(own)):
        own = own[: match.start()] + own[match.end():]
    shared = set()
    for kit in kits(text(COPYING[name])).values():
        shared |= top_level_names(kit)
    assert not top_level_names(own) & shared, f"{name} redefines kit code outside the copy markers"


def test_each_file_copies_what_it_uses():
    used = {name: {m["name"] for m in copies(text(name))} for name in COPYING}
    assert {"Flux transformer", "F16 VAE", "VAE", "text encoders", "LPIPS"} <= used["op4ksr.py"]
    assert "SD3 transformer" not in used["op4ksr.py"]
    assert {"SD3 transformer", "F16 VAE", "VAE", "Haar wavelets", "pipeline"} <= used["cupscale.py"]
    assert "Flux transformer" not in used["cupscale.py"]
    assert used["metrics.py"] == {"periodicity loss"}


def test_a_drifted_comment_fails_and_sync_repairs_it(tmp_path, monkeypatch):
    """A comment edited inside a copy is found (with its line), and sync_copies.py restores it."""
    import sync_copies

    for name in FILES:
        (tmp_path / name).write_text(text(name))
    monkeypatch.setattr(sync_copies, "ROOT", tmp_path)
    original = text("cupscale.py")
    block = next(m for m in copies(original) if "\n    # " in m["body"])
    lines = block["body"].splitlines(keepends=True)
    line = next(i for i, item in enumerate(lines) if item.lstrip().startswith("# "))
    lines[line] = lines[line].rstrip("\n") + " (drifted)\n"
    drifted = original[: block.start("body")] + "".join(lines) + original[block.end("body"):]
    (tmp_path / "cupscale.py").write_text(drifted)

    match = next(m for m in copies(drifted) if m["name"] == block["name"])
    number, ours, _ = first_difference(match["body"], kits(text(match["source"]))[match["name"]])
    assert number == line + 1 and ours.endswith("(drifted)")
    assert sync_copies.main(["--check"]) == 1
    assert sync_copies.main([]) == 0
    assert (tmp_path / "cupscale.py").read_text() == original


def test_one_name_one_meaning():
    """A top-level name defined in two files (a kit's copy or not) has the same text in both."""
    definitions = {name: top_level_definitions(text(name)) for name in FILES}
    for first, second in itertools.combinations(FILES, 2):
        shared = definitions[first].keys() & definitions[second].keys() - {"main"}
        different = sorted(n for n in shared if definitions[first][n] != definitions[second][n])
        assert not different, f"{first} and {second} give these names different meanings: {different}"


def top_level_definitions(source: str) -> dict[str, str]:
    found = {}
    for node in ast.parse(source).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        if isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
        found.update(dict.fromkeys(names, ast.get_source_segment(source, node)))
    return found
