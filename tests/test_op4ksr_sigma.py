"""OP4KSR's noise level: OMGSR-F's mid-timestep on its shifted Flux schedule, and the SNR calibration."""

import math

import pytest
import torch

import op4ksr


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
    t, found = op4ksr.matched_sigma([hr], [lr])
    grid = op4ksr.omgsr_sigmas()
    nearest = int((grid - sigma).abs().argmin())
    assert t in (nearest - 1, nearest, nearest + 1) and abs(found - sigma) < 2e-3, (t, found, sigma)
    if sigma == op4ksr.OMGSR_SIGMA:
        assert t == op4ksr.OMGSR_MID_TIMESTEP


def test_calibration_averages_batches_as_omgsr_does():
    """Two batches at different distortion: the answer minimises the summed |SNR gap| over the grid."""
    pairs = [scaled_pair(0.2, 1), scaled_pair(0.6, 2)]
    t, found = op4ksr.matched_sigma([p[0] for p in pairs], [p[1] for p in pairs])
    sigmas = op4ksr.omgsr_sigmas()[1:].double()

    def gap(s):
        return sum(abs((1 - s) ** 2 / s**2 - 1 / (lr - hr).pow(2).mean().double()) * hr.pow(2).mean() for hr, lr in pairs)

    gaps = torch.stack([gap(s) for s in sigmas])
    assert t == int(gaps.argmin()) + 1 and 0.2 < found < 0.6
