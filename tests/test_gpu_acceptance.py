"""The GPU acceptance run (tests/benchmarks/gpu_acceptance.py) at its tiny size on the CPU: the same
checkpoint writers, CLI subprocesses, benchmarks, plan.py predictions and summary as the full run on a
GPU, so that the command a person runs first on a new GPU machine cannot rot between GPU runs."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "benchmarks" / "gpu_acceptance.py"


def table_rows(summary: str, section: str) -> list[list[str]]:
    """The cells of each row of the markdown table under `## section`."""
    lines = summary.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_tiny_run_passes_every_part(tmp_path):
    out, work = tmp_path / "summary.md", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(out), "--workdir", str(work)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = out.read_text()
    assert summary.splitlines()[0].startswith("# GPU acceptance run (tiny): PASS")
    assert all(row[1] == "ok" for row in table_rows(summary, "Parts"))

    for name in ("t2i/flux.png", "t2i/sd3.png", "sr/op4ksr.png", "sr/cupscale.png"):
        with Image.open(work / "out" / name) as image:
            assert image.size == (256, 256), name
    assert (work / "sd3" / "text_encoder_3").is_symlink()  # one T5 for Flux and SD3

    clis = table_rows(summary, "CLIs end to end")
    assert len(clis) == 6 and all(row[1] == "0" for row in clis)
    benchmarks = table_rows(summary, "Benchmarks beside plan.py's predictions")
    assert {row[1] for row in benchmarks} == {"ours", "diffusers"}  # the suite installs diffusers
    assert all(row[3] != "-" for row in benchmarks), "a benchmark without plan.py's prediction"
    metrics = summary.split("## Metric values", 1)[1]
    for name in ("glcm", "cr", "psnr", "lpips", "fid", "periodicity"):
        assert f" {name} " in metrics, name
