"""OP4KSR's noise level: OMGSR-F's mid-timestep on its shifted Flux schedule, and the SNR calibration
(`matched_sigma` and the `calibrate-sigma` command)."""

import math
import re

import pytest
import torch

import op4ksr
from common.io import run_cli
from test_op4ksr import write_hr
from tiny_pipelines import make_flux_pipeline


def test_default_sigma_is_omgsr_f_mid_timestep_244():
    # OMGSR-F: get_schedule(999, 4096 tokens, shift=True)[-(244 + 1)]; linspace(1, 0, 1000)[755] = 244/999
    t = 244 / 999
    assert op4ksr.OMGSR_SIGMA == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1 / t - 1), abs=1e-12)
    assert op4ksr.OMGSR_SIGMA == pytest.approx(0.505, abs=0.001)
    assert op4ksr.omgsr_sigmas(999, 0.0)[244] == pytest.approx(244 / 999)  # unshifted: the 0.24 reading
    sigmas = op4ksr.omgsr_sigmas()
    assert sigmas[0] == 0 and float(sigmas[-1]) == pytest.approx(1) and (sigmas.diff() > 0).all()


def scaled_pair(sigma: float, seed: int):
    """An HR latent and an LR latent whose distortion D = mean((lr - hr)^2) makes `sigma` the
    continuous SNR match: sqrt(D) / (1 + sqrt(D)) = sigma."""
    g = torch.Generator().manual_seed(seed)
    hr = torch.randn(2, 16, 12, 10, generator=g) * 1.7
    noise = torch.randn(hr.shape, generator=g)
    noise *= (sigma / (1 - sigma)) / noise.pow(2).mean().sqrt()
    return hr, hr + noise


@pytest.mark.parametrize("sigma", [0.1, 0.3, op4ksr.OMGSR_SIGMA, 0.8])
def test_calibration_finds_the_closed_form_sigma(sigma):
    hr, lr = scaled_pair(sigma, seed=int(sigma * 1000))
    t, found = op4ksr.matched_sigma([(hr, lr)])
    grid = op4ksr.omgsr_sigmas()
    nearest = int((grid - sigma).abs().argmin())
    assert t in (nearest - 1, nearest, nearest + 1) and abs(found - sigma) < 2e-3, (t, found, sigma)
    if sigma == op4ksr.OMGSR_SIGMA:
        assert t == op4ksr.OMGSR_MID_TIMESTEP


def test_calibration_averages_batches_as_omgsr_does():
    """Two batches at different distortion: the answer minimises the summed |SNR gap| over the grid."""
    pairs = [scaled_pair(0.2, 1), scaled_pair(0.6, 2)]
    t, found = op4ksr.matched_sigma(pairs)
    sigmas = op4ksr.omgsr_sigmas()[1:].double()

    def gap(s):
        return sum(abs((1 - s) ** 2 / s**2 - 1 / (lr - hr).pow(2).mean().double()) * hr.pow(2).mean() for hr, lr in pairs)

    gaps = torch.stack([gap(s) for s in sigmas])
    assert t == int(gaps.argmin()) + 1 and 0.2 < found < 0.6


def test_train_defaults_to_omgsr_sigma():
    assert op4ksr.sr_train_parser().parse_args(["--data", "d", "--output", "o"]).sigma == op4ksr.OMGSR_SIGMA


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", guidance=True, seed=0)


def calibrate(capsys, *argv) -> tuple[int, float, float, str]:
    assert run_cli(op4ksr.main, ["calibrate-sigma", *map(str, argv)]) == 0
    out = capsys.readouterr().out
    found = re.search(r"t = (\d+) of 999: sigma = ([\d.]+) .*\n.*this is ([-+][\d.]+) from it", out)
    assert found, out
    return int(found[1]), float(found[2]), float(found[3]), out


def test_calibrate_sigma_prints_matched_sigma_of_its_latents(flux_folder, tmp_path, capsys):
    """3 synthetic HR images, batches of 2 + 1, on the tiny F16 VAE: the printed t and sigma are
    `matched_sigma` of the latents `calibration_latents` makes (train's pairs, posterior samples)."""
    data = write_hr(tmp_path / "hr", count=3)
    argv = ["--data", data, "--vae", flux_folder, "--crop", 64, "--batch-size", 2, "--seed", 5]
    t, sigma, difference, out = calibrate(capsys, *argv)
    files, vae = op4ksr.vae_image_files(data), op4ksr.load_vae(flux_folder, torch.float32, stride=2)
    latents = list(op4ksr.calibration_latents(files, vae, 64, 4, 2, 3, 5))
    assert [tuple(hr.shape) for hr, _ in latents] == [(2, 4, 16, 16), (1, 4, 16, 16)]
    expected_t, expected_sigma = op4ksr.matched_sigma(latents)
    assert t == expected_t and sigma == pytest.approx(expected_sigma, abs=1e-6)
    assert difference == pytest.approx(sigma - op4ksr.OMGSR_SIGMA, abs=2e-6)
    assert calibrate(capsys, *argv)[3] == out  # the same bytes again
    print(out)

    # the HR side is a posterior sample of train's first HR crops, normalised: (sample - mean) / std ~ N(0, 1)
    hr, _, _ = op4ksr.training_pairs(files, op4ksr.Batches(3, 5), 64, 4, 2, set(), op4ksr.Distributed())
    c = vae.config
    with torch.no_grad():
        mean, logvar = vae.encoder(hr).chunk(2, dim=1)
    z = (latents[0][0] / c.scale_factor + c.shift_factor - mean) / torch.exp(0.5 * logvar)
    print(f"HR latent minus the posterior mean, in posterior stds: mean {z.mean():+.3f}, std {z.std():.3f}")
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


def test_calibrate_sigma_max_images(flux_folder, tmp_path, capsys):
    data = write_hr(tmp_path / "hr", count=3)
    out = calibrate(capsys, "--data", data, "--vae", flux_folder, "--crop", 64, "--max-images", 1)[3]
    assert "(1 images, crop 64, scale 4, batch 1)" in out


def test_calibration_without_batches_says_so():
    with pytest.raises(ValueError, match="at least one"):
        op4ksr.matched_sigma([])
