"""metrics.py's periodicity metric is OP4KSR's L_AP statistic: its absolute form is
M.periodicity_score and its relative form (with a reference) is op4ksr.periodicity_loss per
image (tests/test_copies.py checks that metrics.py's copy of the kit is op4ksr.py's text)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
import op4ksr
from common.io import run_cli


def smooth_texture(seed, size=256, channels=3, std=0.25):
    """A natural-looking random field in [-1, 1]: white noise shaped to a 1/f amplitude spectrum."""
    noise = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
    frequency = torch.fft.fftfreq(size)
    radius = torch.hypot(frequency[:, None], frequency[None, :]).clamp_min(1 / size)
    field = torch.fft.ifft2(torch.fft.fft2(noise) / radius).real
    return ((field - field.mean()) / field.std() * std).clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> HWC uint8."""
    return ((x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def planted_grid(rgb: np.ndarray, period=32, amplitude=16) -> np.ndarray:
    """A token-grid artifact: every `period`-th row and column brightened by `amplitude` levels."""
    y, x = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    lines = amplitude * ((y % period == 0) | (x % period == 0))
    return np.clip(rgb.astype(np.int32) + lines[..., None], 0, 255).astype(np.uint8)


SIZE = 1024  # four 512-px quadrants, 256 tiles of 32 px each (a 4K quadrant holds 4096)


@pytest.fixture(scope="module")
def images():
    clean = to_uint8(smooth_texture(0, size=SIZE))  # 512-px quadrants: a noise floor of ~0.003
    return {
        "clean": clean,
        "grid32": planted_grid(clean, 32),
        "grid16": planted_grid(clean, 16),
        "random": np.random.default_rng(1).integers(0, 256, (200, 264, 3), dtype=np.uint8),  # non-square, odd quadrant split
    }


def test_autocovariance_matches_direct_sums():
    x = torch.randn(2, 40, 48, dtype=torch.float64)
    covariance = M.autocovariance(x, max_lag=9)
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    for dy, dx in [(0, 0), (3, 0), (0, -5), (9, 9), (-4, 7)]:
        a = centred[:, max(0, -dy) : 40 - max(0, dy), max(0, -dx) : 48 - max(0, dx)]
        b = centred[:, max(0, dy) : 40 + min(0, dy), max(0, dx) : 48 + min(0, dx)]
        direct = (a * b).mean(dim=(-2, -1))
        torch.testing.assert_close(covariance[:, 9 + dy, 9 + dx].double(), direct, rtol=1e-5, atol=1e-6)


def test_score_is_op4ksr_absolute_loss_per_image(images):
    """Without a reference the metric is L_AP's absolute form (op4ksr.periodicity_loss without a target),
    image by image."""
    batch = torch.cat([M.periodicity_input(images[k]) for k in ("clean", "grid32", "grid16")])
    assert batch.min() >= -1 and batch.max() <= 1
    ours = M.periodicity(batch)
    assert ours.shape == (3,)
    assert torch.equal(ours, M.periodicity_score(batch))
    for i in range(3):
        torch.testing.assert_close(ours[i], op4ksr.periodicity_loss(batch[i:i + 1]), rtol=1e-6, atol=0)
    random = M.periodicity_input(images["random"])
    gaussian = torch.randn(2, 3, 190, 230, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    torch.testing.assert_close(M.periodicity(gaussian)[1], op4ksr.periodicity_loss(gaussian[1:]), rtol=1e-6, atol=0)
    for options in ({"periods": (16,)}, {"quadrants": 1}, {"periods": (8, 24), "quadrants": 9}):
        expected = op4ksr.periodicity_loss(random, **options)
        torch.testing.assert_close(M.periodicity(random, **options)[0], expected, rtol=1e-6, atol=0, msg=str(options))


def test_relative_form_is_op4ksr_loss_per_image(images):
    clean = torch.cat([M.periodicity_input(images["clean"])] * 2)
    pred = torch.cat([M.periodicity_input(images["grid32"]), M.periodicity_input(images["grid16"])])
    for p, t in ((pred, clean), (clean, pred), (pred, pred.flip(0))):
        ours = M.periodicity(p, t)
        assert ours.shape == (2,)
        for i in range(2):
            assert ours[i].item() == op4ksr.periodicity_loss(p[i : i + 1], t[i : i + 1]).item()
    assert torch.equal(M.periodicity(pred, pred), torch.zeros(2))  # relative to itself: no excess
    assert M.periodicity(clean, pred).max().item() < 0.1 * M.periodicity(pred).min().item()  # cleaner than the ref: ~no penalty
    assert (M.periodicity(pred, clean) > 0.5 * M.periodicity(pred)).all()
    with pytest.raises(ValueError, match="differ in shape"):
        M.periodicity(pred, clean[:1])


def test_planted_grid_scores_far_higher(images):
    scores = {k: M.periodicity(M.periodicity_input(v)).item() for k, v in images.items()}
    print("[periodicity] " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    assert scores["grid32"] > 10 * scores["clean"]  # a 16-level line every 32 px on a texture of std ~32 levels (~15x)
    assert scores["grid16"] > 10 * scores["clean"]
    # White noise: only the noise floor, 1 / (tiles per quadrant) of its variance per period; its
    # 100x132-px quadrants hold 3x4 tiles of 32 px and 6x8 of 16 px (a 4K quadrant 4096 and 16384).
    assert abs(scores["random"] - (1 / 12 + 1 / 48) / 2) < 0.01
    flat = M.periodicity(M.periodicity_input(np.full((256, 256, 3), 77, np.uint8)))
    assert flat.item() == 0  # the variance floor: a flat image scores 0, not nan


def test_too_small_images_are_named():
    with pytest.raises(ValueError, match=r"image 160x128 too small for periods \(16, 32\)"):
        M.periodicity(torch.zeros(1, 3, 128, 160))
    assert M.periodicity(torch.zeros(1, 3, 164, 164)).item() == 0  # 82-px quadrants: the smallest that fits


def test_spectrum_and_autocorrelation_images_show_the_grid(images):
    centre, step = SIZE // 2, SIZE // 32  # dots at multiples of 1/32 cycles/px on both axes

    def contrast(rgb):  # the dots above the median of the spectrum around them, in grey levels
        spectrum = np.asarray(M.log_spectrum(rgb)).astype(int)
        assert spectrum.shape == (SIZE, SIZE)
        dots = [spectrum[centre, centre + k * step] for k in range(1, 5)] + [spectrum[centre + k * step, centre] for k in range(1, 5)]
        return np.mean(dots) - np.median(spectrum[centre - 80 : centre + 80, centre - 80 : centre + 80])

    assert M.log_spectrum(images["grid32"]).mode == "L"
    assert contrast(images["grid32"]) > 25 > 5 > abs(contrast(images["clean"]))
    correlation = np.asarray(M.autocorrelation_image(images["grid32"])).astype(int)
    assert correlation.shape == (161, 161)  # lags -80..80
    mid = 80
    lags = [(k * 32, l * 32) for k in range(3) for l in range(-2, 3) if k > 0 or l > 0]  # one of each +-pair
    on_lattice = [correlation[mid + dy, mid + dx] for dy, dx in lags]
    off_lattice = [correlation[mid + dy + 16, mid + dx + 16] for dy, dx in lags]  # half a period off
    assert min(on_lattice) > max(off_lattice) + 60  # bright on the 32-px lattice (lines of a grid: ridges through it)
    quiet = np.asarray(M.autocorrelation_image(images["clean"])).astype(int)
    assert abs(quiet[mid, mid + 32] - 128) < abs(correlation[mid, mid + 32] - 128)


def run(argv, capsys):
    code = run_cli(M.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_metric_and_writes_spectra(images, tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    Image.fromarray(images["grid32"]).save(pred / "a.png")
    Image.fromarray(images["clean"]).save(pred / "b.png")
    Image.fromarray(images["clean"]).save(ref / "a.png")
    Image.fromarray(images["grid32"]).save(ref / "b.png")

    code, out, err = run(["--pred", pred, "--metrics", "periodicity", "--save-spectra", tmp_path / "spectra"], capsys)
    assert code == 0, err
    result = json.loads((pred / "metrics.json").read_text())
    value = result["metrics"]["periodicity"]
    assert "periodicity" in out and f"{value:.4f}" in out
    absolute = {k: M.periodicity_score(M.periodicity_input(images[v])).item() for k, v in (("a", "grid32"), ("b", "clean"))}
    assert result["per_image"]["periodicity"] == absolute
    assert value == pytest.approx(np.mean(list(absolute.values())))
    for name in ("a", "b"):
        assert Image.open(tmp_path / "spectra" / f"{name}_spectrum.png").size == (SIZE, SIZE)
        assert Image.open(tmp_path / "spectra" / f"{name}_autocorrelation.png").size == (161, 161)

    code, out, err = run(["--pred", pred, "--ref", ref, "--metrics", "periodicity", "--overwrite"], capsys)
    assert code == 0, err
    result = json.loads((pred / "metrics.json").read_text())
    relative = result["per_image"]["periodicity"]
    a_pred, a_ref = M.periodicity_input(images["grid32"]), M.periodicity_input(images["clean"])
    assert relative["a"] == op4ksr.periodicity_loss(a_pred, a_ref).item() > 0.5 * absolute["a"]
    assert relative["b"] == op4ksr.periodicity_loss(a_ref, a_pred).item() < 0.1 * absolute["a"]
    assert f"{result['metrics']['periodicity']:.4f}" in out

    code, _, err = run(["--pred", pred, "--metrics", "periodicity", "--quadrants", "3"], capsys)
    assert code == 2 and "--quadrants: must be a square number" in err
    code, _, err = run(["--pred", pred, "--metrics", "periodicity", "--periods", "16,x"], capsys)
    assert code == 2 and "--periods" in err
