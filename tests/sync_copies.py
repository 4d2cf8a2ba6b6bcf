"""Rewrite every copied kit from its source: `python tests/sync_copies.py` (--check only reports).

A source file marks a kit as
    # --- BEGIN kit: <name> ---  ...  # --- END kit: <name> ---
and a file that copies it holds the same text, comments and constants included, between
    # --- BEGIN copy of <source file>: <name> ---  ...  # --- END copy: <name> ---
diffusion4k.py is the source of the models, loaders and training utilities; op4ksr.py of the
periodicity loss that metrics.py copies. Edit a kit in its source, then run this script.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["diffusion4k.py", "op4ksr.py", "cupscale.py", "metrics.py"]
KIT = re.compile(
    r"^# --- BEGIN kit: (?P<name>.+?) ---\n(?P<body>.*?)^# --- END kit: (?P=name) ---$", re.S | re.M
)
COPY = re.compile(
    r"^# --- BEGIN copy of (?P<source>\S+): (?P<name>.+?) ---\n"
    r"(?P<body>.*?)^# --- END copy: (?P=name) ---$",
    re.S | re.M,
)
MARKER = re.compile(r"^# --- (BEGIN|END) ", re.M)


def kits(text: str) -> dict[str, str]:
    """Kit name -> its text (the lines between the markers) in a source file."""
    found = {}
    for match in KIT.finditer(text):
        if match["name"] in found:
            raise ValueError(f"kit {match['name']!r} is defined twice")
        found[match["name"]] = match["body"]
    return found


def copies(text: str) -> list[re.Match]:
    return list(COPY.finditer(text))


def unmatched_markers(text: str) -> int:
    """How many BEGIN/END lines belong to no complete kit or copy (a typo or a lost END line)."""
    paired = 2 * (len(KIT.findall(text)) + len(COPY.findall(text)))
    return len(MARKER.findall(text)) - paired


def first_difference(copy: str, source: str) -> tuple[int, str, str]:
    """(line number inside the kit, copy's line, source's line) of the first line that differs."""
    copy_lines, source_lines = copy.splitlines(), source.splitlines()
    for number, (ours, theirs) in enumerate(zip(copy_lines, source_lines), 1):
        if ours != theirs:
            return number, ours, theirs
    number = min(len(copy_lines), len(source_lines)) + 1
    return number, line_or_end(copy_lines, number), line_or_end(source_lines, number)


def line_or_end(lines: list[str], number: int) -> str:
    return lines[number - 1] if number <= len(lines) else "<end of kit>"


def read_source(name: str) -> str:
    return (ROOT / name).read_text()


def synced(text: str) -> str:
    """text with every copy block replaced by the current text of its kit."""

    def replace(match):
        body = kits(read_source(match["source"]))[match["name"]]
        begin = f"# --- BEGIN copy of {match['source']}: {match['name']} ---"
        return f"{begin}\n{body}# --- END copy: {match['name']} ---"

    return COPY.sub(replace, text)


def main(argv) -> int:
    check_only = "--check" in argv
    stale = []
    for name in FILES:
        path = ROOT / name
        text = path.read_text()
        new = synced(text)
        if new != text:
            stale.append(name)
            if not check_only:
                path.write_text(new)
    verb = "out of date" if check_only else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "all copies are in sync")
    return 1 if stale and check_only else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
