"""The model-free parts of op4ksr.py: L_AP, the Real-ESRGAN degradation, the colour fixes, the loss."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import metrics
import op4ksr
from op4ksr import DegradationConfig, DegradationStage, LossWeights

SIZE = 256  # four 128-px quadrants: room for the largest lag read (2 x 32 + 16 px)


def smooth_texture(seed, channels=1, size=SIZE, std=0.25):
    """A natural-looking random field: white noise shaped to a 1/f amplitude spectrum."""
    noise = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
    frequency = torch.fft.fftfreq(size)
    radius = torch.hypot(frequency[:, None], frequency[None, :]).clamp_min(1 / size)
    field = torch.fft.ifft2(torch.fft.fft2(noise) / radius).real
    return (field - field.mean()) / field.std() * std


def periodic_pattern(seed, std, period=32, channels=1, size=SIZE):
    """One random period x period tile repeated over the image (what a token-grid artifact is)."""
    tile = torch.randn(1, channels, period, period, generator=torch.Generator().manual_seed(seed))
    tile = (tile - tile.mean()) / tile.std() * std
    return tile.repeat(1, 1, size // period, size // period)


def descend(start, target, steps=40, lr=2e-3):
    """Adam on the pixels of `start`, minimising L_AP alone."""
    image = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([image], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        op4ksr.periodicity_loss(image, target).backward()
        optimizer.step()
    return image.detach()


# ----------------------------------------------------------------------------- L_AP

LAP_SIZE = 1024  # four 512-px quadrants: 256 tiles of 32 px each (a 4K quadrant holds 4096)


def pattern_coefficient(change, pattern):
    """Least-squares coefficient of `pattern` in `change`: how much of the planted pattern is in the pixels."""
    return (change.flatten() @ pattern.flatten() / pattern.square().sum()).item()


def fold_error(x, period=32, quadrants=4):
    """Largest deviation of `x` from its own `period`-periodic part, quadrant by quadrant."""
    tiles = op4ksr.split_into_quadrants(x, quadrants)
    h, w = tiles.shape[-2:]
    folded = tiles.reshape(*tiles.shape[:-2], h // period, period, w // period, period).mean(dim=(-4, -2), keepdim=True)
    return (tiles.reshape(folded.shape[:-4] + (h // period, period, w // period, period)) - folded).abs().max().item()


def test_lattice_power_is_the_quadrant_spectrum_at_k_over_p():
    image = torch.randn(2, 3, 200, 264, generator=torch.Generator().manual_seed(0))
    power, variance = op4ksr.lattice_power(image, periods=(16, 32))
    assert power.shape == (2, 4, 3, 16 * 16 + 32 * 32) and variance.shape == (2, 4, 3, 1)
    quadrant = op4ksr.split_into_quadrants(image)[..., :96, :128]  # 100 x 132 cropped to whole 32-px periods
    spectrum = torch.fft.fft2(quadrant.double(), norm="forward")[..., ::3, ::4]  # frequencies k / 32: every 3rd / 4th bin
    frequency = torch.fft.fftfreq(32, dtype=torch.float64)
    circular_differences = 2 * (torch.sin(torch.pi * frequency)[:, None] ** 2 + torch.sin(torch.pi * frequency)[None, :] ** 2)
    expected = (spectrum.abs().square() * circular_differences).flatten(-2)
    torch.testing.assert_close(power[..., 256:].double(), expected, rtol=1e-4, atol=1e-9)
    # Wiener-Khinchin: unweighted, the bins of one period sum to the mean of the quadrant's
    # circular autocovariance over all its lattice lags (k 32, l 32), (0, 0) included.
    centred = quadrant.double() - quadrant.double().mean(dim=(-2, -1), keepdim=True)
    circular = torch.fft.ifft2(torch.fft.fft2(centred).abs().square()).real / (96 * 128)
    torch.testing.assert_close(spectrum.abs().square().sum(dim=(-2, -1)) - spectrum[..., 0, 0].abs().square(),
                               circular[..., ::32, ::32].mean(dim=(-2, -1)))


def test_planted_period_scores_far_higher():
    clean = smooth_texture(0, channels=3, size=LAP_SIZE)
    planted = clean + periodic_pattern(1, std=0.03, channels=3, size=LAP_SIZE)  # 12% of the texture's std
    clean_score, planted_score = metrics.periodicity_score(clean).item(), metrics.periodicity_score(planted).item()
    print(f"[L_AP] score with a faint 32-px period {planted_score:.4f} / without {clean_score:.4f}: {planted_score / clean_score:.1f}x")
    assert planted_score > 10 * clean_score
    assert clean_score < 0.005  # the noise floor of 512-px quadrants: ~1 / 256 of white noise's


def test_descent_on_l_ap_removes_the_planted_period_from_the_pixels():
    clean = smooth_texture(0, size=LAP_SIZE)
    pattern = periodic_pattern(1, std=0.03, size=LAP_SIZE)
    planted = (clean + pattern).requires_grad_()
    op4ksr.periodicity_loss(planted, clean).backward()
    alignment = F.cosine_similarity(planted.grad.flatten(), pattern.flatten(), dim=0).item()
    assert alignment > 0.5  # the first step already points at the planted pattern
    assert fold_error(planted.grad) < 1e-3 * planted.grad.abs().max().item()  # and moves only what repeats

    steps = 40
    result = descend(clean + pattern, clean, steps=steps)
    left = pattern_coefficient(result - clean, pattern)  # 1 before the descent
    before, after, reference = (metrics.periodicity_score(x).item() for x in (clean + pattern, result, clean))
    print(f"[L_AP] gradient/pattern cosine {alignment:.2f}; planted pattern in the pixels 1 -> {left:.3f} "
          f"({1 / left:.0f}x) after {steps} Adam steps; score {before:.4f} -> {after:.4f} (clean {reference:.4f})")
    assert 0 < left < 0.2  # at least 5x less of the planted pattern in the pixels
    assert after < reference
    # Whatever else changed is periodic too (the gradient is, quadrant by quadrant): the repeats
    # were not decorrelated by moving the content between them.
    assert fold_error(result - clean - pattern) < 1e-4


def test_relative_form_leaves_real_periodic_texture_alone():
    clean = smooth_texture(0, size=LAP_SIZE)
    texture = periodic_pattern(2, std=0.05, size=LAP_SIZE)
    fabric = clean + texture  # a ground truth that is periodic itself
    image = fabric.clone().requires_grad_()
    loss = op4ksr.periodicity_loss(image, fabric)
    loss.backward()
    assert loss.item() == 0 and image.grad.abs().max().item() == 0  # pred == target is the optimum

    absolute = fabric.clone().requires_grad_()
    op4ksr.periodicity_loss(absolute).backward()
    assert absolute.grad.abs().max().item() > 0  # the absolute form would punish the fabric

    # From a prediction with the fabric's pattern twice too strong, the relative form stops near
    # the ground truth's strength (Adam's momentum carries it a little past the relu's edge);
    # the absolute form goes on towards erasing the real texture.
    overdone = clean + 2 * texture
    relative = pattern_coefficient(descend(overdone, fabric, steps=100) - clean, texture)
    absolute = pattern_coefficient(descend(overdone, None, steps=100) - clean, texture)
    print(f"[L_AP] fabric pattern in the pixels, 2 -> relative form {relative:.2f} (ground truth 1), absolute form {absolute:.2f}")
    assert 0.75 < relative < 1.25
    assert absolute < 0.5


def test_quadrants_and_small_images():
    with pytest.raises(ValueError, match="square"):
        metrics.periodicity_score(torch.zeros(1, 3, 256, 256), quadrants=3)
    with pytest.raises(ValueError, match="larger than 81"):
        metrics.periodicity_score(torch.zeros(1, 3, 128, 128))
    flat = metrics.periodicity_score(torch.zeros(2, 3, 256, 256))
    assert flat.shape == (2,) and flat.abs().max() == 0


# ----------------------------------------------------------------------------- degradation


def hr_batch(batch=2, height=64, width=96, seed=0):
    return smooth_texture(seed, channels=3, size=max(height, width))[..., :height, :width].repeat(batch, 1, 1, 1).add(0.5).clamp(0, 1)


def everything_off() -> DegradationConfig:
    off = dict(blur_prob=0.0, resize_probs=(0.0, 0.0, 1.0), resize_modes=("area",), noise_prob=0.0, jpeg_prob=0.0)
    return DegradationConfig(
        first=DegradationStage(**off), second=DegradationStage(**off), final_sinc_prob=0.0, final_resize_modes=("area",)
    )


def test_degrade_shapes_range_and_determinism():
    hr = hr_batch()
    lr = op4ksr.degrade(hr, DegradationConfig(), torch.Generator().manual_seed(1))
    assert lr.shape == (2, 3, 16, 24)
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, (lr * 255).round() / 255)  # 8-bit levels
    again = op4ksr.degrade(hr, DegradationConfig(), torch.Generator().manual_seed(1))
    other = op4ksr.degrade(hr, DegradationConfig(), torch.Generator().manual_seed(2))
    assert torch.equal(lr, again) and not torch.equal(lr, other)
    assert not torch.equal(lr[0], lr[1])  # each image of a batch gets its own degradation
    assert op4ksr.degrade(hr, DegradationConfig(), torch.Generator().manual_seed(1), scale=2).shape == (2, 3, 32, 48)
    with pytest.raises(ValueError, match="divisible"):
        op4ksr.degrade(hr[..., :63, :], DegradationConfig(), torch.Generator())


def test_degrade_with_every_stage_off_is_a_plain_resize():
    hr = hr_batch()
    expected = (F.interpolate(hr, size=(16, 24), mode="area") * 255).round() / 255
    for seed in (0, 1):
        torch.testing.assert_close(op4ksr.degrade(hr, everything_off(), torch.Generator().manual_seed(seed)), expected)
    # A stage with probability 0 is off whatever its other settings say.
    config = everything_off()
    config.first.noise_range = (200.0, 255.0)
    config.second.jpeg_range = (1.0, 2.0)
    torch.testing.assert_close(op4ksr.degrade(hr, config, torch.Generator()), expected)


SWITCHES = {
    "first blur": lambda c: setattr(c.first, "blur_prob", 1.0),
    "first resize": lambda c: setattr(c.first, "resize_probs", (0.0, 1.0, 0.0)),
    "first noise": lambda c: setattr(c.first, "noise_prob", 1.0),
    "first jpeg": lambda c: setattr(c.first, "jpeg_prob", 1.0),
    "second blur": lambda c: setattr(c.second, "blur_prob", 1.0),
    "second resize": lambda c: setattr(c.second, "resize_probs", (1.0, 0.0, 0.0)),
    "second noise": lambda c: setattr(c.second, "noise_prob", 1.0),
    "final jpeg": lambda c: setattr(c.second, "jpeg_prob", 1.0),
    "final sinc": lambda c: setattr(c, "final_sinc_prob", 1.0),
}


@pytest.mark.parametrize("stage", SWITCHES)
def test_each_stage_switches_on(stage):
    hr = hr_batch(batch=1)
    config = everything_off()
    SWITCHES[stage](config)
    baseline = op4ksr.degrade(hr, everything_off(), torch.Generator().manual_seed(0))
    assert not torch.equal(op4ksr.degrade(hr, config, torch.Generator().manual_seed(0)), baseline)


def test_gray_noise_is_the_same_in_every_channel():
    stage = DegradationStage(gray_noise_prob=1.0, noise_range=(20.0, 20.0))
    for gaussian in (1.0, 0.0):
        stage.gaussian_noise_prob = gaussian
        image = torch.full((1, 3, 32, 32), 0.5)
        noisy = op4ksr._random_noise(image, stage, torch.Generator().manual_seed(0))
        difference = noisy - image
        assert difference.abs().max() > 0
        torch.testing.assert_close(difference[:, 0], difference[:, 1])


def test_kernels_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    for kernel_type in range(len(op4ksr.KERNEL_TYPES)):
        probs = [0.0] * len(op4ksr.KERNEL_TYPES)
        probs[kernel_type] = 1.0
        for sinc in (0.0, 1.0):
            stage = DegradationStage(kernel_probs=tuple(probs), sinc_prob=sinc)
            for _ in range(5):
                kernel = op4ksr.random_blur_kernel(stage, generator)
                size = kernel.shape[-1]
                assert kernel.shape == (size, size) and size % 2 == 1 and 7 <= size <= 21
                assert abs(kernel.sum().item() - 1) < 1e-5
    # Isotropic kernels are symmetric; an anisotropic one rotated by 90 degrees swaps its axes.
    iso = op4ksr.gaussian_family_kernel(11, 2.0, 2.0)
    torch.testing.assert_close(iso, iso.T)
    aniso = op4ksr.gaussian_family_kernel(11, 3.0, 1.0, angle=0.0)
    torch.testing.assert_close(op4ksr.gaussian_family_kernel(11, 3.0, 1.0, angle=torch.pi / 2), aniso.T)
    assert aniso[5, 8] > aniso[8, 5]  # wider along x
    # The sinc kernel is a low-pass filter: it keeps DC and cuts frequencies above the cutoff.
    response = torch.fft.fft2(op4ksr.sinc_kernel(21, torch.pi / 4), s=(64, 64)).abs()
    assert abs(response[0, 0].item() - 1) < 1e-5 and response[0, 24].item() < 0.1


def test_jpeg_round_trip_is_lossy_and_deterministic():
    image = hr_batch(batch=1)
    low, high = op4ksr.jpeg_compress(image, 10), op4ksr.jpeg_compress(image, 95)
    assert torch.equal(low, op4ksr.jpeg_compress(image, 10))
    assert (low - image).abs().mean() > (high - image).abs().mean() > 0


def test_config_defaults_are_real_esrgan():
    config = DegradationConfig()
    assert config.first.resize_range == (0.15, 1.5) and config.second.resize_range == (0.3, 1.2)
    assert config.first.noise_range == (1.0, 30.0) and config.second.noise_range == (1.0, 25.0)
    assert config.second.blur_prob == 0.8 and config.final_sinc_prob == 0.8
    assert dataclasses.replace(config.first) == DegradationStage()


# ----------------------------------------------------------------------------- colour fixes


def test_adain_matches_mean_and_std():
    image = torch.randn(2, 3, 32, 32)
    reference = torch.randn(2, 3, 8, 8) * torch.tensor([0.5, 2.0, 1.0])[:, None, None] + 3
    fixed = op4ksr.adain_color_fix(image, reference)
    torch.testing.assert_close(fixed.mean(dim=(-2, -1)), reference.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std(dim=(-2, -1)), reference.std(dim=(-2, -1)), atol=1e-4, rtol=1e-4)


def test_wavelet_fix_keeps_details_and_takes_colour():
    size = 256
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = lambda cycles, phase: torch.cos(2 * torch.pi * cycles * (x + 0.7 * y) / size + phase)  # noqa: E731
    details = torch.stack([wave(64, c) * 0.1 for c in range(3)])[None]  # 4-px period
    colour_out = torch.stack([wave(1, c) * 0.3 + 0.2 * c for c in range(3)])[None]  # 256-px period
    colour_ref = torch.stack([wave(1, c + 1) * 0.2 - 0.1 * c for c in range(3)])[None]
    fixed = op4ksr.wavelet_color_fix(details + colour_out, colour_ref)
    inner = (..., slice(32, -32), slice(32, -32))  # away from the replicated edges
    error_details = (fixed - colour_ref - details)[inner].abs().max().item()
    assert error_details < 0.02  # details kept, colour taken: 2% of the waves' amplitudes
    # A reference at a quarter of the size (the LR input) is resized first.
    small = F.interpolate(colour_ref, size=(64, 64), mode="area")
    assert (op4ksr.wavelet_color_fix(details + colour_out, small) - fixed)[inner].abs().max() < 0.02


# ----------------------------------------------------------------------------- loss assembly


def test_training_loss_sums_the_weighted_terms():
    pred, target = torch.rand(1, 3, SIZE, SIZE) * 2 - 1, torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    latents = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    weights = LossWeights(pixel_mse=1.0, pixel_l1=0.5, latent_mse=0.25, perceptual=2.0, periodicity=3.0)
    total, parts = op4ksr.sr_loss(pred, target, weights, lambda p, t: (p - t).abs().max(), *latents)
    assert set(parts) == {"pixel_mse", "pixel_l1", "latent_mse", "perceptual", "periodicity"}
    expected = (
        F.mse_loss(pred, target) + 0.5 * F.l1_loss(pred, target) + 0.25 * F.mse_loss(*latents)
        + 2.0 * (pred - target).abs().max() + 3.0 * op4ksr.periodicity_loss(pred, target)
    )
    torch.testing.assert_close(total, expected)

    total, parts = op4ksr.sr_loss(pred, target, LossWeights(perceptual=0.0))
    assert set(parts) == {"pixel_mse", "periodicity"}
    with pytest.raises(ValueError, match="perceptual"):
        op4ksr.sr_loss(pred, target, LossWeights())
    with pytest.raises(ValueError, match="latent"):
        op4ksr.sr_loss(pred, target, LossWeights(perceptual=0.0, latent_mse=1.0))
