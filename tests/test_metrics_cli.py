"""metrics.py as a command: folders in, one table out and the same numbers in JSON; bad input
(unmatched names, mixed sizes, too few images for FID, corrupt files, missing weights)
answered with one clear line."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
from common.io import run_cli


def image(seed, h=128, w=160):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 120 + 50 * np.sin((x + seed * 7) / 9.0)[..., None] + rng.normal(0, 10, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    for i in range(3):
        Image.fromarray(image(i)).save(pred / f"{i:04d}.png")
        noisy = np.clip(image(i).astype(int) + np.random.default_rng(10 + i).integers(-8, 9, (128, 160, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(ref / f"{i:04d}.bmp")  # matched by stem, not extension
    (pred / "notes.txt").write_text("not an image, ignored")
    return pred, ref


def run(argv, capsys):
    code = run_cli(M.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def shown_lines(err):
    """The lines a terminal shows: a progress bar erases itself with a carriage return."""
    return [shown for line in err.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]


def test_glcm_cr_psnr_ssim_table_and_json(folders, capsys, tmp_path):
    pred, ref = folders
    code, out, err = run(["--pred", pred, "--ref", ref, "--metrics", "glcm,cr,psnr,ssim", "--out", tmp_path / "m.json"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert list(result["metrics"]) == ["glcm", "cr", "psnr", "ssim"] and result["count"] == 3
    for name, value in result["metrics"].items():  # the table prints the same numbers
        assert f"{name}" in out and f"{value:.4f}" in out
    assert "metrics:" in err and "/3 " in err  # a progress bar over the 3 images
    # the numbers are the library's, on the protocol's inputs
    pixels = [image(i) for i in range(3)]
    jpegs = [M.jpeg95(Image.fromarray(p)) for p in pixels]
    decoded = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    assert result["metrics"]["glcm"] == pytest.approx(np.mean([M.glcm_score(d) for d in decoded]), abs=1e-12)
    assert result["metrics"]["cr"] == pytest.approx(M.compression_ratio([len(j) for j in jpegs], [(128, 160)] * 3))
    refs = [np.asarray(Image.open(ref / f"{i:04d}.bmp")) for i in range(3)]
    assert result["metrics"]["psnr"] == pytest.approx(np.mean([M.psnr(p, r) for p, r in zip(pixels, refs)]))
    assert result["per_image"]["ssim"]["0001"] == pytest.approx(M.ssim(pixels[1], refs[1]))


def test_default_metrics_and_json_beside_pred(folders, capsys):
    pred, ref = folders
    code, out, _ = run(["--pred", pred, "--ref", ref, "--y-channel", "--crop-border", "4"], capsys)
    assert code == 0
    result = json.loads((pred / "metrics.json").read_text())
    assert list(result["metrics"]) == ["glcm", "cr", "psnr", "ssim"]
    assert result["settings"]["y_channel"] is True and result["settings"]["crop_border"] == 4


def test_unmatched_names_are_listed(folders, capsys, tmp_path):
    pred, ref = folders
    Image.fromarray(image(9)).save(pred / "extra.png")
    (ref / "0000.bmp").unlink()
    code, _, err = run(["--pred", pred, "--ref", ref, "--metrics", "psnr", "--out", tmp_path / "m.json"], capsys)
    assert code == 2 and "only in pred: 0000, extra" in err and len(shown_lines(err)) == 1
    assert not (tmp_path / "m.json").exists()  # nothing written on failure


def test_mixed_sizes_are_refused_for_pairs(folders, capsys):
    pred, ref = folders
    Image.fromarray(image(1, 96, 160)).save(ref / "0001.bmp")
    code, _, err = run(["--pred", pred, "--ref", ref, "--metrics", "ssim"], capsys)
    assert code == 2 and "0001: pred is 160x128 but ref is 160x96" in err
    # unpaired metrics take any mixture of sizes
    Image.fromarray(image(5, 200, 136)).save(pred / "0001.png")
    assert run(["--pred", pred, "--metrics", "glcm,cr"], capsys)[0] == 0


def test_corrupt_images_fail_or_skip(folders, capsys):
    pred, ref = folders
    (pred / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, err = run(["--pred", pred, "--metrics", "glcm"], capsys)
    assert code == 2 and "0002.png" in err and "--on-error skip" in err
    code, out, err = run(["--pred", pred, "--metrics", "glcm", "--on-error", "skip"], capsys)
    assert code == 0 and "skipping" in err and "0002.png" in err and "1 skipped" in out
    result = json.loads((pred / "metrics.json").read_text())
    assert result["count"] == 2 and result["skipped"][0].endswith("0002.png") and "0002" not in result["per_image"]["glcm"]


class PooledColours(torch.nn.Module):
    """A 12-d stand-in for the Inception network: the CLI's plumbing is under test here (the
    network's parity is in test_metrics_networks.py), and a 2048-d Frechet distance costs
    seconds of eigendecomposition on a small CPU."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) * self.scale


@pytest.mark.filterwarnings("ignore:FID. ref has")
def test_fid_with_few_images_warns_with_the_count(folders, capsys, monkeypatch):
    pred, ref = folders
    seen = []
    monkeypatch.setattr(M.InceptionV3, "from_pretrained", classmethod(lambda cls, source: seen.append(source) or PooledColours()))
    code, out, err = run(["--pred", pred, "--ref", ref, "--metrics", "fid", "--inception", "my/inception.pth"], capsys)
    assert code == 0, err
    # the CLI shows a library warning as one line of its own
    assert "pred has 3 samples; a full-rank 12-d covariance needs at least 13" in err
    assert all(line.startswith("warning: ") for line in err.splitlines() if "covariance" in line), err
    assert seen == ["my/inception.pth"]
    assert np.isfinite(json.loads((pred / "metrics.json").read_text())["metrics"]["fid"])
    # patch FID: a 128x160 image holds a 2x2 grid of 64-px crops and 1x2 more in the half-shifted grid
    argv = ["--pred", pred, "--ref", ref, "--metrics", "fid", "--fid-patch", 64, "--fid-half-shift"]
    assert run(argv, capsys)[0] == 2  # metrics.json exists
    argv.append("--overwrite")
    assert run(argv, capsys)[0] == 0
    assert json.loads((pred / "metrics.json").read_text())["settings"]["fid_samples"] == {"pred": 18, "ref": 18}


def test_requests_that_cannot_run(folders, capsys, tmp_path, monkeypatch):
    pred, ref = folders
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["--pred", pred, "--metrics", "psnr"], "psnr needs --ref"),
        (["--pred", pred, "--metrics", "clip"], "clip needs --prompts"),
        (["--pred", pred, "--metrics", "niqe", "--niqe-params", "nobody/nothing/niqe.mat"], "NIQE parameters"),
        (["--pred", tmp_path / "nowhere"], "no such folder"),
        (["--pred", ref.parent, "--metrics", "glcm"], "no images"),
        (["--pred", pred, "--ref", ref, "--metrics", "fid", "--inception", "nobody/nothing/x.pth"], "FID Inception weights"),
        (["--pred", pred, "--ref", ref, "--metrics", "lpips"], "alexnet-owt-7be5be79.pth"),
        (["--pred", pred, "--metrics", "periodicity", "--periods", "16,x"], "--periods"),
        (["--pred", pred, "--metrics", "periodicity"], "0000: image 160x128 too small for periods (16, 32)"),
    ]
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and len(shown_lines(err)) == 1, (argv, err)


def test_prompts_must_cover_every_image(folders, capsys, tmp_path):
    pred, _ = folders
    prompts = tmp_path / "metadata.jsonl"
    prompts.write_text('{"file_name": "0000.jpg", "text": "a wave"}\n\n{"file_name": "0001.png", "text": "a tree"}\n')
    code, _, err = run(["--pred", pred, "--prompts", prompts, "--metrics", "clip"], capsys)
    assert code == 2 and "no caption for 0002" in err
    prompts.write_text("not json\n")
    code, _, err = run(["--pred", pred, "--prompts", prompts, "--metrics", "clip"], capsys)
    assert code == 2 and "metadata.jsonl:1" in err


def test_network_precision_is_chosen_per_device_and_recorded(folders, capsys, monkeypatch):
    assert M.set_network_precision("cpu") == "fp32"
    assert not torch.backends.cuda.matmul.allow_tf32  # float32 matrix products, as the references
    pred, ref = folders
    monkeypatch.setattr(M.InceptionV3, "from_pretrained", classmethod(lambda cls, source: PooledColours()))
    code, _, err = run(["--pred", pred, "--ref", ref, "--metrics", "fid,glcm", "--fid-patch", 64], capsys)
    assert code == 0, err
    assert json.loads((pred / "metrics.json").read_text())["settings"]["precision"] == "fp32"


def test_progress_names_the_metric_and_the_network_precision(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "progress_bar", lambda label, total: lambda done, postfix=None: calls.append((done, postfix)))
    for name, show in M.progress(["a", "b"], "metrics", "tf32"):
        show("glcm")
        show("lpips")
    assert calls == [(0, {"metric": "glcm"}), (0, {"metric": "lpips (tf32)"}), (1, None),
                     (1, {"metric": "glcm"}), (1, {"metric": "lpips (tf32)"}), (2, None)]


def test_folder_run_memory_does_not_grow_with_the_number_of_images(tmp_path, capsys):
    """Peak memory of a folder run (numpy's buffers and Python objects, as tracemalloc sees them) is the
    same for 2 and for 8 images: nothing an image needs is kept once it is scored."""
    import tracemalloc

    peaks = {}
    for count in (2, 8):
        pred, ref = tmp_path / f"pred{count}", tmp_path / f"ref{count}"
        pred.mkdir(), ref.mkdir()
        for i in range(count):
            Image.fromarray(image(i, 192, 192)).save(pred / f"{i:04d}.png")
            Image.fromarray(image(i + 1, 192, 192)).save(ref / f"{i:04d}.png")
        tracemalloc.start()
        code, _, err = run(["--pred", pred, "--ref", ref, "--metrics", "glcm,cr,psnr,ssim"], capsys)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert code == 0, err
    assert peaks[8] < 1.3 * peaks[2], peaks
