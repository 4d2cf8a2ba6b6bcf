"""metrics.py given bad input: broken or misplaced files, out-of-range numbers, clashing outputs.

Every case must answer with exit code 2 and one short line (no traceback), print no table, and
leave the tree of files exactly as it was: no output, no staging folder, existing files
byte-identical. Only metrics that need no weights run (glcm, cr, psnr, ssim, periodicity); the
images are tiny, so the whole file takes seconds.
"""

import json
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
from common.io import run_cli

H, W = 64, 96  # one row of 64-px GLCM patches; too small for the periodicity lattice
DATA = Path(__file__).parent / "data" / "metrics"


def texture(seed, h=H, w=W):
    rng = np.random.default_rng(seed)
    x = np.arange(w)[None, :, None]
    return np.clip(120 + 60 * np.sin(x / (3 + seed)) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def save_images(folder, stems, h=H, w=W):
    folder.mkdir()
    for i, stem in enumerate(stems):
        Image.fromarray(texture(i, h, w)).save(folder / f"{stem}.png")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_bad_input")
    stems = ["0000", "0001", "0002"]
    for name in ("pred", "ref", "done", "spectra_done"):
        save_images(root / name, stems)
    save_images(root / "ref_other", ["0000", "0001", "9999"])
    save_images(root / "ref_mixed", stems)
    Image.fromarray(texture(1, H - 8, W)).save(root / "ref_mixed" / "0001.png")
    save_images(root / "corrupt", stems)
    (root / "corrupt" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    (root / "done" / "metrics.json").write_text('{"metrics": {"glcm": 1.0}}')
    (root / "spectra_done" / "0000_spectrum.png").write_bytes(b"an earlier run's picture")
    (root / "existing.json").write_text('{"keep": true}')
    (root / "file.txt").write_text("a file, not a folder")
    (root / "latin1.jsonl").write_bytes('{"file_name": "0000.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    (root / "bad.jsonl").write_text('{"file_name": "0000.png", "text": "ok"}\n[1, 2]\n')
    (root / "junk.npz").write_bytes(b"not a zip archive")
    (root / "junk.mat").write_bytes(b"MATLAB? no")
    # weights that are not float, or not tensors, or not finite (issue 17)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.ones(32, 3, 3, 3, dtype=torch.int8)}, root / "int8.pth")
    torch.save({"epoch": 3, "layers.0.weight": torch.ones(2, 2)}, root / "not_tensors.pth")
    from safetensors.torch import save_file

    save_file({"visual.conv1.weight": torch.ones(2, 2, dtype=torch.int8)}, root / "int8.safetensors")
    with np.load(DATA / "niqe_pris_params.npz") as data:
        mu, cov = data["mu_pris_param"].copy(), data["cov_pris_param"]
    mu.flat[5] = np.nan
    np.savez(root / "nan_niqe.npz", mu_pris_param=mu, cov_pris_param=cov)
    return root


def snapshot(root):
    """Every folder and file under root (hidden ones included) with the files' bytes."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def shown_lines(err):
    """The lines a terminal shows: a progress bar erases itself with a carriage return."""
    return [shown for line in err.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]


# (case id, arguments with {r} for the fixture's folder, a part of the expected message)
CASES = [
    # paths of the wrong kind
    ("pred is a file", "--pred {r}/file.txt",
     "argument --pred: {r}/file.txt is a file; a folder is expected"),
    ("pred missing", "--pred {r}/nowhere", "argument --pred: {r}/nowhere: no such folder"),
    ("no pred", "--metrics glcm", "the following arguments are required: --pred"),
    ("ref is a file", "--pred {r}/pred --ref {r}/file.txt --metrics psnr",
     "argument --ref: {r}/file.txt is a file"),
    ("pred without images", "--pred {r}/empty", "{r}/empty: no images"),
    ("prompts not UTF-8", "--pred {r}/pred --prompts {r}/latin1.jsonl --metrics clip",
     "latin1.jsonl: the prompts file is not UTF-8"),
    ("prompts is a folder", "--pred {r}/pred --prompts {r}/pred --metrics clip",
     "argument --prompts: {r}/pred is a folder; a file"),
    ("prompts not JSON lines", "--pred {r}/pred --prompts {r}/bad.jsonl --metrics clip",
     "bad.jsonl:2: expected a JSON object"),
    ("niqe params junk npz", "--pred {r}/pred --metrics niqe --niqe-params {r}/junk.npz",
     "junk.npz is not a NIQE model file"),
    ("niqe params junk mat", "--pred {r}/pred --metrics niqe --niqe-params {r}/junk.mat",
     "junk.mat is not a NIQE model file"),
    ("niqe params folder", "--pred {r}/pred --metrics niqe --niqe-params {r}/pred",
     "argument --niqe-params: {r}/pred is a folder"),
    ("inception folder", "--pred {r}/pred --ref {r}/ref --metrics fid --inception {r}/ref",
     "argument --inception: {r}/ref is a folder"),
    ("clip model file", "--pred {r}/pred --clip-model {r}/file.txt",
     "argument --clip-model: {r}/file.txt is a file"),
    # weights that cannot be weights: refused in one line before any image is read
    ("int8 inception", "--pred {r}/pred --ref {r}/ref --metrics fid --inception {r}/int8.pth",
     "{r}/int8.pth: tensor Conv2d_1a_3x3.conv.weight is int8, not floating point"),
    ("pth holding non-tensors", "--pred {r}/pred --metrics aesthetic --aesthetic-mlp {r}/not_tensors.pth",
     "{r}/not_tensors.pth: entry epoch is a int, not a tensor"),
    ("int8 clipiqa safetensors", "--pred {r}/pred --metrics clipiqa --clipiqa-weights {r}/int8.safetensors",
     "{r}/int8.safetensors: tensor visual.conv1.weight is int8, not floating point"),
    ("lpips backbone of non-tensors", "--pred {r}/pred --ref {r}/ref --metrics lpips --lpips-backbone {r}/not_tensors.pth",
     "{r}/not_tensors.pth: entry epoch is a int, not a tensor"),
    ("NaN in niqe params", "--pred {r}/pred --metrics niqe --niqe-params {r}/nan_niqe.npz",
     "{r}/nan_niqe.npz holds NaN or Inf values"),
    # numbers out of range
    ("crop border beyond the image", "--pred {r}/pred --ref {r}/ref --metrics psnr --crop-border 500",
     "0000: crop border 500 leaves nothing of the 96x64 image (at most 31)"),
    ("crop border leaves less than SSIM's window",
     "--pred {r}/pred --ref {r}/ref --metrics ssim --crop-border 28",
     "0000: 40x8 px (after the crop border) is smaller than SSIM's 11x11 window"),
    ("crop border negative", "--pred {r}/pred --crop-border -1",
     "argument --crop-border: must be >= 0, got -1"),
    ("crop border not an integer", "--pred {r}/pred --crop-border 4.5",
     "argument --crop-border: expected an integer, got '4.5'"),
    ("lpips tile too small", "--pred {r}/pred --tile 16",
     "argument --tile: must be 0 (whole image) or >= 32, got 16"),
    ("fid patch negative", "--pred {r}/pred --fid-patch -64", "argument --fid-patch: must be >= 0"),
    ("fid size negative", "--pred {r}/pred --fid-size -2048", "argument --fid-size: must be >= 0, got -2048"),
    ("fid size a word", "--pred {r}/pred --fid-size auto",
     "argument --fid-size: expected an integer, got 'auto' (or pred: the generated images' size)"),
    ("clipiqa tile too small", "--pred {r}/pred --clipiqa-tile 8",
     "argument --clipiqa-tile: must be 0 (whole image) or >= 32"),
    ("quadrants not square", "--pred {r}/pred --quadrants 3",
     "argument --quadrants: must be a square number"),
    ("quadrants absurd", "--pred {r}/pred --quadrants 1000000",
     "argument --quadrants: must be in [1, 10000]"),
    ("harmonics zero", "--pred {r}/pred --harmonics 0", "argument --harmonics: must be >= 1, got 0"),
    ("periods not integers", "--pred {r}/pred --periods 16,x",
     "argument --periods: expected comma-separated integers >= 2"),
    ("period one", "--pred {r}/pred --periods 1",
     "argument --periods: expected comma-separated integers >= 2, got '1'"),
    ("periodicity on too small images", "--pred {r}/pred --metrics periodicity",
     "0000: image 96x64 too small for periods (16, 32)"),
    # names and choices
    ("unknown metric", "--pred {r}/pred --metrics glcm,sharpness",
     "argument --metrics: unknown metric sharpness; choose from glcm, cr, fid, clip, aesthetic, psnr, ssim"),
    ("no metric", "--pred {r}/pred --metrics ,", "argument --metrics: no metric given; choose from glcm"),
    ("unknown device", "--pred {r}/pred --device gpu", "argument --device: 'gpu' is not a device"),
    ("unknown on-error", "--pred {r}/pred --on-error ignore",
     "argument --on-error: invalid choice: 'ignore'"),
    ("unknown option", "--pred {r}/pred --frobnicate", "unrecognized arguments: --frobnicate"),
    ("unknown protocol", "--pred {r}/pred --protocol diffusion-4k",
     "argument --protocol: invalid choice: 'diffusion-4k'"),
    ("protocol without a value", "--pred {r}/pred --protocol", "argument --protocol: expected one argument"),
    # requests that cannot run
    ("psnr without ref", "--pred {r}/pred --metrics psnr", "psnr needs --ref"),
    ("fid without any reference set", "--pred {r}/pred --metrics fid", "fid needs --ref or --fid-ref"),
    ("fid ref is a file", "--pred {r}/pred --metrics fid --fid-ref {r}/file.txt",
     "argument --fid-ref: {r}/file.txt is a file; a folder is expected"),
    ("fid ref missing", "--pred {r}/pred --metrics fid --fid-ref {r}/nowhere",
     "argument --fid-ref: {r}/nowhere: no such folder"),
    ("protocol pairs of other sizes", "--protocol op4ksr --pred {r}/pred --ref {r}/ref_mixed --metrics psnr",
     "0001: pred is 96x64 but ref is 96x56; paired metrics need equal sizes (or --resize-to-ref)"),
    ("clip without prompts", "--pred {r}/pred --metrics clip", "clip needs --prompts"),
    ("unmatched names", "--pred {r}/pred --ref {r}/ref_other --metrics psnr",
     "only in pred: 0002; only in ref: 9999"),
    ("sizes differ", "--pred {r}/pred --ref {r}/ref_mixed --metrics ssim",
     "0001: pred is 96x64 but ref is 96x56"),
    ("corrupt image", "--pred {r}/corrupt --metrics glcm --out {r}/new.json",
     "0001.png: not a readable image"),
    # outputs
    ("metrics.json exists", "--pred {r}/done --metrics glcm",
     "{r}/done/metrics.json exists; pass --overwrite"),
    ("out exists", "--pred {r}/pred --out {r}/existing.json", "{r}/existing.json exists; pass --overwrite"),
    ("out is a folder", "--pred {r}/pred --out {r}/ref",
     "{r}/ref is a folder; give a file name such as {r}/ref/output.json"),
    ("out not json", "--pred {r}/pred --out {r}/metrics.txt",
     "unsupported extension .txt (use one of .json)"),
    ("out under a file", "--pred {r}/pred --out {r}/file.txt/m.json", "{r}/file.txt is a file, not a folder"),
    ("spectra onto a file", "--pred {r}/pred --save-spectra {r}/file.txt",
     "argument --save-spectra: {r}/file.txt is a file; a folder is expected"),
    ("spectra exist", "--pred {r}/pred --out {r}/new.json --save-spectra {r}/spectra_done",
     "{r}/spectra_done/0000_spectrum.png exists; pass --overwrite"),
    ("spectra into pred", "--pred {r}/pred --out {r}/new.json --save-spectra {r}/pred",
     "--save-spectra: {r}/pred is --pred {r}/pred; an output never replaces an input"),
    ("spectra inside ref", "--pred {r}/pred --ref {r}/ref --out {r}/new.json --save-spectra {r}/ref/spectra",
     "--save-spectra: {r}/ref/spectra lies inside --ref {r}/ref"),
    # a run that fails half-way leaves nothing, --overwrite or not
    ("failure keeps the old json",
     "--pred {r}/done --ref {r}/ref --metrics psnr --crop-border 500 --overwrite",
     "crop border 500 leaves nothing"),
    ("failure leaves no spectra",
     "--pred {r}/pred --ref {r}/ref_mixed --metrics psnr --save-spectra {r}/new_spectra",
     "0001: pred is 96x64 but ref is 96x56"),
]


@pytest.mark.parametrize("argv, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(root, argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no case may reach the network
    before = snapshot(root)
    code = run_cli(M.main, [token.format(r=root) for token in argv.split()])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert message.format(r=root) in err
    lines = shown_lines(err)
    assert "Traceback" not in err and len(lines) <= 3 and lines[-1].startswith("error: "), err
    assert out == ""  # no table for a run that failed
    assert snapshot(root) == before  # no output, no temporary file, existing files untouched


def copy_images(source, folder):
    folder.mkdir()
    for image in source.glob("*.png"):
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


def test_two_runs_for_one_output_one_fails_cleanly(root, tmp_path, capsys, monkeypatch):
    """The other run writes the JSON while this one computes: this one stops without replacing it
    and publishes none of its spectra."""
    pred = copy_images(root / "pred", tmp_path / "pred")
    out, spectra = tmp_path / "m.json", tmp_path / "spectra"
    evaluate = M.evaluate

    def evaluate_while_another_run_finishes(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        out.write_text("the other run's result")
        return result

    monkeypatch.setattr(M, "evaluate", evaluate_while_another_run_finishes)
    argv = ["--pred", pred, "--metrics", "glcm,cr", "--out", out, "--save-spectra", spectra]
    code = run_cli(M.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "m.json exists" in err and shown_lines(err)[-1].startswith("error: ")
    assert out.read_text() == "the other run's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "pred"]  # no spectra, no staging folder


def test_overwrite_replaces_outputs_with_the_umask_mode(root, tmp_path, capsys):
    pred = copy_images(root / "pred", tmp_path / "pred")
    spectra = tmp_path / "spectra"
    (pred / "metrics.json").write_text("old")
    spectra.mkdir()
    (spectra / "0000_spectrum.png").write_bytes(b"old")
    argv = [str(a) for a in ["--pred", pred, "--metrics", "glcm", "--save-spectra", spectra, "--overwrite"]]
    mask = os.umask(0o027)
    try:
        code = run_cli(M.main, argv)
    finally:
        os.umask(mask)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads((pred / "metrics.json").read_text())["settings"]["metrics"] == ["glcm"]
    assert Image.open(spectra / "0000_spectrum.png").size == (W, H)  # replaced by a real picture
    # no autocorrelation pictures (the images are too small for its lags): only pictures made are published
    assert sorted(p.name for p in spectra.iterdir()) == [f"000{i}_spectrum.png" for i in range(3)]
    for path in [pred / "metrics.json", *spectra.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert f"wrote {pred / 'metrics.json'} and 3 images into {spectra}" in captured.err


def test_sigterm_while_spectra_are_written_leaves_nothing(root, tmp_path, capsys, monkeypatch):
    """run_cli turns SIGTERM into Terminated where the program is: the staging folder of the spectra is
    removed on the way out, and neither the JSON nor any picture appears."""
    pred = copy_images(root / "pred", tmp_path / "pred")
    spectrum = M.log_spectrum

    def terminated_half_way(image):
        picture = spectrum(image)
        os.kill(os.getpid(), signal.SIGTERM)
        return picture

    monkeypatch.setattr(M, "log_spectrum", terminated_half_way)
    argv = ["--pred", pred, "--metrics", "glcm", "--out", tmp_path / "m.json", "--save-spectra", tmp_path / "spectra"]
    code = run_cli(M.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err and shown_lines(err) == ["terminated"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no spectra, no staging folder, no JSON
